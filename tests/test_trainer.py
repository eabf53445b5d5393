"""`DistillationTrainer` behaviour: loss values, Trainer parity, gradient accumulation, teacher handling, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    TASKS,
    PlainLogitsTeacher,
    PlainMLP,
    bert_config,
    causal_lm_dataset,
    features_dataset,
    gpt2_config,
    seeded,
    sequence_dataset,
)
from test_losses import reference_divergence
from transformers import (
    BertForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments


def make_args(tmp_path, **overrides) -> DistillationTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    return DistillationTrainingArguments(**{**values, **overrides})


def padding_collator():
    """Pads `input_ids`/`attention_mask` with 0 and `labels` with -100 (a tokenizer-free DataCollatorWithPadding)."""

    def collate(rows):
        length = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            if key not in rows[0]:
                continue
            values = [row[key] for row in rows]
            if isinstance(values[0], list):
                values = [v + [pad] * (length - len(v)) for v in values]
            batch[key] = torch.tensor(values)
        return batch

    return collate


# ---- 1. loss values against an independent reference, through the trainer ----


def reference_loss(student_logits, teacher_logits, labels, *, T, alpha, loss_type, shift):
    """alpha · mean_counted(T²·D) + (1 − alpha) · mean_counted(CE at T=1), with explicit loops in float64."""
    s, t, y = student_logits.double().numpy(), teacher_logits.double().numpy(), labels.numpy()
    if shift:  # the logit at position i predicts token i + 1
        s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    s, t, y = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    kd, ce, counted = 0.0, 0.0, 0
    for i in range(len(y)):
        if y[i] == -100:
            continue
        counted += 1
        kd += reference_divergence(s[i], t[i], T, loss_type)
        log_probs = s[i] - s[i].max() - math.log(np.exp(s[i] - s[i].max()).sum())
        ce -= log_probs[y[i]]
    return alpha * kd / counted + (1 - alpha) * ce / counted, kd / counted, ce / counted


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("loss_type", ["kl", "reverse_kl", "jsd", "mse"])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_equals_reference(tmp_path, task, temperature, loss_type, masked):
    student_factory, teacher_factory, dataset_factory = TASKS[task]
    student, teacher = seeded(student_factory, 0), seeded(teacher_factory, 1)
    dataset = dataset_factory(n=8)
    args = make_args(tmp_path, temperature=temperature, alpha=0.7, distillation_loss=loss_type)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    if masked:
        batch["labels"][::2] = -100 if task == "sequence_classification" else batch["labels"][::2]
        if task == "causal_lm":
            batch["labels"][:, 3:6] = -100
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        student_logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected, expected_kd, expected_ce = reference_loss(
        student_logits,
        teacher_logits,
        batch["labels"],
        T=temperature,
        alpha=0.7,
        loss_type=loss_type,
        shift=task == "causal_lm",
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6 * temperature**2)
    metrics = trainer._eval_stats.pop_means(trainer.accelerator)
    assert metrics["loss_kd"] == pytest.approx(expected_kd, rel=1e-5, abs=1e-6 * temperature**2)
    assert metrics["loss_ce"] == pytest.approx(expected_ce, rel=1e-5)


# ---- 2. alpha = 0 is plain Trainer, bit for bit ----


@pytest.mark.parametrize("task", ["sequence_classification", "plain_module"])
def test_alpha_zero_is_bit_identical_to_trainer(tmp_path, task):
    student_factory, teacher_factory, dataset_factory = TASKS[task]
    dataset = dataset_factory(n=48)
    common = dict(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=8,
        max_steps=5,
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

    distilled_model = seeded(student_factory, 0)
    args = DistillationTrainingArguments(**{**common, "output_dir": str(tmp_path / "kd")}, alpha=0.0)
    kd = DistillationTrainer(
        model=distilled_model, teacher_model=seeded(teacher_factory, 1), args=args, train_dataset=dataset
    )
    kd.train()

    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    kd_losses = [h["loss"] for h in kd.state.log_history if "loss" in h]
    assert len(plain_losses) == 5 and plain_losses == kd_losses
    for (name, a), (_, b) in zip(plain_model.state_dict().items(), distilled_model.state_dict().items()):
        assert torch.equal(a, b), name


# ---- 3. gradient accumulation ----


def one_step_update(tmp_path, name, student_factory, teacher, dataset, batch_size, accumulation, collator=None):
    model = seeded(student_factory, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # SGD: the update is proportional to the gradient, so any mis-scaling shows (Adam's first step would hide it).
    args = make_args(
        tmp_path / name,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        temperature=2.0,
        alpha=0.6,
    )
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=dataset, data_collator=collator
    )
    micro_batch_counts = []
    original = trainer.compute_loss

    def recording_compute_loss(model, inputs, **kwargs):
        micro_batch_counts.append(int(trainer._counted_positions(inputs).sum()))
        return original(model, inputs, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    update = torch.cat([(model.state_dict()[k] - before[k]).flatten().double() for k in before])
    return update, micro_batch_counts


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, task):
    student_factory, teacher_factory, _ = TASKS[task]
    teacher = seeded(teacher_factory, 1)
    if task == "causal_lm":
        dataset = causal_lm_dataset(n=16, ragged=True)  # micro-batches count different numbers of tokens
        collator = None
    else:
        dataset = sequence_dataset(n=16, ragged=True)
        collator = padding_collator()
    full, full_counts = one_step_update(tmp_path, "16x1", student_factory, teacher, dataset, 16, 1, collator)
    accumulated, counts = one_step_update(tmp_path, "4x4", student_factory, teacher, dataset, 4, 4, collator)
    assert len(full_counts) == 1 and len(counts) == 4 and sum(counts) == full_counts[0]
    if task == "causal_lm":
        assert len(set(counts)) > 1, "the test needs micro-batches with unequal token counts"
    assert full.norm() > 0
    assert ((accumulated - full).norm() / full.norm()).item() < 1e-5


# ---- 4. teacher handling, precision, logging, evaluation ----


def test_teacher_is_frozen_on_device_and_outside_the_optimizer(tmp_path):
    student, teacher = seeded(TASKS["sequence_classification"][0], 0), seeded(TASKS["sequence_classification"][1], 1)
    teacher.train()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=sequence_dataset()
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.device == trainer.args.device for p in teacher.parameters())
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher.parameters())
    assert trainer.model_wrapped is not teacher and trainer.teacher_model is teacher
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_evaluate_before_train_reports_kd_metrics(tmp_path):
    student, teacher = seeded(TASKS["sequence_classification"][0], 0), seeded(TASKS["sequence_classification"][0], 0)
    dataset = sequence_dataset(n=24)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=0.5),
        eval_dataset=dataset,
        compute_metrics=accuracy,
    )
    metrics = trainer.evaluate()
    # The teacher is a copy of the student: full agreement, zero KD term, mixed loss = half the label loss.
    assert metrics["eval_teacher_agreement"] == 1.0
    assert metrics["eval_loss_kd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(0.5 * metrics["eval_loss_ce"], rel=1e-5)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_training_logs_the_two_terms_and_the_loss_is_their_mix(tmp_path):
    student_factory, teacher_factory, dataset_factory = TASKS["sequence_classification"]
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=seeded(teacher_factory, 1),
        args=make_args(tmp_path, alpha=0.8, temperature=3.0),
        train_dataset=dataset_factory(),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for log in logs:
        assert log["loss_kd"] > 0 and log["loss_ce"] > 0
        assert log["loss"] == pytest.approx(0.8 * log["loss_kd"] + 0.2 * log["loss_ce"], rel=1e-5)


def test_bf16_autocast_reaches_the_teacher(tmp_path):
    student_factory, teacher_factory, dataset_factory = TASKS["sequence_classification"]
    teacher = seeded(teacher_factory, 1)
    dtypes = []
    teacher.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype)
    )
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=teacher,
        args=make_args(tmp_path, bf16=True, max_steps=2),
        train_dataset=dataset_factory(),
    )
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert teacher.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    assert all(math.isfinite(h["loss_kd"]) for h in trainer.state.log_history if "loss" in h)


def test_padded_causal_lm_vocabularies_use_the_tokenizers_range(tmp_path):
    vocab = {f"t{i}": i for i in range(40)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer(vocab), pad_token="t0")
    student = seeded(lambda: GPT2LMHeadModel(gpt2_config(16, vocab_size=48)), 0)
    teacher = seeded(lambda: GPT2LMHeadModel(gpt2_config(32, vocab_size=64)), 1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path),
        train_dataset=causal_lm_dataset(),
        processing_class=tokenizer,
        data_collator=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]},
    )
    assert trainer._kd_vocab_size == 40
    trainer.train()
    assert all(math.isfinite(h["loss_kd"]) for h in trainer.state.log_history if "loss" in h)


def _word_level_tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


# ---- 5. bad input: a clear error before any compute, naming the parameter ----


class NaNAfterTeacher(PlainLogitsTeacher):
    """Returns NaN logits from its `nan_from`-th call on."""

    def __init__(self, nan_from: int):
        super().__init__()
        self.calls, self.nan_from = 0, nan_from

    def forward(self, features):
        self.calls += 1
        logits = super().forward(features)
        return logits * float("nan") if self.calls >= self.nan_from else logits


BAD_ARGUMENTS = [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"distillation_loss": "cosine"}, "distillation_loss"),
    ({"jsd_beta": 0.0}, "jsd_beta"),
    ({"jsd_beta": 1.0}, "jsd_beta"),
]


@pytest.mark.parametrize("overrides, parameter", BAD_ARGUMENTS)
def test_bad_arguments_name_the_parameter(tmp_path, overrides, parameter):
    with pytest.raises(ValueError, match=parameter):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("no_teacher", "teacher_model"),
        ("num_labels_mismatch", r"teacher 5, student 3"),
        ("vocabulary_mismatch", r"teacher 64, student 40"),
        ("plain_module_mismatch", r"teacher logits \(8, 5\), student logits \(8, 3\)"),
        ("alpha_without_labels", r"alpha=0.5 .* no label column"),
        ("plain_args", "DistillationTrainingArguments"),
    ],
)
def test_bad_setups_raise_clear_errors(tmp_path, case, pattern):
    student = BertForSequenceClassification(bert_config(16))
    kwargs = dict(
        model=student,
        teacher_model=BertForSequenceClassification(bert_config(32)),
        args=make_args(tmp_path),
        train_dataset=sequence_dataset(),
    )
    if case == "no_teacher":
        kwargs["teacher_model"] = None
    elif case == "num_labels_mismatch":
        kwargs["teacher_model"] = BertForSequenceClassification(bert_config(32, num_labels=5))
    elif case == "vocabulary_mismatch":
        kwargs.update(
            model=GPT2LMHeadModel(gpt2_config(16)),
            teacher_model=GPT2LMHeadModel(gpt2_config(16, vocab_size=64)),
            train_dataset=causal_lm_dataset(),
        )
    elif case == "plain_module_mismatch":
        kwargs.update(
            model=PlainMLP(), teacher_model=PlainLogitsTeacher(num_labels=5), train_dataset=features_dataset()
        )
    elif case == "alpha_without_labels":
        kwargs.update(args=make_args(tmp_path, alpha=0.5), train_dataset=sequence_dataset(labels=False))
    elif case == "plain_args":
        kwargs["args"] = TrainingArguments(output_dir=str(tmp_path / "x"), report_to=[])
    with pytest.raises((ValueError, TypeError), match=pattern):
        DistillationTrainer(**kwargs).train()


def test_alpha_one_needs_no_labels(tmp_path):
    student_factory, teacher_factory, _ = TASKS["sequence_classification"]
    trainer = DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=seeded(teacher_factory, 1),
        args=make_args(tmp_path, alpha=1.0),
        train_dataset=sequence_dataset(labels=False),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("loss_ce" not in h and h["loss"] == pytest.approx(h["loss_kd"], rel=1e-5) for h in logs)


def test_nonfinite_teacher_logits_name_the_step(tmp_path):
    args = make_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=1)
    model = PlainMLP()
    trainer = DistillationTrainer(
        model=model, teacher_model=NaNAfterTeacher(nan_from=3), args=args, train_dataset=features_dataset()
    )
    with pytest.raises(ValueError, match="NaN or inf logits at optimizer step 3"):
        trainer.train()
    # Raised before the bad step's update: the weights and the checkpoints written so far stay finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("loss_type", ["kl", "jsd"])
def test_chunked_kd_trains_like_the_naive_loss(tmp_path, loss_type):
    """`kd_chunk_size` switches a causal LM's KD term to `hf_distill.chunked`: same losses, same weights."""
    student_factory, teacher_factory, _ = TASKS["causal_lm"]
    teacher = seeded(teacher_factory, 1)
    runs = {}
    for name, chunk_size in (("naive", 0), ("chunked", 5)):
        model = seeded(student_factory, 0)
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            train_dataset=causal_lm_dataset(n=16, ragged=True),
            args=make_args(tmp_path / name, kd_chunk_size=chunk_size, distillation_loss=loss_type, temperature=2.0),
        )
        trainer.train()
        runs[name] = (
            [h["loss"] for h in trainer.state.log_history if "loss" in h],
            torch.cat([p.detach().flatten() for p in model.parameters()]),
        )
    assert runs["chunked"][0] == pytest.approx(runs["naive"][0], rel=1e-5)
    torch.testing.assert_close(runs["chunked"][1], runs["naive"][1], rtol=1e-5, atol=1e-6)
