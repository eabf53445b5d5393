"""The KD math against an independent float64 reference, the paper's gradient, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_distill import losses


TEMPERATURES = (1.0, 4.0, 20.0)


def reference_divergence(z: np.ndarray, v: np.ndarray, T: float, loss_type: str, beta: float = 0.5) -> float:
    """T² · D(q ‖ p) for one position, written out from the definitions in float64 with explicit sums."""
    z, v = np.asarray(z, dtype=np.float64), np.asarray(v, dtype=np.float64)
    if loss_type == "mse":
        d = (z - z.mean()) - (v - v.mean())
        return float(0.5 * np.sum(d * d) / len(z))

    def softmax(x):
        e = np.exp(x / T - np.max(x / T))
        return e / e.sum()

    p, q = softmax(z), softmax(v)
    if loss_type == "kl":
        value = sum(q[i] * math.log(q[i] / p[i]) for i in range(len(z)))
    elif loss_type == "reverse_kl":
        value = sum(p[i] * math.log(p[i] / q[i]) for i in range(len(z)))
    else:
        m = beta * q + (1 - beta) * p
        value = beta * sum(q[i] * math.log(q[i] / m[i]) for i in range(len(z))) + (1 - beta) * sum(
            p[i] * math.log(p[i] / m[i]) for i in range(len(z))
        )
    return float(T * T * value)


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_divergence_matches_reference(loss_type, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(2, 5, 7, generator=g), 3 * torch.randn(2, 5, 7, generator=g)
    got = losses.distillation_divergence(student, teacher, temperature=temperature, loss_type=loss_type, jsd_beta=0.3)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    expected = np.array(
        [
            [reference_divergence(student[b, t], teacher[b, t], temperature, loss_type, 0.3) for t in range(5)]
            for b in range(2)
        ]
    )
    # float32 log-probabilities carry ~1e-7 absolute error before the T² factor scales it.
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=1e-7 * temperature**2)


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
def test_divergence_is_computed_in_float32_from_half_inputs(loss_type):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    half = losses.distillation_divergence(student.bfloat16(), teacher.bfloat16(), temperature=2.0, loss_type=loss_type)
    full = losses.distillation_divergence(
        student.bfloat16().float(), teacher.bfloat16().float(), temperature=2.0, loss_type=loss_type
    )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full)


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_zero_when_student_equals_teacher(loss_type, temperature):
    logits = 5 * torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(2))
    value = losses.distillation_divergence(logits, logits.clone(), temperature=temperature, loss_type=loss_type)
    assert value.abs().max().item() < 1e-7 * temperature**2  # float32 rounding, scaled by T²
    shifted = losses.distillation_divergence(logits + 3.0, logits, temperature=temperature, loss_type=loss_type)
    assert shifted.abs().max().item() < 1e-6 * temperature**2, (
        "softmax (and centred MSE) ignore a per-row shift of the logits"
    )


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_gradient_is_papers_formula_times_T_squared(temperature):
    """∂/∂z of the mean over counted positions of T²·KL is T (p − q) / N at counted positions, 0 elsewhere."""
    g = torch.Generator().manual_seed(3)
    student = (2 * torch.randn(2, 6, 10, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(2, 6, 10, generator=g)
    labels = torch.randint(0, 10, (2, 6), generator=g)
    labels[0, :2] = losses.IGNORE_INDEX
    mask = labels.ne(losses.IGNORE_INDEX)
    per_position = losses.distillation_divergence(student, teacher, temperature=temperature, loss_type="kl")
    (losses.masked_sum(per_position, mask) / mask.sum()).backward()

    p = torch.softmax(student.detach().double() / temperature, -1)
    q = torch.softmax(teacher.double() / temperature, -1)
    paper = (1.0 / temperature) * (p - q)  # Hinton et al. eq. 2, for the soft-target cross-entropy
    expected = temperature**2 * paper * mask[..., None] / mask.sum()
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-5, atol=1e-8 * temperature)
    assert student.grad[0, :2].abs().max() == 0


def test_mse_gradient_is_papers_high_temperature_limit():
    """The 'mse' gradient is T² · (1/(V T²)) (z − v) for zero-mean logits, whatever T."""
    g = torch.Generator().manual_seed(4)
    student = torch.randn(5, 8, generator=g)
    student = (student - student.mean(-1, keepdim=True)).requires_grad_()
    teacher = torch.randn(5, 8, generator=g)
    teacher = teacher - teacher.mean(-1, keepdim=True)
    losses.distillation_divergence(student, teacher, temperature=20.0, loss_type="mse").sum().backward()
    torch.testing.assert_close(student.grad, (student.detach() - teacher) / 8)


def test_masked_sum_ignores_nonfinite_values_at_uncounted_positions():
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    mask = torch.tensor([True, False, True, False])
    assert losses.masked_sum(values, mask).item() == 3.0


def test_unknown_loss_and_shape_mismatch_raise():
    with pytest.raises(ValueError, match="distillation loss"):
        losses.distillation_divergence(torch.zeros(2, 3), torch.zeros(2, 3), temperature=1.0, loss_type="l1")
    with pytest.raises(ValueError, match="same shape"):
        losses.distillation_divergence(torch.zeros(2, 3), torch.zeros(2, 4), temperature=1.0)
