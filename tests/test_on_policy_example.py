"""`examples/distill_on_policy.py` end to end on tiny settings: teacher, both students, scores, outputs."""

import json
import math

import distill_on_policy


TINY = [
    "--max_corpus_files=24",
    "--vocab_size=300",
    "--prompt_length=8",
    "--completion_length=8",
    "--hidden_size=32",
    "--teacher_layers=2",
    "--teacher_steps=10",
    "--teacher_batch_size=8",
    "--max_train_blocks=256",
    "--student_init_steps=4",
    "--max_steps=3",
    "--per_device_train_batch_size=4",
    "--per_device_eval_batch_size=16",
    "--eval_prompts=8",
    "--max_eval_blocks=16",
    "--logging_steps=1",
    "--num_threads=1",
]


def test_example_trains_and_scores_both_students(tmp_path):
    results = distill_on_policy.main([f"--output_dir={tmp_path}", *TINY])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(results["scores"]))
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "teacher" / "lm_settings.json").exists()
    assert (tmp_path / "student_init" / "lm_settings.json").exists()

    rows = {row["name"]: row for row in saved["models"]}
    assert {"teacher", "untrained student", "initial student", "off_policy", "on_policy", "real completions"} <= set(
        rows
    )
    for split in ("validation", "test"):
        for name in ("teacher", "untrained student", "initial student", "off_policy", "on_policy"):
            scores = saved["scores"][split][name]
            assert math.isfinite(scores["teacher_nll_of_samples"]) and scores["teacher_nll_of_samples"] > 0
            assert math.isfinite(scores["perplexity"]) and scores["perplexity"] > 1
            assert 0 < scores["distinct_token_fraction"] <= 1 and scores["sampled_tokens"] > 0
        assert math.isfinite(saved["scores"][split]["real completions"]["teacher_nll_of_samples"])

    # The on-policy student sampled every one of its micro-batches; the off-policy one none.
    on, off = rows["on_policy"], rows["off_policy"]
    assert on["on_policy_fraction"] == 1.0 and on["generated_tokens"] > 0
    assert off["on_policy_fraction"] == 0.0 and off["generated_tokens"] == 0
    assert on["steps"] == off["steps"] == 3
    assert all(math.isfinite(loss) for _, loss in on["loss_curve"] + off["loss_curve"])
    assert saved["verdict"] is not None and math.isfinite(saved["verdict"]["teacher_nll_gap_off_minus_on"])

    # A second run reuses the saved teacher and initial student.
    again = distill_on_policy.main([f"--output_dir={tmp_path}", *TINY, "--students=on_policy"])
    names = [row["name"] for row in again["models"]]
    assert again["teacher_reused"] and names[3:] == ["on_policy", "real completions"]
    assert next(row for row in again["models"] if row["name"] == "initial student")["reused"]
