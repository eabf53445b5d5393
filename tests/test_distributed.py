"""Real 2-process DDP (gloo, CPU) through `accelerate launch`, against one process at the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).parent / "scripts" / "distributed_run.py"
# Two processes on this machine; add "--multi_gpu" (with ACCELERATE_USE_CPU=1 / use_cpu) for real 2-process DDP.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


def run(command, tmp_path, **environment):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **environment}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    run([*LAUNCH, "--multi_gpu", str(SCRIPT), str(tmp_path / "ddp"), "4"], tmp_path)
    run([sys.executable, str(SCRIPT), str(tmp_path / "single"), "8"], tmp_path)
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())

    assert ddp["world_size"] == 2 and ddp["num_processes"] == 2 and single["world_size"] == 1
    assert ddp["student_wrapped"] == "DistributedDataParallel"
    assert ddp["teacher_wrapped"] == "GPT2LMHeadModel", "the teacher must never be wrapped in DDP"
    # Ragged rows: the two processes count different numbers of tokens, so only a global normalisation agrees.
    assert len(ddp["losses"]) == len(single["losses"]) == 4
    for key in ("losses", "loss_kd"):
        for a, b in zip(ddp[key], single[key]):
            assert a == pytest.approx(b, rel=1e-4), key
    assert ddp["weight_norm"] == pytest.approx(single["weight_norm"], rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_with_the_fused_lm_head(tmp_path):
    """The fused lm_head path under DDP (the head's gradient computed in the student's loss, outside its forward, is
    still averaged by DDP) logs the one-process naive run's losses and reaches its weights."""
    run([*LAUNCH, "--multi_gpu", str(SCRIPT), str(tmp_path / "ddp"), "4"], tmp_path, KD_FUSE_LM_HEAD="1")
    run([sys.executable, str(SCRIPT), str(tmp_path / "single"), "8"], tmp_path, KD_FUSE_LM_HEAD="0")
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())

    assert ddp["world_size"] == 2 and ddp["student_wrapped"] == "DistributedDataParallel"
    assert ddp["fused_heads_checked"] == {"student": True, "teacher": True}
    assert single["fused_heads_checked"] == {}  # below the automatic threshold: the logits path
    assert len(ddp["losses"]) == len(single["losses"]) == 4
    for key in ("losses", "loss_kd"):
        for a, b in zip(ddp[key], single[key]):
            assert a == pytest.approx(b, rel=1e-4), key
    assert ddp["weight_norm"] == pytest.approx(single["weight_norm"], rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_on_policy(tmp_path):
    """lmbda=1 under 2-process DDP: each process generates its own shard (one `generate` per micro-batch), the losses
    are finite, and the logged `generated_tokens` is the sum over both processes."""
    run([*LAUNCH, "--multi_gpu", str(SCRIPT.parent / "on_policy_run.py"), str(tmp_path / "ddp")], tmp_path)
    results = [json.loads((tmp_path / "ddp" / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world_size"] == 2 for r in results)
    assert [r["generate_calls"] for r in results] == [6, 6]  # 3 steps × 2 micro-batches, on each process
    logged = results[0]["logged_generated_tokens"]
    assert results[1]["logged_generated_tokens"] == logged
    assert sum(logged) == sum(r["generated_tokens"] for r in results)
    assert len(results[0]["losses"]) == 3 and all(math.isfinite(x) for x in results[0]["losses"])
    assert results[0]["losses"] == results[1]["losses"] and results[0]["on_policy_fraction"] == [1.0] * 3
