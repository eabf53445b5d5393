"""`DistillationTrainer` when things go wrong: NaN teachers and checkpoints, micro-batches that count nothing, what
alpha = 0 equals per task, evaluation without labels, bad evaluation data, resuming after an interrupted save."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import (
    TASKS,
    PlainMLP,
    causal_lm_dataset,
    features_dataset,
    seeded,
    sequence_dataset,
)
from safetensors.torch import load_file
from test_trainer import NaNAfterTeacher, make_args
from transformers import Trainer, TrainingArguments

from hf_distill import DistillationTrainer, DistillationTrainingArguments, precompute_teacher_logits


def logged(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "eval_loss" not in h]


def checkpoints(output_dir):
    return sorted((p for p in output_dir.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for file in folder.glob("*.safetensors"):
        weights.update(load_file(str(file)))
    return weights


# ---- a NaN teacher never reaches a checkpoint, whatever the logging settings ----


@pytest.mark.parametrize("nan_filter", [True, False])
@pytest.mark.parametrize("logging_steps", [1, 10])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_nonfinite_teacher_never_reaches_a_checkpoint(tmp_path, nan_filter, logging_steps, accumulation):
    args = make_args(
        tmp_path,
        max_steps=4,
        logging_steps=logging_steps,
        logging_nan_inf_filter=nan_filter,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    model = PlainMLP()
    # One teacher call per micro-batch: NaN from the first micro-batch of optimizer step 3.
    teacher = NaNAfterTeacher(nan_from=2 * accumulation + 1)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=features_dataset())
    with pytest.raises(ValueError, match=r"NaN or inf logits at optimizer step 3 \(before its update\)"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = checkpoints(tmp_path / "out")
    assert [p.name for p in saved] == ["checkpoint-1", "checkpoint-2"]
    for folder in saved:
        weights = saved_weights(folder)
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), folder.name


# ---- a micro-batch that counts no token adds exactly nothing ----


def prompt_only_rows_last(n: int = 4, empty: int = 2) -> datasets.Dataset:
    """Causal LM rows whose last `empty` rows are all prompt (every label -100), like SFT rows with no answer."""
    rows = causal_lm_dataset(n=n).to_dict()
    rows["labels"] = [labels if i < n - empty else [-100] * len(labels) for i, labels in enumerate(rows["labels"])]
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("nan_filter", [True, False])
@pytest.mark.parametrize("accumulation", [2, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_a_micro_batch_without_counted_tokens_adds_nothing_to_the_logged_loss(
    tmp_path, nan_filter, accumulation, alpha
):
    student_factory, teacher_factory, _ = TASKS["causal_lm"]
    teacher = seeded(teacher_factory, 1)
    runs = {}
    for name, ga in (("whole", 1), ("accumulated", accumulation)):
        # Sequential rows: with accumulation the last micro-batch (2 x 2) or the last two (4 x 1) count no token.
        args = make_args(
            tmp_path / name,
            per_device_train_batch_size=4 // ga,
            gradient_accumulation_steps=ga,
            max_steps=1,
            alpha=alpha,
            logging_nan_inf_filter=nan_filter,
            train_sampling_strategy="sequential",
        )
        trainer = DistillationTrainer(
            model=seeded(student_factory, 0), teacher_model=teacher, args=args, train_dataset=prompt_only_rows_last()
        )
        trainer.train()
        runs[name] = trainer
    keys = ("loss", "loss_ce") + (("loss_kd",) if alpha > 0 else ())
    for key in keys:
        whole, accumulated = logged(runs["whole"], key), logged(runs["accumulated"], key)
        assert len(whole) == 1 and math.isfinite(whole[0]), key
        assert accumulated == pytest.approx(whole, rel=1e-5), key


# ---- what alpha = 0 equals ----


@pytest.mark.parametrize(
    "task, accumulation",
    [("token_classification", 1), ("image_classification", 1), ("image_classification", 2), ("plain_module", 2)],
)
def test_alpha_zero_is_trainer_bit_for_bit(tmp_path, task, accumulation):
    """Classifiers, token classifiers, image models, plain modules (see also test_trainer.py for sequence classifiers
    and plain modules without accumulation): the same logged losses and the same weights as `Trainer`."""
    student_factory, teacher_factory, dataset_factory = TASKS[task]
    dataset = dataset_factory(n=48)
    common = dict(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    plain_model = seeded(student_factory, 0)
    plain = Trainer(model=plain_model, args=TrainingArguments(**common), train_dataset=dataset)
    plain.train()
    kd_model = seeded(student_factory, 0)
    args = DistillationTrainingArguments(**{**common, "output_dir": str(tmp_path / "kd")}, alpha=0.0)
    kd = DistillationTrainer(
        model=kd_model, teacher_model=seeded(teacher_factory, 1), args=args, train_dataset=dataset
    )
    kd.train()
    assert len(logged(plain)) == 4 and logged(kd) == logged(plain)
    for (name, a), (_, b) in zip(plain_model.state_dict().items(), kd_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_alpha_zero_under_accumulation_is_the_mean_where_trainer_logs_a_multiple(tmp_path):
    """A BERT classifier takes ``**kwargs`` but ignores `num_items_in_batch`, so Trainer (transformers 5.24) neither
    divides its loss by the accumulation steps nor by the count: it logs (and trains on) 2x the mean at 2 steps.
    hf-distill's alpha = 0 loss stays the mean over the step's rows, equal to the run without accumulation."""
    student_factory, teacher_factory, dataset_factory = TASKS["sequence_classification"]
    dataset = dataset_factory(n=16)
    first = {}
    for name, ga in (("whole", 1), ("accumulated", 2)):
        common = dict(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=8 // ga,
            gradient_accumulation_steps=ga,
            max_steps=1,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=3,
        )
        plain = Trainer(model=seeded(student_factory, 0), args=TrainingArguments(**common), train_dataset=dataset)
        plain.train()
        args = DistillationTrainingArguments(**{**common, "output_dir": str(tmp_path / f"{name}_kd")}, alpha=0.0)
        kd = DistillationTrainer(
            model=seeded(student_factory, 0),
            teacher_model=seeded(teacher_factory, 1),
            args=args,
            train_dataset=dataset,
        )
        kd.train()
        first[name] = logged(plain)[0], logged(kd)[0]
    assert first["whole"][1] == first["whole"][0]
    assert first["accumulated"][1] == pytest.approx(first["whole"][0], rel=1e-6)
    assert first["accumulated"][0] == pytest.approx(2 * first["whole"][0], rel=1e-6)


def test_alpha_zero_causal_lm_is_the_mean_over_predicted_tokens(tmp_path):
    """A causal LM's alpha = 0 loss is the mean over predicted (shifted) tokens, computed here by hand; Trainer divides
    the same sum by the unshifted label count, so the two logged losses differ by exactly unshifted / shifted."""
    student_factory, teacher_factory, _ = TASKS["causal_lm"]
    dataset = causal_lm_dataset(n=8, ragged=True)
    batch = {key: torch.tensor(dataset[key]) for key in dataset.column_names}
    labels = batch["labels"]
    unshifted, shifted = int(labels.ne(-100).sum()), int(labels[:, 1:].ne(-100).sum())
    assert unshifted == shifted + 8

    with torch.no_grad():  # the step-1 loss is computed with the initial weights
        logits = seeded(student_factory, 0)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    total = 0.0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[row, position + 1])
            if target != -100:
                total -= float(log_probs[row, position, target])
    by_hand = total / shifted

    common = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
    )
    plain = Trainer(
        model=seeded(student_factory, 0),
        train_dataset=dataset,
        args=TrainingArguments(output_dir=str(tmp_path / "plain"), **common),
    )
    plain.train()
    kd = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=seeded(teacher_factory, 1),
        train_dataset=dataset,
        args=DistillationTrainingArguments(output_dir=str(tmp_path / "kd"), alpha=0.0, **common),
    )
    kd.train()
    assert logged(kd)[0] == pytest.approx(by_hand, rel=1e-5)
    assert logged(kd)[0] / logged(plain)[0] == pytest.approx(unshifted / shifted, rel=1e-5)


# ---- evaluation without labels ----


def unlabeled_trainer(tmp_path, source, **overrides):
    """A trainer whose eval set has no labels; its teacher runs online, or only cached columns carry it."""
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    teacher = seeded(teacher_factory, 1)
    unlabeled = sequence_dataset(n=16, seed=1, labels=False)
    if source == "online":
        train_set, eval_set, teacher_model = sequence_dataset(n=16), unlabeled, teacher
    else:
        train_set = precompute_teacher_logits(teacher, sequence_dataset(n=16), batch_size=8, dtype="float32")
        eval_set = precompute_teacher_logits(teacher, unlabeled, batch_size=8, dtype="float32")
        teacher_model = None
    args = make_args(tmp_path, **{"alpha": 1.0, **overrides})
    return DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=teacher_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
    )


@pytest.mark.parametrize("source", ["online", "cached"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unlabeled_evaluation_reports_the_distillation_metrics(tmp_path, source, alpha):
    trainer = unlabeled_trainer(tmp_path, source, alpha=alpha)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_loss_kd", "eval_teacher_agreement"):
        assert key in metrics, key
    assert "eval_loss_ce" not in metrics
    # Without labels the evaluation loss is the KD term alone, whatever alpha.
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss_kd"], rel=1e-5)
    assert 0.0 <= metrics["eval_teacher_agreement"] <= 1.0
    # Predictions still come back, the student's logits.
    output = trainer.evaluation_loop(trainer.get_eval_dataloader(), "Evaluation", prediction_loss_only=False)
    assert output.predictions.shape == (16, 3) and output.label_ids is None
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(16)])
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    np.testing.assert_allclose(output.predictions, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_unlabeled_cached_data_predicts_with_a_plain_module(tmp_path):
    """A plain module's forward takes no teacher columns: prediction on cached, unlabeled data must not pass them."""
    student_factory, teacher_factory, _ = TASKS["plain_module"]
    teacher = seeded(teacher_factory, 1)
    cached = precompute_teacher_logits(
        teacher, features_dataset(n=16).remove_columns("labels"), batch_size=8, dtype="float32"
    )
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0), teacher_model=None, train_dataset=cached, args=make_args(tmp_path, alpha=1.0)
    )
    prediction = trainer.predict(cached)
    assert prediction.predictions.shape == (16, 3)
    assert "test_loss_kd" in prediction.metrics and "test_teacher_agreement" in prediction.metrics


@pytest.mark.parametrize("source", ["online", "cached"])
def test_best_model_by_loss_kd_on_unlabeled_evaluation(tmp_path, source):
    trainer = unlabeled_trainer(
        tmp_path,
        source,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss_kd",
        greater_is_better=False,
    )
    trainer.train()
    evaluations = [h for h in trainer.state.log_history if "eval_loss_kd" in h]
    assert len(evaluations) == 2
    assert trainer.state.best_metric == min(h["eval_loss_kd"] for h in evaluations)


@pytest.mark.parametrize(
    "metric, case",
    [("loss_kd", "no_teacher"), ("eval_teacher_agreement", "no_teacher"), ("loss_ce", "unlabeled")],
)
def test_metric_for_best_model_that_evaluation_cannot_produce_fails_at_construction(tmp_path, metric, case):
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    teacher = seeded(teacher_factory, 1)
    args = make_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
    )
    if case == "no_teacher":  # a cached training set, an eval set without cache, no teacher to run on it
        kwargs = dict(
            teacher_model=None,
            eval_dataset=sequence_dataset(n=8, seed=1),
            train_dataset=precompute_teacher_logits(teacher, sequence_dataset(n=8), batch_size=8),
        )
    else:
        kwargs = dict(
            teacher_model=teacher,
            train_dataset=sequence_dataset(n=8),
            eval_dataset=sequence_dataset(n=8, seed=1, labels=False),
        )
    with pytest.raises(ValueError, match=rf"metric_for_best_model='{metric}'"):
        DistillationTrainer(model=seeded(student_factory, 0), args=args, **kwargs)


# ---- bad evaluation data: errors that say what is wrong ----


def string_labels(column: str) -> datasets.Dataset:
    names = ["negative", "neutral", "positive"]
    dataset = sequence_dataset(n=8).map(lambda row: {column: names[row["labels"]]}, remove_columns=["labels"])
    return dataset


BAD_EVALUATION_DATA = {
    "empty": (lambda teacher: sequence_dataset(n=8).select([]), r"`eval_dataset` is empty"),
    "string_labels": (lambda teacher: string_labels("labels"), r"label column 'labels' holds strings.*class ids"),
    "string_label": (lambda teacher: string_labels("label"), r"label column 'label' holds strings.*class ids"),
    "iterable_cache": (
        lambda teacher: precompute_teacher_logits(teacher, sequence_dataset(n=8), batch_size=8).to_iterable_dataset(),
        r"`eval_dataset` carries cached teacher columns \['teacher_logits'.*\] without their metadata",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EVALUATION_DATA))
@pytest.mark.parametrize("when", ["construction", "evaluate"])
def test_bad_evaluation_data_says_what_is_wrong(tmp_path, case, when):
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    teacher = seeded(teacher_factory, 1)
    factory, pattern = BAD_EVALUATION_DATA[case]
    bad = factory(teacher)
    kwargs = dict(
        model=seeded(student_factory, 0),
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=sequence_dataset(n=8),
    )
    if when == "construction":
        with pytest.raises(ValueError, match=pattern):
            DistillationTrainer(**kwargs, eval_dataset=bad)
    else:
        trainer = DistillationTrainer(**kwargs)
        with pytest.raises(ValueError, match=pattern):
            trainer.evaluate(eval_dataset=bad)


class NoRows(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_an_empty_iterable_evaluation_set_says_so(tmp_path):
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=seeded(teacher_factory, 1),
        args=make_args(tmp_path),
        train_dataset=sequence_dataset(n=8),
    )
    with pytest.raises(ValueError, match="`eval_dataset` is empty"):
        trainer.evaluate(eval_dataset=NoRows())


@pytest.mark.parametrize(
    "case, with_teacher, pattern",
    [
        ("empty", True, r"`train_dataset` is empty"),
        ("string_labels", True, r"label column 'labels' holds strings"),
        ("iterable_cache", True, r"`train_dataset` carries cached teacher columns \['teacher_logits'.*\] without"),
        ("iterable_cache", False, r"`train_dataset` carries cached teacher columns \['teacher_logits'.*\] without"),
    ],
)
def test_bad_training_data_says_what_is_wrong(tmp_path, case, with_teacher, pattern):
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    teacher = seeded(teacher_factory, 1)
    if case == "empty":
        dataset = sequence_dataset(n=8).select([])
    elif case == "string_labels":
        dataset = string_labels("labels")
    else:
        dataset = precompute_teacher_logits(teacher, sequence_dataset(n=8), batch_size=8).to_iterable_dataset()
    with pytest.raises(ValueError, match=pattern):
        DistillationTrainer(
            model=seeded(student_factory, 0),
            teacher_model=teacher if with_teacher else None,
            args=make_args(tmp_path),
            train_dataset=dataset,
        ).train()


# ---- resume=True after a save that was interrupted ----


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.stream = io.StringIO()

    def emit(self, record):
        self.stream.write(record.getMessage() + "\n")


@pytest.mark.parametrize("damage", ["missing_state", "truncated_state"])
def test_resume_true_skips_an_incomplete_newest_checkpoint(tmp_path, damage):
    student_factory, teacher_factory, dataset_factory = TASKS["sequence_classification"]
    teacher, dataset = seeded(teacher_factory, 1), dataset_factory(n=48)

    def build(output_dir):
        args = make_args(tmp_path, output_dir=str(output_dir), max_steps=6, save_strategy="steps", save_steps=2)
        model = seeded(student_factory, 0)
        return DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=dataset), model

    uninterrupted, reference = build(tmp_path / "uninterrupted")
    uninterrupted.train()

    # A run killed while writing checkpoint-4: checkpoint-2 complete, checkpoint-4 without a readable trainer state
    # (Trainer writes trainer_state.json last).
    interrupted = tmp_path / "interrupted"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(tmp_path / "uninterrupted" / name, interrupted / name)
    state = interrupted / "checkpoint-4" / "trainer_state.json"
    if damage == "missing_state":
        state.unlink()
    else:
        text = state.read_text()
        state.write_text(text[: len(text) // 2])
        with pytest.raises(json.JSONDecodeError):
            json.loads(state.read_text())

    resumed, model = build(interrupted)
    capture = _Capture()
    trainer_logger = logging.getLogger("hf_distill.checkpoints")
    trainer_logger.addHandler(capture)
    try:
        resumed.train(resume_from_checkpoint=True)
    finally:
        trainer_logger.removeHandler(capture)
    message = capture.stream.getvalue()
    assert "checkpoint-4" in message and "resuming from" in message and "checkpoint-2" in message, message
    # Steps 3-6 were trained again from checkpoint-2: the history before it is the checkpoint's, the rest recomputed.
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, 7))
    assert logged(resumed) == logged(uninterrupted)
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_true_without_a_complete_checkpoint_says_which_were_skipped(tmp_path):
    student_factory, teacher_factory, dataset_factory = TASKS["sequence_classification"]
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=seeded(teacher_factory, 1),
        args=make_args(tmp_path),
        train_dataset=dataset_factory(n=16),
    )
    with pytest.raises(ValueError, match=r"No complete checkpoint in .*checkpoint-2"):
        trainer.train(resume_from_checkpoint=True)
