"""Side evaluations: a model evaluated in the place of a `DistillationTrainer`'s student, without touching the trainer.

The model card compares the student with its teacher on the same evaluation set, and the comparison is only fair when
both columns come from the same code. So the other model is evaluated by a second trainer of the same class, built
from the first one's evaluation set, collator, metrics, loss function and teacher, with the model in the student's
place: every metric — the label loss, `compute_metrics`, and the distillation ones (``loss_kd``, ``teacher_agreement``)
— is computed exactly as `evaluate()` computes it for the student. For the teacher itself these are its own metrics,
with ``loss_kd`` 0 and ``teacher_agreement`` 1 by definition.

The side trainer leaves no trace: it logs, reports, saves and prints nothing, writes only to a scratch directory, and
the run's random number generators are restored afterwards (`Trainer.__init__` reseeds them). It evaluates at the
trainer's step, so scheduled T and alpha have the values the trainer's own `evaluate()` would use, and it borrows the
trainer's teacher as prepared (frozen, placed) instead of preparing it again. The teacher is frozen, so its results
are cached per trainer, evaluation set, metric prefix and (T, alpha).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
import tempfile
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from .models import accepted_arguments
from .teachers import ensemble_members


# Throughput figures of an evaluation, which say nothing about the model.
EVAL_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")

# Teacher results per trainer: a list of (evaluation set, (metric prefix, (T, alpha)), results). The sets are compared
# by identity, so each entry holds its set: an `id()` alone could be reused by another set once the first is freed.
_TEACHER_RESULTS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without the throughput figures (runtime, samples/s, ...) and the epoch."""
    return {key: value for key, value in metrics.items() if not key.endswith(EVAL_TIMING_KEYS) and key != "epoch"}


def _silent_copy_of_args(args, output_dir: str):
    """`trainer.args` for a side evaluation: same batch size, precision, collation and seeds; no logging, reporting,
    saving or pushing, so it leaves no trace in the trainer's state, callbacks or `output_dir`; no intermediate
    matches, so its `loss` is the logit objective alone; no generated training batches."""
    return dataclasses.replace(
        args,
        output_dir=output_dir,
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=True,
        # The models' logits are compared; their layers are not (the teacher's own projections would be new ones).
        intermediate_matches=None,
        # It never trains: no training micro-batch is generated (evaluation follows `eval_on_policy`, as the run's).
        lmbda=0.0,
        seq_kd=False,
    )


class _AsTrainerModel(nn.Module):
    """A plain module (a teacher, or a plain student) seen as a model `Trainer` can evaluate: its bare logits tensor returned as
    ``{"logits": ...}`` (Trainer's prediction step would slice a bare tensor as if it were a tuple of outputs), and
    only the inputs its `forward` takes passed on (the trainer hands a student every column, labels included)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        accepted = accepted_arguments(model)

        def forward(**inputs):
            if accepted is not None:
                inputs = {key: value for key, value in inputs.items() if key in accepted}
            outputs = model(**inputs)
            return {"logits": outputs} if isinstance(outputs, torch.Tensor) else outputs

        # Trainer keeps the dataset columns that `forward`'s signature names: show it the wrapped model's.
        forward.__signature__ = inspect.signature(model.forward)
        self.forward = forward


class _BorrowedTeacher(nn.Module):
    """The trainer's teacher (one model), lent to a side trainer without becoming its submodule.

    The side trainer must use the teacher as the trainer prepared it — already frozen and placed — and may have that
    same teacher as the model it evaluates: a teacher registered as a submodule would share its parameters with the
    evaluated model, which `DistillationTrainer` rightly refuses in training. Only its `forward` is lent (with the
    inputs the teacher takes as its signature); its parameters stay the trainer's.
    """

    def __init__(self, teacher: nn.Module):
        super().__init__()
        accepted = accepted_arguments(teacher)

        def forward(**inputs):
            return teacher(**inputs)

        if accepted is None:
            forward.__signature__ = inspect.signature(teacher.forward)
        else:
            forward.__signature__ = inspect.Signature(
                [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in sorted(accepted)]
            )
        self.forward = forward


def _borrowed(teacher: nn.Module | None) -> list[nn.Module] | None:
    """`teacher` as a side trainer's `teacher_model`: each member borrowed (an ensemble is rebuilt from the same
    members, reduction and weights by the side trainer, so that it runs at the evaluated step's temperature)."""
    return None if teacher is None else [_BorrowedTeacher(member) for member in ensemble_members(teacher)]


@contextlib.contextmanager
def _random_state_preserved():
    """`Trainer.__init__` reseeds Python's, NumPy's and torch's generators (`set_seed(args.seed)`): an evaluation made
    in the middle of a run (e.g. for a card written at a checkpoint) must not change the run's random stream."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _requested_eval_set(trainer: Trainer, eval_dataset):
    """The set `Trainer.evaluate(eval_dataset)` evaluates: the trainer's by default; a name picks one of its sets."""
    if eval_dataset is None:
        return trainer.eval_dataset
    if isinstance(eval_dataset, str):
        return trainer.eval_dataset[eval_dataset]
    return eval_dataset


def _eval_sets(eval_dataset, metric_key_prefix: str) -> dict[str, Any]:
    """{metric prefix: dataset} as `Trainer.evaluate` names them: each set of a dict gets its name in its prefix."""
    if isinstance(eval_dataset, dict):
        return {f"{metric_key_prefix}_{name}": dataset for name, dataset in eval_dataset.items()}
    return {metric_key_prefix: eval_dataset}


def evaluate_on_eval_set(
    trainer: Trainer, model: nn.Module, eval_dataset=None, metric_key_prefix: str = "eval"
) -> dict[str, float]:
    """``trainer.evaluate(eval_dataset, metric_key_prefix=...)`` with `model` in the place of `trainer`'s student —
    same evaluation set(s), collator, metrics, teacher and evaluation code — without touching `trainer`. Returns the
    metrics, throughput figures dropped.

    Used for the teacher (a `DistillationTrainer` whose student *is* the teacher: every metric, including the
    distillation ones, is computed exactly as for the student) and for a student whose latest evaluation predates its
    final weights.
    """
    eval_sets = _eval_sets(_requested_eval_set(trainer, eval_dataset), metric_key_prefix)
    with tempfile.TemporaryDirectory(prefix="hf-distill-side-eval-") as scratch, _random_state_preserved():
        side_trainer = type(trainer)(
            model=model if isinstance(model, PreTrainedModel) else _AsTrainerModel(model),
            teacher_model=_borrowed(trainer.teacher_model),
            args=_silent_copy_of_args(trainer.args, scratch),
            data_collator=trainer.data_collator,
            processing_class=trainer.processing_class,
            compute_metrics=trainer.compute_metrics,
            preprocess_logits_for_metrics=trainer.preprocess_logits_for_metrics,
            compute_loss_func=trainer.compute_loss_func,
        )
        # Its default callbacks would print this side evaluation's metrics as if they were the run's.
        for callback in list(side_trainer.callback_handler.callbacks):
            side_trainer.remove_callback(callback)
        # T and alpha follow the optimizer step (their schedules): evaluate at the trainer's, as its `evaluate()` does.
        side_trainer.state.global_step = trainer.state.global_step
        side_trainer.state.max_steps = trainer.state.max_steps
        # Trainer infers label names from the model's `forward`; keep the student's so both are scored on the same.
        side_trainer.label_names = trainer.label_names
        results = {}
        for prefix, dataset in eval_sets.items():
            results.update(side_trainer.evaluate(dataset, metric_key_prefix=prefix))
    return _without_timing(results)


def cached_teacher_evaluation(
    trainer: Trainer, eval_dataset=None, metric_key_prefix: str = "eval"
) -> dict[str, float]:
    """`trainer`'s teacher evaluated in its student's place (`evaluate_on_eval_set`), once per evaluation set, metric
    prefix and (scheduled) T and alpha: the teacher is frozen, so later calls return the first results. See
    `DistillationTrainer.evaluate_teacher`."""
    if trainer.teacher_model is None:
        raise ValueError(
            "This DistillationTrainer has no teacher model to evaluate: it learns from cached teacher outputs "
            "(`precompute_teacher_logits`). Evaluate the teacher where it is loaded, or give `teacher_model=` too."
        )
    if eval_dataset is None and trainer.eval_dataset is None:
        raise ValueError(
            "Evaluating the teacher needs an evaluation set: pass `eval_dataset=` here or to the DistillationTrainer."
        )
    target = _requested_eval_set(trainer, eval_dataset)
    # `eval_loss` weighs the label loss by 1 - alpha: scheduled T and alpha are part of what was evaluated.
    settings = (metric_key_prefix, trainer.current_temperature_and_alpha())
    entries = _TEACHER_RESULTS_CACHE.setdefault(trainer, [])
    for dataset, cached_settings, results in entries:
        if dataset is target and cached_settings == settings:
            return dict(results)
    # A DeepSpeed teacher is an engine, whose `forward(*inputs, **kwargs)` names no inputs: evaluate its module.
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    results = evaluate_on_eval_set(trainer, teacher, target, metric_key_prefix)
    entries.append((target, settings, results))
    return dict(results)
