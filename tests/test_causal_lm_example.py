"""`examples/distill_causal_lm.py` end to end on a tiny setting: a GPT-2 teacher, a baseline and a distilled student."""

import json
import math

import pytest


TINY = [
    "--max_corpus_files", "30", "--vocab_size", "400", "--block_size", "32",
    "--teacher_layers", "1", "--teacher_hidden_size", "32", "--student_layers", "1", "--student_hidden_size", "16",
    "--teacher_steps", "6", "--max_steps", "4", "--max_validation_blocks", "16", "--max_test_blocks", "16",
    "--fidelity_positions", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
]  # fmt: skip


def test_help_lists_the_example_flags(capsys):
    import distill_causal_lm

    with pytest.raises(SystemExit) as exit_info:
        distill_causal_lm.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--teacher_steps", "--student_hidden_size", "--fidelity_positions", "--alpha", "--output_dir"):
        assert flag in text


def test_example_runs_end_to_end(tmp_path):
    import distill_causal_lm

    results = distill_causal_lm.main([*TINY, "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert [row["name"] for row in saved["models"]] == ["teacher", "baseline", "distilled"]
    for row in saved["models"]:
        assert math.isfinite(row["test_perplexity"]) and row["test_perplexity"] > 1
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["ece"] <= 1 and row["learning_curve"]
    teacher, baseline, distilled = saved["models"]
    assert teacher["layers"] == 1 and teacher["hidden_size"] == 32 and teacher["teacher_agreement"] is None
    for student in (baseline, distilled):
        assert student["hidden_size"] == 16 and student["parameters"] < teacher["parameters"]
        assert 0 <= student["teacher_agreement"] <= 1 and student["kl_teacher_student"] >= 0
    # The distilled student was trained on the teacher's soft targets; the baseline never ran the teacher.
    assert distilled["train_loss_kd"] is not None and distilled["train_loss_kd"] > 0
    assert saved["settings"]["alpha"] > 0 and "KD" in distilled["description"]
    assert "alpha=0" in baseline["description"]
    assert saved["fidelity_positions"] == 64 and saved["test_tokens_predicted"] == 16 * 31
    assert not saved["teacher_reused"] and (tmp_path / "results.png").stat().st_size > 10_000
    assert (tmp_path / "results.md").read_text().count("\n") == 5
    # No file is in two splits (the corpus is split by file).
    files = [path for split in ("train", "validation", "test") for path in saved["files"][split]]
    assert len(files) == len(set(files)) == sum(saved["corpus"]["num_files"].values())
