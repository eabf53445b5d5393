"""The `distillation_fidelity` evaluate module: values against an independent hand computation, offline loading."""

from __future__ import annotations

import doctest
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

import hf_distill.metrics
from hf_distill.metrics import DISTILLATION_FIDELITY, load_distillation_fidelity


REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-9
COMPARISON_KEYS = {"teacher_agreement", "kl_teacher_student"}
REFERENCE_KEYS = {"student_accuracy", "teacher_accuracy", "student_ece", "teacher_ece"}


# ---- Independent reference: plain Python loops and `math`, no numpy ----


def reference_log_softmax(row: list[float]) -> list[float]:
    largest = max(row)
    log_normaliser = largest + math.log(sum(math.exp(value - largest) for value in row))
    return [value - log_normaliser for value in row]


def reference_argmax(row: list[float]) -> int:
    best = 0
    for index, value in enumerate(row):
        if value > row[best]:
            best = index
    return best


def reference_ece(confidences: list[float], correct: list[bool], n_bins: int) -> float:
    """Top-label ECE, binned by hand: bin m holds m / n_bins < confidence <= (m + 1) / n_bins."""
    total = len(confidences)
    ece = 0.0
    for bin_index in range(n_bins):
        lower, upper = bin_index / n_bins, (bin_index + 1) / n_bins
        members = [
            row
            for row, confidence in enumerate(confidences)
            if lower < confidence <= upper or (bin_index == 0 and confidence == 0.0)
        ]
        if not members:
            continue
        bin_accuracy = sum(correct[row] for row in members) / len(members)
        bin_confidence = sum(confidences[row] for row in members) / len(members)
        ece += len(members) / total * abs(bin_accuracy - bin_confidence)
    return ece


def reference_fidelity(student_logits, teacher_logits, references=None, n_bins=15) -> dict[str, float]:
    student_rows, teacher_rows = np.asarray(student_logits).tolist(), np.asarray(teacher_logits).tolist()
    rows = len(student_rows)
    agreements, kl_sum = 0, 0.0
    for student_row, teacher_row in zip(student_rows, teacher_rows):
        agreements += reference_argmax(student_row) == reference_argmax(teacher_row)
        student_log_probs, teacher_log_probs = reference_log_softmax(student_row), reference_log_softmax(teacher_row)
        kl_sum += sum(
            math.exp(teacher_log_prob) * (teacher_log_prob - student_log_prob)
            for teacher_log_prob, student_log_prob in zip(teacher_log_probs, student_log_probs)
        )
    results = {"teacher_agreement": agreements / rows, "kl_teacher_student": kl_sum / rows}
    if references is None:
        return results
    references = np.asarray(references).tolist()
    for model_name, model_rows in (("student", student_rows), ("teacher", teacher_rows)):
        correct = [reference_argmax(row) == label for row, label in zip(model_rows, references)]
        confidences = [math.exp(max(reference_log_softmax(row))) for row in model_rows]
        results[f"{model_name}_accuracy"] = sum(correct) / rows
        results[f"{model_name}_ece"] = reference_ece(confidences, correct, n_bins)
    return results


def random_logits(seed: int, rows: int = 300, num_classes: int = 5):
    generator = np.random.default_rng(seed)
    teacher_logits = 3.0 * generator.standard_normal((rows, num_classes))
    student_logits = teacher_logits + 1.5 * generator.standard_normal((rows, num_classes))
    references = generator.integers(0, num_classes, size=rows)
    return student_logits, teacher_logits, references


def assert_results_close(results: dict, expected: dict):
    assert set(results) == set(expected)
    for name, value in expected.items():
        assert isinstance(results[name], float), name
        assert results[name] == pytest.approx(value, abs=TOLERANCE, rel=TOLERANCE), name


@pytest.fixture(scope="module")
def fidelity():
    return load_distillation_fidelity(keep_in_memory=True)


# ---- Values ----


@pytest.mark.parametrize("n_bins", [15, 7, 1])
def test_matches_hand_computation(fidelity, n_bins):
    student_logits, teacher_logits, references = random_logits(seed=n_bins)
    kwargs = {} if n_bins == 15 else {"n_bins": n_bins}  # 15 is the default
    results = fidelity.compute(
        student_logits=student_logits, teacher_logits=teacher_logits, references=references, **kwargs
    )
    expected = reference_fidelity(student_logits, teacher_logits, references, n_bins=n_bins)
    assert_results_close(results, expected)
    # The random logits exercise every branch: partial agreement, non-trivial accuracy and calibration.
    assert 0.3 < results["teacher_agreement"] < 1.0
    assert results["kl_teacher_student"] > 0.0
    assert results["student_ece"] > 0.0 and results["teacher_ece"] > 0.0


def test_identical_student_and_teacher(fidelity):
    _, teacher_logits, references = random_logits(seed=1)
    results = fidelity.compute(student_logits=teacher_logits, teacher_logits=teacher_logits, references=references)
    assert results["teacher_agreement"] == 1.0
    assert results["kl_teacher_student"] == pytest.approx(0.0, abs=1e-12)
    assert results["student_accuracy"] == results["teacher_accuracy"]
    assert results["student_ece"] == results["teacher_ece"]


def test_references_omitted_gives_only_comparison_keys(fidelity):
    student_logits, teacher_logits, _ = random_logits(seed=2)
    results = fidelity.compute(student_logits=student_logits, teacher_logits=teacher_logits)
    assert set(results) == COMPARISON_KEYS
    assert_results_close(results, reference_fidelity(student_logits, teacher_logits))


def test_accepts_lists_and_tensors_and_accumulates_batches(fidelity):
    student_logits, teacher_logits, references = random_logits(seed=3, rows=40)
    expected = reference_fidelity(student_logits, teacher_logits, references)
    as_lists = fidelity.compute(
        student_logits=student_logits.tolist(), teacher_logits=teacher_logits.tolist(), references=references.tolist()
    )
    assert_results_close(as_lists, expected)
    for start in range(0, 40, 16):  # as in an evaluation loop: one batch at a time, tensors
        rows = slice(start, start + 16)
        fidelity.add_batch(
            student_logits=torch.from_numpy(student_logits[rows]),
            teacher_logits=torch.from_numpy(teacher_logits[rows]),
            references=torch.from_numpy(references[rows]),
        )
    assert_results_close(fidelity.compute(), expected)


def test_token_level_rows_are_flattened_counted_positions(fidelity):
    """The documented recipe: keep the positions whose label is not -100, one row each."""
    generator = np.random.default_rng(4)
    batch_size, length, num_classes = 3, 6, 4
    student_logits = generator.standard_normal((batch_size, length, num_classes))
    teacher_logits = generator.standard_normal((batch_size, length, num_classes))
    labels = generator.integers(0, num_classes, size=(batch_size, length))
    labels[:, -2:] = -100
    counted = labels != -100
    results = fidelity.compute(
        student_logits=student_logits[counted], teacher_logits=teacher_logits[counted], references=labels[counted]
    )
    assert_results_close(
        results, reference_fidelity(student_logits[counted], teacher_logits[counted], labels[counted])
    )
    with pytest.raises(ValueError, match="-100"):
        fidelity.compute(
            student_logits=student_logits.reshape(-1, num_classes),
            teacher_logits=teacher_logits.reshape(-1, num_classes),
            references=labels.reshape(-1),
        )


def test_teacher_ruling_out_a_class_adds_nothing_to_kl(fidelity):
    results = fidelity.compute(student_logits=[[0.0, 1.0]], teacher_logits=[[0.0, -math.inf]])
    assert results["kl_teacher_student"] == pytest.approx(-reference_log_softmax([0.0, 1.0])[0], abs=TOLERANCE)


def test_rejects_bad_inputs(fidelity):
    with pytest.raises(ValueError, match="same shape"):
        fidelity.compute(student_logits=[[0.0, 1.0]], teacher_logits=[[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="n_bins"):
        fidelity.compute(student_logits=[[0.0, 1.0]], teacher_logits=[[0.0, 1.0]], references=[0], n_bins=0)
    fidelity.add_batch(student_logits=[[0.0, 1.0]], teacher_logits=[[0.0, 1.0]], references=[1])
    fidelity.add_batch(student_logits=[[0.0, 1.0]], teacher_logits=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="missing for 1 of 2 rows"):
        fidelity.compute()


def test_docstring_example_is_right():
    metric = evaluate.load(DISTILLATION_FIDELITY, keep_in_memory=True)
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    test = parser.get_doctest(
        metric.info.inputs_description, {"evaluate": evaluate, "hf_distill": hf_distill}, "example", None, 0
    )
    assert test.examples
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# ---- Loading ----


def test_path_is_the_module_folder():
    folder = Path(DISTILLATION_FIDELITY)
    assert folder.is_dir()
    assert (folder / f"{folder.name}.py").is_file()  # evaluate.load(folder) imports folder/<folder name>.py
    assert hf_distill.metrics.DISTILLATION_FIDELITY == DISTILLATION_FIDELITY


@pytest.mark.slow
def test_loads_offline_in_a_fresh_process(tmp_path):
    """`evaluate.load(path)` and `load_distillation_fidelity()`: Hub off, empty caches, no reachable endpoint."""
    script = textwrap.dedent(
        """
        import json
        import evaluate
        from hf_distill.metrics import DISTILLATION_FIDELITY, load_distillation_fidelity

        inputs = dict(
            student_logits=[[2.0, 0.0], [0.0, 1.0]], teacher_logits=[[1.0, 0.0], [1.0, 0.0]], references=[0, 1]
        )
        by_path = evaluate.load(DISTILLATION_FIDELITY).compute(**inputs)
        by_helper = load_distillation_fidelity().compute(**inputs)
        print(json.dumps({"by_path": by_path, "by_helper": by_helper}))
        """
    )
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # empty module and metric caches: the module is copied afresh
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: any attempt to reach the Hub would fail
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    outputs = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = reference_fidelity([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [0, 1])
    assert_results_close(outputs["by_path"], expected)
    assert_results_close(outputs["by_helper"], expected)
    assert set(expected) == COMPARISON_KEYS | REFERENCE_KEYS
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics" / "distillation_fidelity").is_dir()
