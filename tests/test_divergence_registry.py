"""The divergence registry: a user-defined divergence trains on the naive and the chunked path and equals a hand
computation; built-ins are registered once with their closed forms; bad names fail early."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TASKS, causal_lm_dataset, seeded
from test_trainer import make_args

from hf_distill import (
    DISTILLATION_LOSSES,
    DistillationTrainer,
    DistillationTrainingArguments,
    chunked_distillation_loss,
    distillation_divergence,
    get_distillation_loss,
    register_distillation_loss,
)
from hf_distill.chunked import divergence_and_student_gradient


def total_variation(student_logits, teacher_logits, temperature):
    """T² · ½ Σ |q − p|: total variation distance of the tempered distributions."""
    p = torch.softmax(student_logits / temperature, dim=-1)
    q = torch.softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * 0.5 * (q - p).abs().sum(-1)


def reference_total_variation(z, v, temperature):
    """The same, for one position, in float64 with explicit loops."""
    z, v = np.asarray(z, dtype=np.float64) / temperature, np.asarray(v, dtype=np.float64) / temperature
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    q = np.exp(v - v.max()) / np.exp(v - v.max()).sum()
    return temperature**2 * 0.5 * sum(abs(q[i] - p[i]) for i in range(len(z)))


@pytest.fixture
def tvd():
    register_distillation_loss("tvd", total_variation, formula="T² · ½ Σ|q − p|", description="total variation")
    yield "tvd"
    DISTILLATION_LOSSES.pop("tvd", None)


def test_builtins_are_registered_with_closed_forms():
    assert list(DISTILLATION_LOSSES)[:4] == ["kl", "reverse_kl", "jsd", "mse"]
    for name in ("kl", "reverse_kl", "jsd", "mse"):
        entry = get_distillation_loss(name)
        assert entry.value_and_gradient is not None and entry.formula and entry.description
    assert get_distillation_loss("jsd").options == ("jsd_beta",) and get_distillation_loss("kl").options == ()


def test_user_divergence_matches_hand_reference(tvd):
    g = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(4, 9, generator=g), 3 * torch.randn(4, 9, generator=g)
    got = distillation_divergence(student, teacher, temperature=2.0, loss_type=tvd)
    expected = [reference_total_variation(student[i], teacher[i], 2.0) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_user_divergence_on_the_chunked_path_equals_naive(tvd):
    """No closed form given: the chunked path differentiates each chunk by autograd; same value and gradient."""
    g = torch.Generator().manual_seed(1)
    student = (2 * torch.randn(3, 6, 11, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(3, 6, 11, generator=g)
    mask = torch.rand(3, 5, generator=g) < 0.7
    naive = torch.where(
        mask, distillation_divergence(student[:, :-1], teacher[:, :-1], temperature=3.0, loss_type=tvd), 0
    ).sum()
    (naive_grad,) = torch.autograd.grad(naive, student)
    chunked = chunked_distillation_loss(
        student[:, :-1], teacher[:, :-1], mask, temperature=3.0, loss_type=tvd, chunk_size=4
    )
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    expected = sum(
        reference_total_variation(student[b, t].detach(), teacher[b, t], 3.0)
        for b in range(3)
        for t in range(5)
        if mask[b, t]
    )
    assert chunked.item() == pytest.approx(expected, rel=1e-5)
    assert naive.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(chunked_grad, naive_grad, rtol=1e-5, atol=1e-7)


def test_user_closed_form_is_used_by_the_chunked_path():
    calls = []

    def scaled_kl(student_logits, teacher_logits, temperature):
        """2 · the built-in forward KL."""
        return 2 * get_distillation_loss("kl").value(student_logits, teacher_logits, temperature)

    def scaled_kl_value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out):
        calls.append(student_logits.shape)
        values, gradient = get_distillation_loss("kl").value_and_gradient(
            student_logits, teacher_logits, temperature, workspace, gradient_out
        )
        return 2 * values, gradient.mul_(2)

    register_distillation_loss("scaled_kl", scaled_kl, value_and_gradient=scaled_kl_value_and_gradient)
    try:
        g = torch.Generator().manual_seed(2)
        student, teacher = torch.randn(5, 7, generator=g).requires_grad_(), torch.randn(5, 7, generator=g)
        values, gradient = divergence_and_student_gradient(
            student.detach(), teacher, temperature=2.0, loss_type="scaled_kl"
        )
        (expected,) = torch.autograd.grad(scaled_kl(student, teacher, 2.0).sum(), student)
        assert calls and torch.allclose(gradient, expected, rtol=1e-5, atol=1e-7)
    finally:
        DISTILLATION_LOSSES.pop("scaled_kl")


def test_user_divergence_trains_alike_on_both_paths(tmp_path, tvd):
    """Through the trainer: the first logged loss equals the hand reference; naive and chunked runs agree."""
    student_factory, teacher_factory, _ = TASKS["causal_lm"]
    teacher = seeded(teacher_factory, 1)
    dataset = causal_lm_dataset(n=16, ragged=True)
    runs = {}
    for name, chunk_size in (("naive", 0), ("chunked", 5)):
        model = seeded(student_factory, 0)
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            train_dataset=dataset,
            args=make_args(
                tmp_path / name,
                kd_chunk_size=chunk_size,
                distillation_loss=tvd,
                alpha=1.0,
                temperature=2.0,
                per_device_train_batch_size=16,
                max_steps=3,
                learning_rate=1e-2,
            ),
        )
        if name == "naive":  # the step-1 loss by hand, from the initial weights
            batch = trainer.data_collator([dataset[i] for i in range(16)])
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                s, t = model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            values = [
                reference_total_variation(s[b, i], t[b, i], 2.0)
                for b in range(16)
                for i in range(labels.shape[1])
                if labels[b, i] != -100
            ]
            expected_first = float(np.mean(values))
        trainer.train()
        runs[name] = (
            [h["loss"] for h in trainer.state.log_history if "loss" in h],
            torch.cat([p.detach().flatten() for p in model.parameters()]),
        )
    assert runs["naive"][0][0] == pytest.approx(expected_first, rel=1e-4)
    assert runs["chunked"][0] == pytest.approx(runs["naive"][0], rel=1e-5)
    # Adam at lr 1e-2 turns float32 rounding of the two paths' gradients into ~1e-6 weight differences.
    torch.testing.assert_close(runs["chunked"][1], runs["naive"][1], rtol=1e-5, atol=1e-5)


def test_callable_distillation_loss_is_registered_by_name(tmp_path):
    def half_mse(student_logits, teacher_logits, temperature):
        """Half the built-in logit MSE."""
        return 0.5 * get_distillation_loss("mse").value(student_logits, teacher_logits, temperature)

    try:
        args = make_args(tmp_path, distillation_loss=half_mse)
        assert args.distillation_loss == "half_mse" and get_distillation_loss("half_mse").value is half_mse
        assert "Half the built-in" in get_distillation_loss("half_mse").description
    finally:
        DISTILLATION_LOSSES.pop("half_mse", None)


def test_bad_names_fail_early(tmp_path):
    with pytest.raises(ValueError, match="distillation_loss.*'l1'.*register_distillation_loss"):
        make_args(tmp_path, distillation_loss="l1")
    with pytest.raises(ValueError, match="needs a name"):
        make_args(tmp_path, distillation_loss=lambda s, t, temperature: (s - t).abs().sum(-1))
    with pytest.raises(ValueError, match="already registered"):
        register_distillation_loss("kl", total_variation)


def test_registered_name_parses_from_the_command_line(tvd):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--distillation_loss", "tvd", "--use_cpu", "true", "--report_to", "none"]
    )
    assert args.distillation_loss == "tvd"
