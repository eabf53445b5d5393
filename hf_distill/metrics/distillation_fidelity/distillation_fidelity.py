# Copyright 2025 The hf-distill Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Distillation fidelity: how closely a student reproduces its teacher (agreement, KL, accuracy, calibration)."""

# One import per line: `evaluate.load` reads this file's imports with a regex and would take
# `import a, b` for a package named "a,".
import datasets
import evaluate
import numpy as np


_CITATION = """\
@article{hinton2015distilling,
  title={Distilling the Knowledge in a Neural Network},
  author={Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal={arXiv preprint arXiv:1503.02531},
  year={2015}
}
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={International Conference on Machine Learning},
  pages={1321--1330},
  year={2017}
}
"""

_DESCRIPTION = """\
Distillation fidelity compares a student's logits with its teacher's on the same rows. Each row is one prediction
over C classes: one example of a classifier, or one counted token position of a token classifier or language model
(flatten the counted positions to rows first, see the inputs).

With p_s = softmax(student_logits) and p_t = softmax(teacher_logits) per row, over N rows:

    teacher_agreement  = (1 / N) * sum_i [argmax p_s,i == argmax p_t,i]
    kl_teacher_student = (1 / N) * sum_i sum_c p_t,i,c * (log p_t,i,c - log p_s,i,c)

KL(teacher || student) at temperature 1, in nats, from log_softmax in float64; a class the teacher gives probability
0 contributes 0. Given integer `references` y_i, also

    student_accuracy = (1 / N) * sum_i [argmax p_s,i == y_i]          (teacher_accuracy likewise)
    student_ece      = sum_m (|B_m| / N) * |acc(B_m) - conf(B_m)|      (teacher_ece likewise)

the top-label expected calibration error (Guo et al., 2017): conf_i = max_c p_i,c is a row's confidence, the
M = `n_bins` equal-width bins are B_1 = [0, 1/M] and B_m = ((m - 1)/M, m/M] for m = 2..M, acc(B_m) is the fraction
of B_m's rows whose argmax equals the reference and conf(B_m) their mean confidence; empty bins contribute 0.
"""

_KWARGS_DESCRIPTION = """
Computes the fidelity of a student to its teacher.
Args:
    student_logits (`list` of `list` of `float`): one row of C class logits per example (or counted token position),
        e.g. the `predictions` of `DistillationTrainer.predict`. Token-level outputs `[batch, length, C]` must be
        flattened by the caller to the counted positions first, e.g. `logits[labels != -100]` (causal LMs: shifted,
        `logits[:, :-1][labels[:, 1:] != -100]`), with the teacher's logits and the references taken at the same
        positions.
    teacher_logits (`list` of `list` of `float`): the teacher's logits for the same rows, with the same C.
    references (`list` of `int`, *optional*): the class label of each row, in [0, C). When omitted, only the
        student-teacher comparisons are returned.
    n_bins (`int`, defaults to 15): number of equal-width confidence bins over [0, 1] for the calibration errors.
Returns:
    teacher_agreement (`float`): fraction of rows where the student's argmax equals the teacher's, in [0, 1].
    kl_teacher_student (`float`): mean KL(teacher || student) over rows at temperature 1, in nats, >= 0.
    student_accuracy (`float`): fraction of rows where the student's argmax equals the reference (only with
        `references`).
    teacher_accuracy (`float`): the same for the teacher (only with `references`).
    student_ece (`float`): the student's top-label expected calibration error over `n_bins` bins, in [0, 1] (only
        with `references`).
    teacher_ece (`float`): the same for the teacher (only with `references`).
Examples:
    >>> fidelity = evaluate.load(hf_distill.metrics.DISTILLATION_FIDELITY)
    >>> results = fidelity.compute(
    ...     student_logits=[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
    ...     teacher_logits=[[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
    ...     references=[0, 0, 2],
    ... )
    >>> for name, value in sorted(results.items()):
    ...     print(name, round(value, 4))
    kl_teacher_student 0.1394
    student_accuracy 0.6667
    student_ece 0.2932
    teacher_accuracy 1.0
    teacher_agreement 0.6667
    teacher_ece 0.2017

    Without references, only the comparison with the teacher:

    >>> results = fidelity.compute(student_logits=[[1.0, 0.0]], teacher_logits=[[1.0, 0.0]])
    >>> {name: round(value, 4) for name, value in sorted(results.items())}
    {'kl_teacher_student': 0.0, 'teacher_agreement': 1.0}
"""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log_softmax over the last axis (rows whose logits are all -inf are not supported)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Top-label ECE: sum over equal-width bins of (rows in bin / rows) * |accuracy in bin - mean confidence in bin|.

    A confidence c goes to bin m (0-based) when m / n_bins < c <= (m + 1) / n_bins; c = 0 goes to bin 0.
    """
    bin_edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    bin_indices = np.searchsorted(bin_edges[1:-1], confidences, side="left")
    confidence_per_bin = np.bincount(bin_indices, weights=confidences, minlength=n_bins)
    correct_per_bin = np.bincount(bin_indices, weights=correct.astype(np.float64), minlength=n_bins)
    # |sum correct - sum confidence| / N == (|B_m| / N) * |acc(B_m) - conf(B_m)|; empty bins give 0.
    return float(np.abs(correct_per_bin - confidence_per_bin).sum() / confidences.shape[0])


def _as_logit_matrix(rows, name: str) -> np.ndarray:
    try:
        logits = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise ValueError(f"`{name}` must hold rows of the same number of classes.") from None
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be one row of class logits per example (shape [rows, classes]), got shape "
            f"{logits.shape}. Flatten token-level logits to their counted positions first."
        )
    return logits


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistillationFidelity(evaluate.Metric):
    """Student-teacher agreement and KL divergence, plus both models' accuracy and calibration given references."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "student_logits": datasets.Sequence(datasets.Value("float64")),
                    "teacher_logits": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1503.02531", "https://arxiv.org/abs/1706.04599"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of `student_logits`, `teacher_logits` and, optionally, `references`.

        `references` is optional: `evaluate` hands every feature to `add_batch`, as None when not given, and cannot
        store a None column, so omitted references are stored as one null per row. `_compute` returns the
        reference-based keys only when no row has a null.
        """
        student_logits = kwargs.get("student_logits")
        if references is None and student_logits is not None:
            references = [None] * len(student_logits)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, student_logits, teacher_logits, references, n_bins=15):
        student_logits = _as_logit_matrix(student_logits, "student_logits")
        teacher_logits = _as_logit_matrix(teacher_logits, "teacher_logits")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"`student_logits` {student_logits.shape} and `teacher_logits` {teacher_logits.shape} must have the "
                "same shape [rows, classes]."
            )
        if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")

        student_log_probs = _log_softmax(student_logits)
        teacher_log_probs = _log_softmax(teacher_logits)
        teacher_probs = np.exp(teacher_log_probs)
        # 0 * log 0 = 0: a class the teacher rules out (-inf logit) adds nothing, whatever the student gives it.
        log_ratios = np.subtract(
            teacher_log_probs, student_log_probs, out=np.zeros_like(teacher_log_probs), where=teacher_probs > 0
        )
        kl_terms = teacher_probs * log_ratios
        student_predictions = student_logits.argmax(axis=-1)
        teacher_predictions = teacher_logits.argmax(axis=-1)
        results = {
            "teacher_agreement": float(np.mean(student_predictions == teacher_predictions)),
            "kl_teacher_student": float(kl_terms.sum(axis=-1).mean()),
        }

        given = [reference is not None for reference in references]
        if not any(given):
            return results
        if not all(given):
            raise ValueError(
                f"`references` are missing for {given.count(False)} of {len(given)} rows: give them for every row "
                "or for none."
            )
        references = np.asarray(references, dtype=np.int64)
        num_classes = student_logits.shape[1]
        if references.min() < 0 or references.max() >= num_classes:
            raise ValueError(
                f"`references` must be class indices in [0, {num_classes}), got values from {references.min()} to "
                f"{references.max()}. Drop ignored positions (label -100) before computing."
            )
        for model_name, predictions, log_probs in (
            ("student", student_predictions, student_log_probs),
            ("teacher", teacher_predictions, teacher_log_probs),
        ):
            correct = predictions == references
            confidences = np.exp(log_probs.max(axis=-1))
            results[f"{model_name}_accuracy"] = float(correct.mean())
            results[f"{model_name}_ece"] = _expected_calibration_error(confidences, correct, n_bins)
        return results
