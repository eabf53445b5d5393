"""Bad or risky input found by an adversarial pass: a clear, early error (or a correct result), never a silent one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TASKS, seeded, sequence_dataset
from test_losses import reference_divergence
from test_trainer import make_args
from transformers import BertForSequenceClassification

from hf_distill import DistillationTrainer, distillation_divergence, precompute_teacher_logits
from hf_distill.chunked import chunked_distillation_loss


# ---- a student that is, or shares a module with, its teacher ----


def test_same_model_as_student_and_teacher_is_refused(tmp_path):
    student = seeded(TASKS["sequence_classification"][0], 0)
    with pytest.raises(ValueError, match="same model.*deepcopy"):
        DistillationTrainer(
            model=student, teacher_model=student, args=make_args(tmp_path), train_dataset=sequence_dataset(n=8)
        )


@pytest.mark.parametrize("how", ["module", "storage"])
def test_module_shared_with_the_teacher_is_refused_and_nothing_is_frozen(tmp_path, how):
    """'Init by reuse' without a copy would train with the shared embeddings frozen (they stayed exactly as they were)."""
    teacher = seeded(TASKS["sequence_classification"][1], 1)
    student = BertForSequenceClassification(copy.deepcopy(teacher.config))
    if how == "module":
        student.bert.embeddings = teacher.bert.embeddings
        match = "bert.embeddings.word_embeddings.weight.*copy.deepcopy"
    else:
        student.bert.pooler.dense.weight.data = teacher.bert.pooler.dense.weight.data
        match = "bert.pooler.dense.weight"
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=sequence_dataset(n=8)
        )
    assert all(p.requires_grad for p in student.parameters()), "the refused teacher must not have been frozen"


def test_a_copied_module_trains_while_the_teachers_stays(tmp_path):
    teacher = seeded(TASKS["sequence_classification"][1], 1)
    student = BertForSequenceClassification(copy.deepcopy(teacher.config))
    student.bert.embeddings = copy.deepcopy(teacher.bert.embeddings)
    before = teacher.bert.embeddings.word_embeddings.weight.detach().clone()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=sequence_dataset(n=16),
        args=make_args(tmp_path, learning_rate=1e-2, max_steps=2),
    )
    trainer.train()
    assert not torch.equal(student.bert.embeddings.word_embeddings.weight.detach(), before)
    assert torch.equal(teacher.bert.embeddings.word_embeddings.weight.detach(), before)


# ---- settings that would be ignored ----


@pytest.mark.parametrize("name", ["temperature_end", "alpha_end"])
def test_end_value_without_a_schedule_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=f"`{name}=0.5` has no effect.*'linear' or 'cosine'"):
        make_args(tmp_path, **{name: 0.5})


def test_teacher_weights_with_one_teacher_are_refused(tmp_path):
    student, teacher = seeded(TASKS["sequence_classification"][0], 0), seeded(TASKS["sequence_classification"][1], 1)
    with pytest.raises(ValueError, match="teacher_weights.*one teacher"):
        make_args(tmp_path, teacher_weights=[1.0])
    args = make_args(tmp_path, teacher_weights=[0.3, 0.7])  # fine for a two-teacher ensemble, not for one teacher
    with pytest.raises(ValueError, match="teacher_weights.*one teacher"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=sequence_dataset(n=8))
    with pytest.raises(ValueError, match="teacher_weights.*one teacher"):
        precompute_teacher_logits(teacher, sequence_dataset(n=8), teacher_weights=[1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_weights_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="teacher_weights.*finite"):
        make_args(tmp_path, teacher_weights=[0.5, bad])


def test_missing_teacher_path_says_so(tmp_path):
    student = seeded(TASKS["sequence_classification"][0], 0)
    missing = str(tmp_path / "no" / "such" / "teacher")
    with pytest.raises(ValueError, match="teacher path .* does not exist"):
        DistillationTrainer(
            model=student, teacher_model=missing, args=make_args(tmp_path), train_dataset=sequence_dataset(n=8)
        )


# ---- extreme temperatures ----


@pytest.mark.parametrize("loss_type", ["kl", "reverse_kl", "jsd"])
def test_high_temperatures_stay_accurate(loss_type):
    """At T = 1000 float32 rounding times T² made reverse KL and JSD of nearly equal distributions negative; above
    T = 20 they are computed in float64, on the naive and the chunked path."""
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(6, 50, generator=g)
    student = (teacher + 0.05 * torch.randn(6, 50, generator=g)).requires_grad_()
    for temperature in (100.0, 1000.0):
        values = distillation_divergence(student, teacher, temperature=temperature, loss_type=loss_type)
        expected = [reference_divergence(student[i].detach(), teacher[i], temperature, loss_type) for i in range(6)]
        assert (values >= 0).all()
        np.testing.assert_allclose(values.detach().numpy(), expected, rtol=1e-4)
        mask = torch.ones(6, dtype=torch.bool)
        chunked = chunked_distillation_loss(
            student, teacher, mask, temperature=temperature, loss_type=loss_type, chunk_size=4
        )
        assert chunked.item() == pytest.approx(sum(expected), rel=1e-4)
        (gradient,) = torch.autograd.grad(chunked, student)
        (expected_gradient,) = torch.autograd.grad(values.sum(), student)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["temperature", "temperature_end"])
def test_temperature_beyond_the_bound_is_refused(tmp_path, name):
    extra = {"temperature_schedule": "linear"} if name == "temperature_end" else {}
    with pytest.raises(ValueError, match=f"`{name}`=1000000.0 is above 1000.*'mse'"):
        make_args(tmp_path, **{name: 1e6}, **extra)


def test_a_collator_that_makes_labels_is_not_refused_for_lack_of_a_label_column(tmp_path):
    """`DataCollatorForLanguageModeling` masks tokens and labels them: a dataset of input ids alone is valid at
    alpha < 1 (the default collator still gets the early error)."""
    from conftest import VOCAB_SIZE, bert_config
    from tokenizers import Tokenizer, models
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB_SIZE - 2)} | {"[PAD]": VOCAB_SIZE - 2, "[MASK]": VOCAB_SIZE - 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[PAD]")), pad_token="[PAD]", mask_token="[MASK]"
    )
    dataset = sequence_dataset(n=16, labels=False)
    student, teacher = BertForMaskedLM(bert_config(16)), BertForMaskedLM(bert_config(32))
    with pytest.raises(ValueError, match="no label column"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.5), train_dataset=dataset
        )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=0.5, max_steps=2),
        train_dataset=dataset,
        data_collator=collator,
    )
    trainer.train()
    assert [h["loss_ce"] for h in trainer.state.log_history if "loss_ce" in h]
