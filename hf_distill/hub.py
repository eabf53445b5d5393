"""Pushing a student to the Hub: a failed push says so clearly and never costs the trained model.

`Trainer.push_to_hub` saves the model and writes the card into `output_dir` *before* uploading, so when the upload
fails (the Hub answers 5xx, the endpoint is unreachable) everything is already on disk — except when the failure is
in creating the repo, which `Trainer` does first. `push_errors_explained` covers both: it saves what is missing and
raises `PushToHubError`, which names the repo, the endpoint, the cause, the folder that holds the student, and how to
retry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from huggingface_hub import constants

from .private_apis import save_model_without_push


try:  # huggingface_hub >= 2 speaks HTTP through httpx2, 1.x through httpx
    from httpx2 import HTTPError as _HTTPError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as _HTTPError


class PushToHubError(OSError):
    """`push_to_hub` could not upload the student. The trained student is intact in `output_dir`."""

    def __init__(self, message: str, repo_id: str, output_dir: str):
        super().__init__(message)
        self.repo_id = repo_id
        self.output_dir = output_dir


def _is_hub_failure(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is an HTTP failure (an error status from the Hub, or no connection
    to it), as opposed to, say, a full disk while saving. `huggingface_hub` wraps some transfer errors (an LFS upload's
    in a `RuntimeError`), so the chain is searched."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _HTTPError):  # `HfHubHTTPError` included
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def push_errors_explained(trainer) -> Iterator[None]:
    """Run a `Trainer.push_to_hub` call; turn a Hub or network failure into a `PushToHubError`.

    If the failure came before `Trainer` saved anything (creating the repo failed, so `trainer.hub_model_id` is still
    unset), the student and its card are saved to `output_dir` first, as a successful push would have left them.
    """
    try:
        yield
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        output_dir = trainer.args.output_dir
        repo_id = trainer.hub_model_id or trainer.args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
        if trainer.hub_model_id is None:
            save_model_without_push(trainer)
            trainer.create_model_card()
        raise PushToHubError(
            f"Pushing the student to the Hub repo '{repo_id}' at {constants.ENDPOINT} failed: "
            f"{type(error).__name__}: {error}\n"
            f"Nothing was lost: the trained student (weights, config, model card and processor, if any) is saved in "
            f"'{os.path.abspath(output_dir)}'. Retry with `trainer.push_to_hub()` once the Hub is reachable, or "
            f"upload that folder with `hf upload {repo_id} {output_dir}`.",
            repo_id=repo_id,
            output_dir=output_dir,
        ) from error
