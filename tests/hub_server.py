"""A small Hugging Face Hub-compatible HTTP server for tests.

The Hub cannot be reached from the test machines, and no Hub emulator exists as a package here, so the tests
run the *real* `huggingface_hub` client code (`create_repo`, `upload_folder`/`create_commit`, `hf_hub_download`,
`from_pretrained`) against this server on 127.0.0.1. It implements the part of the Hub's HTTP API that those calls
use, as `huggingface_hub` 2.x speaks it:

- `POST /api/repos/create`, `GET /api/whoami-v2`, `POST /api/validate-yaml`;
- `POST /api/models/{repo}/preupload/{rev}`: the server decides each file's upload mode, like the Hub: binary or
  large files go through LFS, small text files inline in the commit;
- the Git LFS batch API (`POST /{repo}.git/info/lfs/objects/batch`, basic transfer with a `verify` action); LFS
  objects are PUT to, and later served from, a second "CDN" port, so downloads take the same cross-origin
  redirect path as on huggingface.co (the client reads `X-Linked-Etag`/`X-Linked-Size` off the redirect and drops
  the auth header). The client must run with `HF_HUB_DISABLE_XET=1`: Xet storage is not emulated;
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder);
- `GET /api/models/{repo}[/revision/{rev}]`, `GET /api/models/{repo}/tree/{rev}[/{path}]`;
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`,
  `Content-Length`, and `X-Error-Code` on misses, which the client turns into its typed errors.

Malformed requests are refused with a 4xx status and a JSON `{"error": ...}` message (mirrored in
`X-Error-Message`, where the client looks for it). Every request is recorded in `HubServer.requests`, and
`HubServer.fail(route, status)` makes a route fail, for testing failure handling. Blobs live on disk in a temp
dir; the commit graph is kept in memory.

Point a client process at it with `HubServer.client_env()` (environment variables to set *before*
`huggingface_hub` is imported, since it reads `HF_ENDPOINT` at import time).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


USER = "hf-distill-tester"
# What the Hub accepts as a repo or namespace name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Like the Hub: a file goes through LFS when it is binary (a NUL byte in its first 512 bytes) or over 10 MB.
_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


class HubError(Exception):
    """An error answered to the client as `status` + JSON `{"error": message}` (+ `X-Error-Code` if given)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if error_code is not None:
            self.headers["X-Error-Code"] = error_code


@dataclass(frozen=True)
class RepoFile:
    """A file in a commit's tree. `oid` is the git blob id; `lfs_sha256` is set for files stored through LFS."""

    oid: str
    size: int
    lfs_sha256: str | None = None


@dataclass
class Commit:
    oid: str
    message: str
    parent: str | None
    files: dict[str, RepoFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files (and `huggingface_hub` computes it)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def split_front_matter(readme: str) -> dict | None:
    """Parse a README's YAML front matter (None when it has none). Raises `ValueError` when it is not a mapping."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.DOTALL)
    if match is None:
        return None
    metadata = yaml.safe_load(match.group(1))
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError("the YAML front matter must be a mapping")
    return metadata


def validate_model_card_metadata(metadata: dict) -> None:
    """The Hub's checks on model card metadata that matter here (it refuses a README that fails them)."""
    for key in ("tags", "datasets", "metrics", "language"):
        value = metadata.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise ValueError(f'"{key}" must be a string or a list of strings')
    for key in ("library_name", "license", "pipeline_tag"):
        if key in metadata and not isinstance(metadata[key], str):
            raise ValueError(f'"{key}" must be a string')
    base_model = metadata.get("base_model")
    if base_model is not None:
        for model_id in [base_model] if isinstance(base_model, str) else base_model:
            if not isinstance(model_id, str) or not re.match(r"^[\w.-]+(/[\w.-]+)?$", model_id):
                raise ValueError(f'"base_model" must be Hub model ids, got {model_id!r}')
    model_index = metadata.get("model-index")
    if model_index is None:
        return
    if not isinstance(model_index, list):
        raise ValueError('"model-index" must be a list')
    for entry in model_index:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError('"model-index" entries need a "name"')
        for result in entry.get("results", []):
            if not isinstance(result.get("task"), dict) or not isinstance(result["task"].get("type"), str):
                raise ValueError('"model-index" results need a "task" with a "type"')
            dataset = result.get("dataset")
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("name", "type")):
                raise ValueError('"model-index" results need a "dataset" with a "name" and a "type"')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                raise ValueError('"model-index" results need a non-empty "metrics" list')
            for metric in metrics:
                if not isinstance(metric.get("type"), str) or "value" not in metric:
                    raise ValueError('"model-index" metrics need a "type" and a "value"')


def validate_path_in_repo(path: object) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")) or path.split("/")[0] in (".git", ".cache"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubState:
    """Repos, commits and blobs. Blobs are files under `root`, named by their oid (git sha1, or LFS sha256)."""

    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()

    # -- blobs
    def blob_path(self, oid: str) -> Path:
        return self.blob_dir / oid

    def store_blob(self, oid: str, content: bytes) -> None:
        path = self.blob_path(oid)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            os.replace(tmp, path)

    def has_lfs_object(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    # -- repos
    def get_repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository Not Found for {repo_id}.", "RepoNotFound")
        return repo

    def resolve_revision(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(repo_id=repo_id, private=private)
            self.repos[repo_id] = repo
            # Like the Hub, a new repo has one commit with a default .gitattributes.
            oid = git_blob_oid(_INITIAL_GITATTRIBUTES)
            self.store_blob(oid, _INITIAL_GITATTRIBUTES)
            files = {".gitattributes": RepoFile(oid, len(_INITIAL_GITATTRIBUTES))}
            self.add_commit(repo, "main", "initial commit", None, files)
            return repo

    def add_commit(
        self, repo: Repo, branch: str, message: str, parent: str | None, files: dict[str, RepoFile]
    ) -> Commit:
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        tree = json.dumps({path: [f.oid, f.size, f.lfs_sha256] for path, f in sorted(files.items())})
        oid = hashlib.sha1(f"{parent}\n{message}\n{date}\n{len(repo.commits)}\n{tree}".encode()).hexdigest()
        commit = Commit(oid=oid, message=message, parent=parent, files=files, date=date)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


class HubServer:
    """The Hub API on one port and its LFS "CDN" on another, sharing one `HubState`. Use as a context manager."""

    def __init__(self, root: str | os.PathLike | None = None):
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="hub-server-")
        self.state = HubState(Path(root if root is not None else self._tmp.name))
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self.failures: dict[str, tuple[int, str]] = {}  # route name -> (status, message)
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, cdn=True))
        self.hub.daemon_threads = self.cdn.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.hub, self.cdn)]

    def start(self) -> HubServer:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, route: str, status: int = 500, message: str = "Internal Error - injected by the test") -> None:
        """Make every request to `route` ("create", "preupload", "lfs_batch", "commit", "resolve", ...) fail."""
        self.failures[route] = (status, message)

    def reset_failures(self) -> None:
        self.failures.clear()

    def client_env(self, hf_home: str | os.PathLike, token: str = "hf_test_dummy_token") -> dict[str, str]:
        """Environment for a client process (set before `huggingface_hub` is imported): this endpoint, a dummy
        token, an isolated cache, no Xet (not emulated), no telemetry."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": token,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }

    # -- read access for tests
    def repo_files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file of `repo_id` at `revision` (LFS files resolved to their content)."""
        with self.state.lock:
            commit = self.state.resolve_revision(self.state.get_repo(repo_id), revision)
            return {path: self.state.blob_path(f.lfs_sha256 or f.oid).read_bytes() for path, f in commit.files.items()}

    def commit_messages(self, repo_id: str, branch: str = "main") -> list[str]:
        """Messages of the commits on `branch`, newest first."""
        with self.state.lock:
            repo = self.state.get_repo(repo_id)
            oid, messages = repo.branches[branch], []
            while oid is not None:
                messages.append(repo.commits[oid].message)
                oid = repo.commits[oid].parent
            return messages


def _make_handler(server: HubServer, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubRequestHandler if not cdn else _CdnRequestHandler):
        hub = server

    return Handler


class _BaseHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format, *args):  # noqa: A002 - silence the per-request stderr log
        pass

    # -- plumbing
    def _read_body(self) -> bytes:
        self._body_read = True
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else b""

    def _json_body(self) -> dict:
        try:
            body = json.loads(self._read_body() or b"null")
        except ValueError as err:
            raise HubError(400, f"Request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise HubError(400, "Request body must be a JSON object")
        return body

    def _send(
        self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _send_json(self, status: int, payload, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _dispatch(self) -> None:
        self._body_read = False
        try:
            self.route()
        except HubError as err:
            if not self._body_read:  # an unread body would be parsed as the next request on this kept-alive connection
                self._read_body()
            headers = {"X-Error-Message": err.message, **err.headers}
            self._send_json(err.status, {"error": err.message}, headers)
        except Exception as err:  # a server bug: answer 500 with the reason rather than hang the client
            self._send_json(500, {"error": f"test server error: {type(err).__name__}: {err}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def route(self) -> None:
        raise NotImplementedError

    def _check_failure(self, route: str) -> None:
        if route in self.hub.failures:
            status, message = self.hub.failures[route]
            raise HubError(status, message)


class _CdnRequestHandler(_BaseHandler):
    """Stands in for the storage the Hub redirects LFS transfers to: PUT uploads, GET downloads, no auth."""

    def route(self) -> None:
        parts = urlsplit(self.path).path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "lfs-objects" or not _SHA256.match(parts[1]):
            raise HubError(404, f"Not found: {self.path}")
        sha256 = parts[1]
        state = self.hub.state
        if self.command == "PUT":
            self._check_failure("lfs_upload")
            content = self._read_body()
            if hashlib.sha256(content).hexdigest() != sha256:
                raise HubError(400, f"Uploaded content does not match its sha256 {sha256}")
            state.store_blob(sha256, content)
            self._send(200)
        elif self.command in ("GET", "HEAD"):
            if not state.has_lfs_object(sha256):
                raise HubError(404, f"LFS object {sha256} not found")
            content = state.blob_path(sha256).read_bytes()
            self._send(200, content, {"ETag": f'"{sha256}"'}, content_type="application/octet-stream")
        else:
            raise HubError(405, f"{self.command} not allowed here")


class _HubRequestHandler(_BaseHandler):
    def route(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        method = self.command
        if path == "/api/whoami-v2" and method == "GET":
            self._require_token()
            return self._send_json(200, {"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$", path)
        if match and method == "POST":
            repo_id, action, revision = match.groups()
            if query.get("create_pr") == ["1"]:
                raise HubError(400, "Pull requests are not supported by this test server")
            return self._preupload(repo_id, revision) if action == "preupload" else self._commit(repo_id, revision)
        match = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if match and method == "GET":
            return self._model_info(match.group(1), match.group(2) or "main")
        match = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
        if match and method == "GET":
            return self._tree(match.group(1), match.group(2), unquote(match.group(3) or "/")[1:], query)
        match = re.match(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)$", path)
        if match and method == "POST":
            return self._lfs_batch(match.group(1)) if match.group(2) == "batch" else self._lfs_verify(match.group(1))
        match = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if match and method in ("GET", "HEAD"):
            return self._resolve(match.group(1), match.group(2), unquote(match.group(3)))
        raise HubError(404, f"This test server does not implement {method} {path}")

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not re.match(r"^Bearer hf_\w+$", auth):
            raise HubError(401, "Invalid username or password.")

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.hub.endpoint}/{repo_id}"

    # -- repos
    def _create_repo(self) -> None:
        self._require_token()
        self._check_failure("create")
        body = self._json_body()
        name, organization = body.get("name"), body.get("organization") or USER
        if body.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        if not isinstance(name, str) or not _NAME.match(name) or not _NAME.match(organization):
            raise HubError(400, f"Invalid repo name: {organization}/{name}")
        repo_id = f"{organization}/{name}"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.hub.state.create_repo(repo_id, private)
        except HubError as err:  # the client reads the url of an existing repo from the 409 body
            self._send_json(err.status, {"error": err.message, "url": self._repo_url(repo_id)})
            return
        self._send_json(200, {"url": self._repo_url(repo_id), "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        with self.hub.state.lock:
            repo = self.hub.state.get_repo(repo_id)
            commit = self.hub.state.resolve_revision(repo, revision)
            files = dict(commit.files)
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        if "README.md" in files:
            readme = self.hub.state.blob_path(files["README.md"].oid).read_text(encoding="utf-8")
            info["cardData"] = split_front_matter(readme) or {}
        self._send_json(200, info)

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict) -> None:
        with self.hub.state.lock:
            commit = self.hub.state.resolve_revision(self.hub.state.get_repo(repo_id), revision)
            files = dict(commit.files)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder}/" if folder else ""
        if folder and not any(path.startswith(prefix) for path in files):
            raise HubError(404, f"Folder {folder} not found", "EntryNotFound")
        entries, folders = [], set()
        for path, f in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs_sha256 is not None:
                pointer_size = len(lfs_pointer(f.lfs_sha256, f.size))
                entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": pointer_size}
            entries.append(entry)
        if recursive:
            folders = {
                "/".join(p.split("/")[: i + 1]) for p in files if p.startswith(prefix) for i in range(p.count("/"))
            }
        entries += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._send_json(200, entries)

    # -- uploads
    def _validate_yaml(self) -> None:
        body = self._json_body()
        if not isinstance(body.get("content"), str):
            raise HubError(400, 'validate-yaml needs a string "content"')
        try:
            metadata = split_front_matter(body["content"])
            if metadata is not None:
                validate_model_card_metadata(metadata)
        except (ValueError, yaml.YAMLError) as err:
            self._send_json(400, {"errors": [{"message": str(err)}], "warnings": []})
            return
        warnings = [] if metadata else [{"message": "Empty or missing yaml metadata in repo card"}]
        self._send_json(200, {"errors": [], "warnings": warnings})

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_token()
        self._check_failure("preupload")
        body = self._json_body()
        with self.hub.state.lock:
            commit = self.hub.state.resolve_revision(self.hub.state.get_repo(repo_id), revision)
            files = dict(commit.files)
        requested = body.get("files")
        if not isinstance(requested, list):
            raise HubError(400, 'preupload needs a "files" list')
        answer = []
        for item in requested:
            well_formed = isinstance(item, dict) and isinstance(item.get("size"), int)
            if not (well_formed and isinstance(item.get("sample"), str)):
                raise HubError(400, 'preupload "files" entries need "path", "size" (int) and "sample" (base64)')
            path = validate_path_in_repo(item.get("path"))
            try:
                sample = base64.b64decode(item["sample"], validate=True)
            except ValueError:
                raise HubError(400, f"preupload sample of {path} is not base64") from None
            is_lfs = b"\0" in sample or item["size"] >= _LFS_SIZE_THRESHOLD
            existing = files.get(path)
            oid = None if existing is None else (existing.lfs_sha256 or existing.oid)
            mode = "lfs" if is_lfs else "regular"
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": answer, "commitOid": commit.oid})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_token()
        self._check_failure("lfs_batch")
        body = self._json_body()
        self.hub.state.get_repo(repo_id)
        objects = body.get("objects")
        transfers = body.get("transfers", [])
        if body.get("operation") != "upload" or not isinstance(objects, list) or "basic" not in transfers:
            raise HubError(422, 'LFS batch needs "operation": "upload", "objects" and the "basic" transfer')
        answer = []
        for obj in objects:
            if not (isinstance(obj, dict) and _SHA256.match(str(obj.get("oid"))) and isinstance(obj.get("size"), int)):
                raise HubError(422, 'LFS batch objects need a sha256 "oid" and an int "size"')
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub.state.has_lfs_object(obj["oid"], obj["size"]):
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.cdn_endpoint}/lfs-objects/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            answer.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": answer}, content_type="application/vnd.git-lfs+json")

    def _lfs_verify(self, repo_id: str) -> None:
        self._require_token()
        body = self._json_body()
        if not self.hub.state.has_lfs_object(str(body.get("oid")), body.get("size")):
            raise HubError(404, f"LFS object {body.get('oid')} was not uploaded (or has another size)")
        self._send_json(200, {"success": True})

    def _commit(self, repo_id: str, revision: str) -> None:
        self._require_token()
        self._check_failure("commit")
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise HubError(400, "A commit must be sent as application/x-ndjson")
        try:
            lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from None
        if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
            raise HubError(400, 'A commit payload must start with a "header" line')
        header = lines[0].get("value") or {}
        if not isinstance(header.get("summary"), str) or not header["summary"]:
            raise HubError(400, "A commit needs a non-empty summary")
        state = self.hub.state
        branch = unquote(revision)
        with state.lock:
            repo = state.get_repo(repo_id)
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(412, f"A commit has happened since {parent}; the head of {branch} is {head}")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                self._apply_operation(files, line)
            readme = files.get("README.md")
            if readme is not None and readme.lfs_sha256 is None:
                try:
                    metadata = split_front_matter(state.blob_path(readme.oid).read_text(encoding="utf-8"))
                    if metadata is not None:
                        validate_model_card_metadata(metadata)
                except (ValueError, yaml.YAMLError) as err:
                    raise HubError(400, f"Invalid metadata in README.md: {err}") from None
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            commit = state.add_commit(repo, branch, message, head, files)
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo_id)}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _apply_operation(self, files: dict[str, RepoFile], line: object) -> None:
        if not isinstance(line, dict) or not isinstance(line.get("value"), dict):
            raise HubError(400, f"Invalid commit operation: {line!r}")
        key, value = line.get("key"), line["value"]
        path = validate_path_in_repo(
            value.get("path", "").rstrip("/") if key == "deletedFolder" else value.get("path")
        )
        if key == "file":
            if value.get("encoding") != "base64" or not isinstance(value.get("content"), str):
                raise HubError(400, f"File {path}: content must be a base64 string with encoding base64")
            try:
                content = base64.b64decode(value["content"], validate=True)
            except ValueError:
                raise HubError(400, f"File {path}: content is not valid base64") from None
            oid = git_blob_oid(content)
            self.hub.state.store_blob(oid, content)
            files[path] = RepoFile(oid, len(content))
        elif key == "lfsFile":
            sha256, size = value.get("oid"), value.get("size")
            if value.get("algo") != "sha256" or not _SHA256.match(str(sha256)):
                raise HubError(400, f"LFS file {path}: needs algo sha256 and a sha256 oid")
            if not self.hub.state.has_lfs_object(sha256, size):
                raise HubError(422, f"LFS file {path}: object {sha256} was never uploaded")
            size = self.hub.state.blob_path(sha256).stat().st_size
            files[path] = RepoFile(git_blob_oid(lfs_pointer(sha256, size)), size, sha256)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    # -- downloads
    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._check_failure("resolve")
        state = self.hub.state
        with state.lock:
            commit = state.resolve_revision(state.get_repo(repo_id), revision)
            f = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        if f.lfs_sha256 is not None:
            # Like the Hub: redirect LFS files to storage on another origin, with the file's metadata on the redirect.
            headers.update(
                {
                    "ETag": f'"{f.oid}"',
                    "X-Linked-Etag": f'"{f.lfs_sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Location": f"{self.hub.cdn_endpoint}/lfs-objects/{f.lfs_sha256}",
                }
            )
            return self._send(302, b"", headers, content_type="text/plain")
        content = state.blob_path(f.oid).read_bytes()
        headers["ETag"] = f'"{f.oid}"'
        self._send(200, content, headers, content_type="application/octet-stream")


__all__ = ["HubServer", "HubState", "HubError", "git_blob_oid", "split_front_matter", "validate_model_card_metadata"]
