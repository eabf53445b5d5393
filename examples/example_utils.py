# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
Pieces shared by the text examples (`distill_masked_lm.py`, `distill_causal_lm.py`, `distill_text_classifier.py`):
timing per phase, the results files (JSON, markdown table, PNG of bars and learning curves) and the distillation
fidelity metrics of a student against its teacher. They belong to the examples, not to the `hf_distill` library; the
scripts import this module as a sibling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]


class Clock:
    """Wall and CPU seconds per phase (CPU: all threads of this process; with one thread and a busy machine, the CPU
    time is close to what the phase takes alone on one core)."""

    def __init__(self):
        self.wall_s, self.cpu_s, self.start = {}, {}, time.time()

    @contextmanager
    def __call__(self, phase: str):
        wall, cpu = time.time(), time.process_time()
        yield
        self.wall_s[phase] = round(time.time() - wall, 1)
        self.cpu_s[phase] = round(time.process_time() - cpu, 1)

    def total(self) -> float:
        return round(time.time() - self.start, 1)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_aligned_from: int = 1) -> str:
    """A markdown table; columns from `right_aligned_from` on are right-aligned (numbers)."""
    align = ["---" if i < right_aligned_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def last_logged(trainer, key: str) -> float | None:
    """The last value of a training log key (e.g. `loss_kd`: evidence that a student was trained on its teacher)."""
    values = [entry[key] for entry in trainer.state.log_history if key in entry and "eval_loss" not in entry]
    return values[-1] if values else None


def write_results(results: dict, output_dir: str | Path, table: str) -> Path:
    """`results.json` and `results.md` (the table) in `output_dir`; returns the JSON's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(table + "\n")
    return path


def plot_bars_and_curves(
    path: str | Path,
    title: str,
    names: Sequence[str],
    bar_panels: Sequence[tuple[str, Sequence[float], str]],
    curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    curve_ylabel: str,
) -> None:
    """One bar chart per `(title, value per model, format)` panel, then a panel of `(label, steps, values)` curves
    (learning curves), in the colours of the bars; written to `path` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = COLORS[: len(names)]
    figure, axes = plt.subplots(1, len(bar_panels) + 1, figsize=(5.4 * (len(bar_panels) + 1), 4.8))
    for axis, (panel_title, values, fmt) in zip(axes, bar_panels):
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, fmt=fmt, padding=2)
        axis.set_title(panel_title, fontsize="medium")
        axis.margins(y=0.15)
    for (label, steps, values), color in zip(curves, colors):
        if len(steps):
            axes[-1].plot(steps, values, marker=".", color=color, label=label)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].set_ylabel(curve_ylabel)
    axes[-1].set_title("Learning curves")
    axes[-1].grid(alpha=0.3)
    axes[-1].legend()
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def fidelity_scores(student_logits, teacher_logits, references) -> dict[str, float]:
    """The `distillation_fidelity` metric (docs/fidelity_metric.md) on rows of class logits: student–teacher top-1
    agreement, KL(teacher ‖ student) at T = 1, accuracy and ECE of both."""
    import hf_distill.metrics

    fidelity = hf_distill.metrics.load_distillation_fidelity()
    scores = fidelity.compute(
        student_logits=np.asarray(student_logits, dtype=np.float64),
        teacher_logits=np.asarray(teacher_logits, dtype=np.float64),
        references=np.asarray(references, dtype=np.int64),
    )
    return {key: float(value) for key, value in scores.items()}


def load_or_train_teacher(teacher_dir: str | Path, settings: dict, auto_class, train, retrain: bool = False):
    """The teacher saved in `teacher_dir` if it was trained with the same `settings` (a JSON-able dict), else
    `train()` -> (model, learning curve), saved there. Returns (teacher, learning curve, train seconds, reused)."""
    teacher_dir = Path(teacher_dir)
    settings = json.loads(json.dumps(settings))  # as it will read back
    settings_file = teacher_dir / "teacher_settings.json"
    if not retrain and settings_file.exists():
        saved = json.loads(settings_file.read_text())
        if saved["settings"] == settings:
            print(f"Reusing the teacher in {teacher_dir} (same settings).", flush=True)
            teacher = auto_class.from_pretrained(teacher_dir)
            return teacher, saved["learning_curve"], saved["train_time_s"], True
    start = time.time()
    teacher, curve = train()
    train_time = round(time.time() - start, 1)
    teacher.save_pretrained(teacher_dir)
    saved = {"settings": settings, "learning_curve": curve, "train_time_s": train_time}
    settings_file.write_text(json.dumps(saved, indent=2))  # written last: a half-saved teacher is never reused
    return teacher, curve, train_time, False
