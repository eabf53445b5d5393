"""`examples/distill_text_classifier.py`: which stdlib package a snippet comes from; end to end on a tiny setting."""

import json
import math

import pytest
from text_corpus import split_of


TINY = [
    "--packages", "asyncio,email,xml", "--max_files_per_class", "2", "--vocab_size", "400", "--snippet_tokens", "16",
    "--teacher_layers", "1", "--teacher_hidden_size", "32", "--student_layers", "1", "--student_hidden_size", "16",
    "--teacher_steps", "6", "--max_steps", "4", "--max_train_snippets_per_class", "20",
    "--max_eval_snippets_per_class", "10", "--per_device_train_batch_size", "4",
]  # fmt: skip


def test_help_lists_the_example_flags(capsys):
    import distill_text_classifier

    with pytest.raises(SystemExit) as exit_info:
        distill_text_classifier.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--packages", "--snippet_tokens", "--teacher_steps", "--temperature", "--output_dir"):
        assert flag in text


def test_package_of():
    from distill_text_classifier import package_of

    assert package_of("email/mime/text.py") == "email" and package_of("json/__init__.py") == "json"
    assert package_of("os.py") is None


def test_example_runs_end_to_end(tmp_path):
    import distill_text_classifier

    results = distill_text_classifier.main([*TINY, "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert [row["name"] for row in saved["models"]] == ["teacher", "baseline", "distilled"]
    for row in saved["models"]:
        for key in ("test_accuracy", "test_macro_accuracy", "ece"):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 1
        assert row["learning_curve"]
    teacher, baseline, distilled = saved["models"]
    for student in (baseline, distilled):
        assert student["parameters"] < teacher["parameters"]
        assert 0 <= student["teacher_agreement"] <= 1 and student["kl_teacher_student"] >= 0
    assert distilled["train_loss_kd"] is not None and distilled["train_loss_kd"] > 0
    assert "alpha=0" in baseline["description"] and "KD" in distilled["description"]

    # Classes: in the given order, balanced by the caps, each snippet's label is the package of its file.
    assert saved["classes"] == ["asyncio", "email", "xml"]
    assert saved["class_frequencies"]["train"] == {"asyncio": 20, "email": 20, "xml": 20}
    assert saved["class_frequencies"]["test"] == {"asyncio": 10, "email": 10, "xml": 10}
    # Split by file: no file in two splits, each file in the split `split_of` gives it, at most 2 per class.
    files = saved["files"]
    fraction = saved["settings"]["held_out_fraction"]
    all_files = [path for split in files for path in files[split]]
    assert len(all_files) == len(set(all_files))
    for split, paths in files.items():
        assert all(split_of(path, fraction, fraction) == split for path in paths)
        assert all(sum(path.startswith(f"{name}/") for path in paths) <= 2 for name in saved["classes"])
    assert (tmp_path / "results.png").stat().st_size > 10_000
    config = json.loads((tmp_path / "distilled" / "config.json").read_text())
    assert config["id2label"] == {"0": "asyncio", "1": "email", "2": "xml"}


def test_snippets_are_labelled_by_their_files_package(tmp_path):
    import distill_text_classifier
    from text_corpus import load_stdlib_corpus, train_tokenizer

    _, example_args = distill_text_classifier.parse_arguments([*TINY, "--output_dir", str(tmp_path)])
    classes = ["asyncio", "email", "xml"]
    full = load_stdlib_corpus(validation_fraction=0.2, test_fraction=0.2)
    corpus = distill_text_classifier.task_corpus(full, classes, max_files_per_class=2)
    tokenizer = train_tokenizer(corpus["train"], "wordpiece", vocab_size=400)
    snippets = distill_text_classifier.make_snippets(corpus, tokenizer, classes, example_args, seed=0)
    for split, dataset in snippets.items():
        assert set(dataset["file"]) <= set(corpus.files[split])
        for label, path, ids in zip(dataset["labels"], dataset["file"], dataset["input_ids"]):
            assert path.split("/")[0] == classes[label] and len(ids) == 16
            assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
