"""Publishing students: `push_to_hub` against a local Hub-compatible server (`tests/hub_server.py`), the distillation
model card, and failed pushes.

The pushing process is this one, pointed at the server by patching `huggingface_hub`'s endpoint constants (importing
transformers again in a subprocess per test would cost more than the whole suite may take); loading the pushed
student back happens in a fresh process that finds the server through `HF_ENDPOINT`, like a user's would.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import transformers.utils.hub
from conftest import (
    MNIST_DIR,
    REPO_ROOT,
    PlainLogitsTeacher,
    PlainMLP,
    bert_config,
    features_dataset,
    sequence_dataset,
)
from hub_server import USER
from huggingface_hub import ModelCard, ModelCardData, constants
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, Trainer, TrainingArguments

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.hub import PushToHubError
from hf_distill.model_card import build_distillation_model_card, count_parameters


TOKEN = "hf_test_dummy_token"
EXAMPLE = REPO_ROOT / "examples" / "distill_mnist.py"

# Loads a pushed model the way a user would, in a process that never saw the trainer: one `from_pretrained` call.
LOAD_AND_PREDICT = """
import json, sys, torch
import transformers
if sys.argv[3] == "import-hf-distill":
    import hf_distill  # registers the MLP with the Auto classes
auto_class = getattr(transformers, sys.argv[1])
model = auto_class.from_pretrained(sys.argv[2]).eval()
inputs = {key: torch.tensor(value) for key, value in json.loads(sys.stdin.read()).items()}
with torch.no_grad():
    print(json.dumps(model(**inputs).logits.tolist()))
"""


def point_hub_client_at(monkeypatch, endpoint: str) -> None:
    """Make this process's `huggingface_hub` (read at import) and transformers' shared `HfApi` use `endpoint`."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)


@pytest.fixture(scope="module")
def hub_client(hub_server, tmp_path_factory):
    """This process as a Hub client of the session's server: endpoint, dummy token, an empty cache, no Xet (not
    emulated), online."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_hub_client_at(monkeypatch, hub_server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_hub_cache")))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield hub_server


def closed_port_endpoint() -> str:
    """An endpoint nothing listens on: a port the OS just handed out, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def accuracy(eval_prediction) -> dict[str, float]:
    return {"accuracy": float((eval_prediction.predictions.argmax(-1) == eval_prediction.label_ids).mean())}


def make_args(output_dir, **overrides) -> DistillationTrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        temperature=3.0,
        alpha=0.7,
    )
    return DistillationTrainingArguments(**{**values, **overrides})


def bert_pair(seed: int = 0) -> tuple[BertForSequenceClassification, BertForSequenceClassification]:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(16)), BertForSequenceClassification(bert_config(32))


def load_in_fresh_process(hub_server, tmp_path, auto_class: str, repo_id: str, inputs: dict, import_hf_distill=False):
    """Logits of `repo_id` pulled from the server by a new Python process with an empty cache."""
    env = {**os.environ, **hub_server.client_env(tmp_path / "hf_home", token=TOKEN), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_AND_PREDICT,
            auto_class,
            repo_id,
            "import-hf-distill" if import_hf_distill else "",
        ],
        input=json.dumps({key: value.tolist() for key, value in inputs.items()}),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


def local_logits(model, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def tensors_in(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Every tensor in the pushed files: safetensors, and torch pickles (optimizer, scheduler, RNG states, args).
    The pickles are unpickled in full: this test wrote them."""
    found = {}
    for path, content in files.items():
        if path.endswith(".safetensors"):
            found.update({f"{path}:{key}": value for key, value in load_safetensors(content).items()})
        elif path.endswith((".bin", ".pt", ".pth")):
            stack = [(path, torch.load(io.BytesIO(content), weights_only=False))]
            while stack:
                name, value = stack.pop()
                if isinstance(value, torch.Tensor):
                    found[name] = value
                elif isinstance(value, dict):
                    stack += [(f"{name}:{key}", item) for key, item in value.items()]
                elif isinstance(value, (list, tuple)):
                    stack += [(f"{name}:{i}", item) for i, item in enumerate(value)]
    return found


def card_results_table(card_text: str) -> dict[str, tuple[str, str]]:
    """{metric: (student cell, teacher cell)} from the card's student-vs-teacher table."""
    section = card_text.split("## Evaluation: student vs teacher", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| eval_")]
    return {cells[0].strip(): (cells[1].strip(), cells[2].strip()) for cells in rows}


@pytest.fixture(scope="module")
def pushed_student(hub_client, tmp_path_factory):
    """A tiny BERT student distilled for 4 steps with `hub_strategy="checkpoint"` from a teacher given by its Hub id,
    evaluated, and pushed."""
    output_dir = tmp_path_factory.mktemp("pushed") / "tiny-student"
    student, teacher = bert_pair()
    teacher_commit = teacher.push_to_hub("tiny-teacher").oid
    train_set, eval_set = sequence_dataset(48, seed=1), sequence_dataset(32, seed=2)
    args = make_args(
        output_dir,
        max_steps=4,
        push_to_hub=True,
        hub_model_id="tiny-student",
        hub_strategy="checkpoint",
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=f"{USER}/tiny-teacher",
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        compute_metrics=accuracy,
    )
    trainer.train()
    commit = trainer.push_to_hub(dataset_tags="hf-distill/random-tokens", dataset="random tokens")
    return dict(
        trainer=trainer,
        teacher=trainer.teacher_model,
        teacher_commit=teacher_commit,
        eval_set=eval_set,
        repo_id=trainer.hub_model_id,
        commit=commit,
        files=hub_client.repo_files(trainer.hub_model_id),
        output_dir=output_dir,
    )


@pytest.mark.slow
def test_pulled_student_gives_identical_logits_in_a_fresh_process(pushed_student, hub_server, tmp_path):
    inputs = {"input_ids": torch.tensor(pushed_student["eval_set"]["input_ids"][:5])}
    expected = local_logits(pushed_student["trainer"].model, inputs)
    pulled = load_in_fresh_process(
        hub_server, tmp_path, "AutoModelForSequenceClassification", pushed_student["repo_id"], inputs
    )
    assert torch.equal(pulled, expected)
    # It really came from the server, through the LFS redirect of a real Hub download.
    weights = re.compile(rf"^/{pushed_student['repo_id']}/resolve/[^/]+/model\.safetensors$")
    assert ("HEAD", 302) in [(method, status) for method, path, status in hub_server.requests if weights.match(path)]


def test_push_uploads_the_student_and_never_a_teacher_tensor(pushed_student):
    files, trainer, teacher = pushed_student["files"], pushed_student["trainer"], pushed_student["teacher"]
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= set(files)
    # hub_strategy="checkpoint" also pushed the resumable checkpoint.
    assert {"last-checkpoint/model.safetensors", "last-checkpoint/optimizer.pt"} <= set(files)
    assert json.loads(files["config.json"])["hidden_size"] == 16  # the student's, not the teacher's (32)

    student_keys = set(trainer.model.state_dict())
    assert set(load_safetensors(files["model.safetensors"])) == student_keys
    # No stored tensor is a teacher tensor (constant ones, e.g. LayerNorm's initial 1s, prove nothing either way).
    teacher_tensors = [
        t for t in teacher.state_dict().values() if t.numel() > 1 and not torch.all(t == t.flatten()[0])
    ]
    stored = tensors_in(files)
    assert any(name.startswith("last-checkpoint/optimizer.pt") for name in stored)
    for name, tensor in stored.items():
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in teacher_tensors), name


def test_card_states_lineage_loss_and_student_vs_teacher_results(pushed_student):
    trainer, teacher, eval_set = pushed_student["trainer"], pushed_student["teacher"], pushed_student["eval_set"]
    text = pushed_student["files"]["README.md"].decode()
    assert (pushed_student["output_dir"] / "README.md").read_text() == text
    card = ModelCard(text)
    metadata = card.data.to_dict()
    assert ModelCardData(**metadata).to_dict() == metadata  # round-trips through huggingface_hub's metadata model

    assert metadata["library_name"] == "transformers"
    assert {"knowledge-distillation", "hf-distill"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # the student was not initialised from the teacher's weights
    assert metadata["datasets"] == ["hf-distill/random-tokens"]
    assert metadata["distillation"] == {
        "teacher": f"{USER}/tiny-teacher",
        "teacher_revision": pushed_student["teacher_commit"],
        "teacher_architecture": "BertForSequenceClassification",
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(trainer.model),
        "compression_ratio": round(count_parameters(teacher) / count_parameters(trainer.model), 2),
        "loss": "kl",
        "temperature": 3.0,
        "alpha": 0.7,
    }
    student_results = trainer.evaluate()
    (model_index,) = metadata["model-index"]
    (result,) = model_index["results"]
    assert result["metrics"] == [{"type": "accuracy", "value": student_results["eval_accuracy"], "name": "Accuracy"}]

    # The teacher's column, checked against a plain `Trainer` evaluation of the teacher: its accuracy, and its own
    # label loss as `eval_loss_ce`; the comparison terms are trivial for the teacher against itself.
    table = card_results_table(text)
    plain_args = TrainingArguments(
        output_dir=str(pushed_student["output_dir"] / "plain"),
        report_to=[],
        use_cpu=True,
        per_device_eval_batch_size=16,
        disable_tqdm=True,
    )
    teacher_results = Trainer(model=teacher, args=plain_args, compute_metrics=accuracy).evaluate(eval_set)
    expected = {
        "eval_loss": (student_results["eval_loss"], (1 - 0.7) * teacher_results["eval_loss"]),
        "eval_accuracy": (student_results["eval_accuracy"], teacher_results["eval_accuracy"]),
        "eval_loss_ce": (student_results["eval_loss_ce"], teacher_results["eval_loss"]),
        "eval_loss_kd": (student_results["eval_loss_kd"], 0.0),
        "eval_teacher_agreement": (student_results["eval_teacher_agreement"], 1.0),
    }
    assert set(table) == set(expected)
    for metric, (student_value, teacher_value) in expected.items():
        assert float(table[metric][0]) == pytest.approx(student_value, rel=1e-3, abs=1e-6), metric
        assert float(table[metric][1]) == pytest.approx(teacher_value, rel=1e-3, abs=1e-6), metric
    assert "arXiv:1503.02531" in text and "T = 1" in text


def raw_request(hub_server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, JSON body) of one request to the server, bypassing the client library's own checks."""
    request = urllib.request.Request(
        hub_server.endpoint + path,
        data=body or None,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_hub_server_refuses_malformed_requests(hub):
    status, _ = raw_request(hub, "POST", "/api/repos/create", json.dumps({"name": "strict"}).encode())
    assert status == 200
    ndjson = {"Content-Type": "application/x-ndjson"}
    header = json.dumps({"key": "header", "value": {"summary": "s"}}).encode() + b"\n"
    refused = {
        "no token": ("POST", "/api/repos/create", b"{}", {"Authorization": ""}),
        "bad repo name": ("POST", "/api/repos/create", json.dumps({"name": "a b"}).encode(), None),
        "not JSON": ("POST", f"/api/models/{USER}/strict/preupload/main", b"{", None),
        "no files list": ("POST", f"/api/models/{USER}/strict/preupload/main", b"{}", None),
        "commit not NDJSON": ("POST", f"/api/models/{USER}/strict/commit/main", header, None),
        "commit without header": ("POST", f"/api/models/{USER}/strict/commit/main", b'{"key": "file"}\n', ndjson),
        "path escaping the repo": (
            "POST",
            f"/api/models/{USER}/strict/commit/main",
            header
            + json.dumps({"key": "file", "value": {"path": "../x", "content": "", "encoding": "base64"}}).encode(),
            ndjson,
        ),
        "LFS object never uploaded": (
            "POST",
            f"/api/models/{USER}/strict/commit/main",
            header
            + json.dumps(
                {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 1}}
            ).encode(),
            ndjson,
        ),
        "unknown repo": ("GET", f"/{USER}/missing/resolve/main/config.json", b"", None),
        "unknown route": ("GET", "/api/spaces", b"", None),
    }
    for case, (method, path, body, headers) in refused.items():
        status, answer = raw_request(hub, method, path, body, headers)
        assert 400 <= status < 500 and answer["error"], case
    assert hub.commit_messages(f"{USER}/strict") == ["initial commit"]


def assert_complete_student_in(output_dir, model) -> None:
    """`output_dir` holds the trained student, loadable, with its card."""
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(output_dir))
    inputs = {"input_ids": torch.tensor(sequence_dataset(4, seed=3)["input_ids"])}
    reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert torch.equal(local_logits(reloaded, inputs), local_logits(model, inputs))
    assert ModelCard.load(os.path.join(output_dir, "README.md")).data.distillation["loss"] == "kl"


def test_push_failing_on_commit_raises_clearly_and_keeps_output_dir(hub_client, tmp_path):
    student, teacher = bert_pair()
    args = make_args(tmp_path / "out", push_to_hub=True, hub_model_id="failing-commit-student")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=sequence_dataset(16, seed=1)
    )
    trainer.train()
    hub_client.fail("commit", 500)
    try:
        with pytest.raises(PushToHubError) as raised:
            trainer.push_to_hub()
    finally:
        hub_client.reset_failures()
    message = str(raised.value)
    assert "failing-commit-student" in message and "500" in message and str(tmp_path / "out") in message
    assert_complete_student_in(tmp_path / "out", trainer.model)
    assert hub_client.commit_messages(trainer.hub_model_id) == ["initial commit"]  # nothing half-committed


def test_push_to_unreachable_endpoint_raises_clearly_and_keeps_output_dir(hub_client, monkeypatch, tmp_path):
    student, teacher = bert_pair()
    args = make_args(tmp_path / "out", hub_model_id="unreachable-student")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=sequence_dataset(16, seed=1)
    )
    trainer.train()
    endpoint = closed_port_endpoint()
    point_hub_client_at(monkeypatch, endpoint)
    with pytest.raises(PushToHubError) as raised:
        trainer.push_to_hub()
    message = str(raised.value)
    assert endpoint in message and "ConnectError" in message and "unreachable-student" in message
    assert_complete_student_in(tmp_path / "out", trainer.model)


def test_card_for_plain_module_student_and_teacher(tmp_path):
    """transformers' own card needs a `PreTrainedModel`; hf-distill's does not."""
    torch.manual_seed(0)
    student, teacher = PlainMLP(hidden=16), PlainLogitsTeacher()
    eval_set = features_dataset(24, seed=2)
    args = make_args(tmp_path / "out", distillation_loss="jsd", jsd_beta=0.3, eval_strategy="steps", eval_steps=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=features_dataset(16),
        eval_dataset=eval_set,
        compute_metrics=accuracy,
    )
    trainer.train()
    rng_state = torch.random.get_rng_state()
    card = build_distillation_model_card(trainer)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # evaluating for the card left the run's RNG alone
    assert card.data.distillation["teacher_architecture"] == "PlainLogitsTeacher"
    assert card.data.distillation["jsd_beta"] == 0.3 and card.data.distillation["loss"] == "jsd"
    with torch.no_grad():
        teacher_predictions = teacher(torch.tensor(eval_set["features"])).argmax(-1)
    teacher_accuracy = (teacher_predictions == torch.tensor(eval_set["labels"])).float().mean().item()
    assert float(card_results_table(str(card))["eval_accuracy"][1]) == pytest.approx(teacher_accuracy, rel=1e-3)
    # Teacher results given by the user are used as they are.
    given = build_distillation_model_card(trainer, teacher_eval_results={"eval_accuracy": 0.123})
    assert card_results_table(str(given))["eval_accuracy"][1] == "0.123"


def test_card_names_a_local_teacher_by_its_directory_only(tmp_path):
    _, teacher = bert_pair()
    teacher_dir = tmp_path / "private" / "my-teacher"
    teacher.save_pretrained(teacher_dir)
    torch.manual_seed(0)
    trainer = DistillationTrainer(
        model=BertForSequenceClassification(bert_config(16)),
        teacher_model=str(teacher_dir),
        args=make_args(tmp_path / "out"),
        train_dataset=sequence_dataset(8),
    )
    card = build_distillation_model_card(trainer)
    lineage = card.data.distillation
    assert lineage["teacher"] == "my-teacher" and lineage["teacher_source"] == "local"
    assert "teacher_revision" not in lineage and str(tmp_path) not in str(card)


@pytest.mark.slow
def test_mnist_example_pushes_a_student_that_loads_from_the_hub(hub_client, tmp_path):
    if not EXAMPLE.exists():
        pytest.skip("examples/distill_mnist.py is not there yet")
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    output_dir = tmp_path / "mnist"
    env = {**os.environ, **hub_client.client_env(tmp_path / "hf_home", token=TOKEN), "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        str(EXAMPLE),
        "--data_dir",
        str(MNIST_DIR),
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "300",
        "--max_test_samples",
        "100",
        "--validation_size",
        "100",
        "--teacher_hidden_sizes",
        "32",
        "--teacher_epochs",
        "1",
        "--student_hidden_sizes",
        "16",
        "--num_train_epochs",
        "1",
        "--temperature",
        "3.0",
        "--num_threads",
        "1",
        "--report_to",
        "none",
        "--push_to_hub",
        "--hub_model_id",
        "mnist-student",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    repo_id = "hf-distill-tester/mnist-student"
    card = ModelCard(hub_client.repo_files(repo_id)["README.md"].decode())
    assert "knowledge-distillation" in card.data.tags and card.data.distillation["temperature"] == 3.0
    assert "eval_teacher_agreement" in card_results_table(str(card))
    # Pulled with one standard call (here, in this process: a fresh one is tested above), it is the local student.
    from transformers import AutoModelForImageClassification

    import hf_distill  # noqa: F401 - registers the MLP with the Auto classes

    pulled = AutoModelForImageClassification.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    local = AutoModelForImageClassification.from_pretrained(output_dir / "distilled")
    image = torch.rand(2, 1, local.config.image_size, local.config.image_size)
    assert torch.equal(local_logits(pulled, {"pixel_values": image}), local_logits(local, {"pixel_values": image}))
