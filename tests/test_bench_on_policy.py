"""`benchmarks/bench_on_policy.py` on a tiny setup: both trainers run, generate every token asked for, and train."""

import math
import sys

import pytest
from conftest import REPO_ROOT


pytest.importorskip("trl")
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_on_policy  # noqa: E402


TINY = bench_on_policy.Setup(
    vocab_size=256,
    prompt_length=8,
    max_new_tokens=8,
    batch_size=2,
    steps=2,
    warmup_steps=1,
    teacher_layers=2,
    teacher_width=32,
    student_layers=1,
    student_width=32,
)


@pytest.mark.parametrize("name", bench_on_policy.TRAINERS)
def test_both_trainers_run_on_policy_steps(name):
    result = bench_on_policy.run_one(name, TINY)
    assert len(result["step_seconds"]) == TINY.steps
    assert result["gradient_checkpointing"] is False
    # min_new_tokens = max_new_tokens: every step samples exactly batch × max_new_tokens tokens, in both trainers.
    assert result["generated_tokens_per_step"] == [TINY.batch_size * TINY.max_new_tokens] * TINY.steps
    assert len(result["reported_losses"]) == TINY.steps
    assert all(math.isfinite(loss) and loss > 0 for loss in result["reported_losses"])
    pieces = result["median_piece_seconds"]
    assert pieces["generate"] > 0 and pieces["teacher_forward"] > 0 and pieces["student_forward"] > 0
    if name == "hf_distill":
        assert all(entry["on_policy_fraction"] == 1.0 for entry in result["log_history"])
        assert all(
            entry["generated_tokens"] == TINY.batch_size * TINY.max_new_tokens for entry in result["log_history"]
        )
