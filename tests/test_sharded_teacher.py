"""A sharded teacher in real 2-process runs on CPU (gloo), against one process without sharding at the same global batch.

* FSDP2 teacher, DDP student: the teacher sharded with `fully_shard` (`shard_teacher=True`).
* FSDP2 student and teacher: accelerate's FSDP2 plugin for the student, with its CPU gate bypassed by the script
  (accelerate never enables FSDP on CPU); `benchmarks/gpu/check_sharded.py` is the unmodified GPU run.
* DeepSpeed ZeRO-3 (`DS_ACCELERATOR=cpu`): student and teacher partitioned; skipped when deepspeed is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TASKS, causal_lm_dataset, seeded
from safetensors.torch import load_file
from test_distributed import LAUNCH
from test_trainer import make_args

from hf_distill import DistillationTrainer
from hf_distill.distributed import check_teacher_placement, needs_late_placement


SCRIPT = Path(__file__).parent / "scripts" / "sharded_run.py"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run(command, cwd, timeout=180, **env):
    """Run a launcher in its own process group: on a timeout the whole group (launcher and workers) is killed."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **ENV, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{output[-6000:]}")
    Path(cwd, "launch.log").write_text(output)
    assert process.returncode == 0, output[-8000:]


def result(output_dir: Path) -> dict:
    return json.loads((output_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One process, no sharding, per-device batch 8: the reference."""
    tmp = tmp_path_factory.mktemp("plain")
    run([sys.executable, str(SCRIPT), str(tmp / "out"), "8", "plain"], tmp, ACCELERATE_USE_CPU="1")
    return result(tmp / "out")


def assert_same_training(sharded: dict, plain: dict) -> None:
    assert sharded["world_size"] == sharded["num_processes"] == 2 and plain["world_size"] == 1
    assert len(sharded["losses"]) == len(plain["losses"]) == 5
    for a, b in zip(sharded["losses"], plain["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(sharded["loss_kd"], plain["loss_kd"]):  # ~1e-2 in size: 1e-5 of the loss
        assert a == pytest.approx(b, abs=1e-5 * plain["losses"][0])
    assert sharded["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert sharded["eval_loss_kd"] == pytest.approx(plain["eval_loss_kd"], abs=1e-5 * plain["eval_loss"])


def assert_about_half_each(per_process: list[dict], key: str, total: int) -> None:
    sizes = [p[key] for p in per_process]
    assert sum(sizes) == total, sizes
    for size in sizes:
        assert 0.45 * total <= size <= 0.55 * total, sizes


def student_shapes() -> tuple[dict[str, tuple], int]:
    """The student's state-dict shapes by name, and its number of (distinct) parameters."""
    student = TASKS["causal_lm"][0]()
    return {name: tuple(t.shape) for name, t in student.state_dict().items()}, len(list(student.parameters()))


@pytest.mark.slow
def test_fsdp2_teacher_with_ddp_student_matches_one_process(tmp_path, plain):
    run(
        [*LAUNCH, "--multi_gpu", str(SCRIPT), str(tmp_path / "out"), "4", "fsdp2-teacher"],
        tmp_path,
        ACCELERATE_USE_CPU="1",
    )
    sharded = result(tmp_path / "out")
    assert sharded["hf_distill"].startswith(ENV["PYTHONPATH"])
    assert sharded["student_wrapped"] == "DistributedDataParallel"
    assert sharded["teacher_type"] == "FSDPGPT2LMHeadModel"
    assert sorted(sharded["sharded_modules"]) == ["FSDPGPT2Block", "FSDPGPT2Block", "FSDPGPT2LMHeadModel"]
    # Each process holds half the teacher (its DTensor shards), and only that between forwards (root included).
    assert_about_half_each(sharded["per_process"], "local_teacher_numel", sharded["teacher_numel"])
    assert all(p["all_resharded"] for p in sharded["per_process"])
    # Not in the optimizer: each process's optimizer holds exactly the (replicated) student.
    for p in sharded["per_process"]:
        assert p["optimizer_numel"] == sharded["student_numel"] and not p["teacher_in_optimizer"]
    assert_same_training(sharded, plain)
    assert sharded["teacher_eval_loss"] == pytest.approx(plain["teacher_eval_loss"], rel=1e-5)

    # Not in the checkpoint: the student's weights only, an optimizer over the student's parameters only.
    checkpoint = tmp_path / "out" / "checkpoint-5"
    weights = load_file(checkpoint / "model.safetensors")
    expected, num_parameters = student_shapes()
    assert {name: tuple(t.shape) for name, t in weights.items()}.items() <= expected.items()
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == num_parameters
    assert not any("teacher" in path.name or "fsdp" in path.name for path in checkpoint.rglob("*"))


@pytest.mark.slow
def test_fsdp2_student_and_teacher_match_one_process(tmp_path, plain):
    """accelerate's FSDP2 plugin for the student (its CPU gate bypassed: see `scripts/sharded_run.py`)."""
    run([*LAUNCH, "--multi_gpu", str(SCRIPT), str(tmp_path / "out"), "4", "fsdp2"], tmp_path, ACCELERATE_USE_CPU="1")
    sharded = result(tmp_path / "out")
    assert sharded["fsdp"] and sharded["student_wrapped"] == "FSDPGPT2LMHeadModel"
    assert sharded["teacher_type"] == "FSDPGPT2LMHeadModel"
    assert sorted(sharded["sharded_modules"]) == ["FSDPGPT2Block", "FSDPGPT2Block", "FSDPGPT2LMHeadModel"]
    assert_about_half_each(sharded["per_process"], "local_teacher_numel", sharded["teacher_numel"])
    assert all(p["all_resharded"] for p in sharded["per_process"])
    # Not in the optimizer: the processes' optimizers hold the student's shards, which add up to the student.
    assert sum(p["optimizer_numel"] for p in sharded["per_process"]) == sharded["student_numel"]
    assert not any(p["teacher_in_optimizer"] for p in sharded["per_process"])
    assert_same_training(sharded, plain)
    assert sharded["teacher_eval_loss"] == pytest.approx(plain["teacher_eval_loss"], rel=1e-5)

    # Not in the checkpoint: Trainer's FSDP files hold the student's weights and optimizer only.
    checkpoint = tmp_path / "out" / "checkpoint-5"
    expected, _ = student_shapes()
    weights = load_file(checkpoint / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in weights.items()}.items() <= expected.items()
    fsdp_weights = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    assert {name: tuple(t.shape) for name, t in fsdp_weights.items()}.items() <= expected.items()
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert {name for group in optimizer["param_groups"] for name in group["params"]} <= set(expected)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: DS_BUILD_OPS=0 pip install 'hf-distill[deepspeed]' (make install does)",
)
def test_deepspeed_zero3_teacher_matches_plain_run(tmp_path, plain):
    run([*LAUNCH, "--use_deepspeed", str(SCRIPT), str(tmp_path / "out"), "4", "zero3"], tmp_path, DS_ACCELERATOR="cpu")
    sharded = result(tmp_path / "out")
    assert sharded["deepspeed"] and sharded["teacher_type"] == "DeepSpeedEngine"
    assert sharded["student_wrapped"] == "DeepSpeedEngine"
    # Partitioned: each process's `ds_tensor`s are half the teacher.
    assert_about_half_each(sharded["per_process"], "local_teacher_numel", sharded["teacher_numel"])
    # Not in the optimizer: ZeRO-3's fp32 partitions add up to the student; the teacher's engine has no optimizer.
    assert sum(p["optimizer_numel"] for p in sharded["per_process"]) == sharded["student_numel"]
    assert all(p["teacher_engine_optimizer"] == "DeepSpeedZeRoOffload" for p in sharded["per_process"])
    assert_same_training(sharded, plain)

    # Not in the checkpoint: DeepSpeed's files describe the student's parameters and optimizer partitions only.
    step = tmp_path / "out" / "checkpoint-5" / "global_step5"
    expected, _ = student_shapes()
    saved_numel = 0
    for rank in range(2):
        states = torch.load(step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        shapes = {name: tuple(shape) for group in states["param_shapes"] for name, shape in group.items()}
        assert shapes.items() <= expected.items() and set(states["module"]) <= set(expected)
        optim = torch.load(step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        saved_numel += sum(t.numel() for t in optim["optimizer_state_dict"]["fp32_flat_groups"])
    assert saved_numel == sharded["student_numel"]
    assert sorted(path.name for path in step.iterdir()) == sorted(
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in range(2) for kind in ("model", "optim")
    )


@pytest.mark.slow
def test_fully_shard_keeps_outputs_for_tied_plain_and_ensemble_teachers(tmp_path):
    """Tied embeddings (BERT MLM: its embeddings block stays in the root's unit, which FSDP2 requires), a module
    without `_no_split_modules` (one unit), an ensemble (each member sharded): outputs unchanged, half per process."""
    script = Path(__file__).parent / "scripts" / "shard_modules.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, str(script), str(tmp_path / "out")], tmp_path)
    results = result(tmp_path / "out")
    assert results["bert_mlm"]["units"] == ["FSDPBertForMaskedLM", "FSDPBertLayer", "FSDPBertLayer"]
    assert results["plain"]["units"] == ["FSDPPlain"]
    assert results["ensemble"]["units"].count("FSDPGPT2LMHeadModel") == 2
    for name, shard in results.items():
        assert shard["max_abs_diff"] == 0.0, name
        assert shard["all_dtensor"], name
        assert_about_half_each([{"n": n} for n in shard["local_numel"]], "n", shard["total_numel"])


def fake_trainer(*, fsdp_version=None, deepspeed_stage=None, shard_teacher=None):
    """What `check_teacher_placement` reads of a trainer (FSDP and DeepSpeed cannot be enabled on CPU)."""
    state = SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None,
        deepspeed_plugin=SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": deepspeed_stage}}),
    )
    return SimpleNamespace(
        is_fsdp_enabled=fsdp_version is not None,
        is_deepspeed_enabled=deepspeed_stage is not None,
        accelerator=SimpleNamespace(state=state),
        args=SimpleNamespace(
            shard_teacher=shard_teacher, world_size=2, fsdp=fsdp_version is not None, deepspeed=deepspeed_stage
        ),
    )


def test_fsdp1_with_a_teacher_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"FSDP1 is not supported: use FSDP2 \(`fsdp_config=\{'version': 2\}`"):
        check_teacher_placement(fake_trainer(fsdp_version=1))
    check_teacher_placement(fake_trainer(fsdp_version=2))


def test_shard_teacher_under_zero2_is_refused():
    with pytest.raises(ValueError, match="partitions the teacher only under ZeRO-3"):
        check_teacher_placement(fake_trainer(deepspeed_stage=2, shard_teacher=True))
    check_teacher_placement(fake_trainer(deepspeed_stage=3, shard_teacher=True))
    check_teacher_placement(fake_trainer(deepspeed_stage=2))


def test_shard_teacher_in_one_process_keeps_the_teacher_whole(tmp_path, caplog):
    student_factory, teacher_factory, _ = TASKS["causal_lm"]
    with caplog.at_level("WARNING", logger="hf_distill"):
        trainer = DistillationTrainer(
            model=seeded(student_factory, 0),
            teacher_model=seeded(teacher_factory, 1),
            args=make_args(tmp_path, shard_teacher=True, max_steps=1),
            train_dataset=causal_lm_dataset(n=8),
        )
    assert "nothing to shard over" in caplog.text
    assert not needs_late_placement(trainer)
    trainer.train()
    assert type(trainer.teacher_model).__name__ == "GPT2LMHeadModel"


def test_fsdp_or_deepspeed_that_accelerate_ignored_is_named(caplog):
    """Under `accelerate launch` with ACCELERATE_USE_CPU=1, `fsdp=True` and `deepspeed=...` silently train in DDP
    (seen in 2-process runs); the trainer says so, and what becomes of the teacher."""
    for asked in ("fsdp", "deepspeed"):
        trainer = fake_trainer()
        setattr(trainer.args, asked, True if asked == "fsdp" else {"zero_optimization": {"stage": 3}})
        trainer.accelerator.distributed_type = "MULTI_CPU"
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_distill"):
            check_teacher_placement(trainer)
        name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[asked]
        assert f"{name} was asked for but accelerate did not enable it" in caplog.text
        assert "the student trains in MULTI_CPU, and the teacher is copied whole" in caplog.text
