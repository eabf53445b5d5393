"""The chunked KD loss equals the naive `losses.masked_sum(losses.distillation_divergence(...))`, value and gradient."""

from __future__ import annotations

import pytest
import torch

from hf_distill import losses
from hf_distill.chunked import chunked_distillation_loss, default_chunk_size, divergence_and_student_gradient


JSD_BETA = 0.3
# An upstream gradient ≠ 1, as the trainer's division by the counted positions gives.
UPSTREAM = 0.37


def causal_lm_logits(batch=3, length=11, vocab=37, seed=0, dtype=torch.float32):
    """Full ``[B, L, V]`` student (a leaf) and teacher logits, and a ``[B, L-1]`` mask for the shifted positions.

    Row 0 is fully masked, row 1 has scattered masked positions (the gather path), row 2 masked padding at the end.
    """
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    mask = torch.ones(batch, length - 1, dtype=torch.bool)
    mask[0] = False
    mask[1, 1::3] = False
    mask[2, -4:] = False
    return student, teacher, mask


def loss_and_gradient(loss_fn, student, teacher, mask, **kwargs):
    """``(loss, ∂(UPSTREAM · loss)/∂student)`` of a loss of the causal-shifted views ``[:, :-1]``."""
    student.grad = None
    loss = loss_fn(student[:, :-1], teacher[:, :-1], mask, **kwargs)
    (UPSTREAM * loss).backward()
    return loss.detach(), student.grad.clone()


def naive_loss(student_logits, teacher_logits, mask, **kwargs):
    return losses.masked_sum(losses.distillation_divergence(student_logits, teacher_logits, **kwargs), mask)


def assert_close_relative(actual, expected, rtol):
    """Elementwise within ``rtol`` of the largest magnitude (tiny gradient entries carry only absolute error)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
@pytest.mark.parametrize("temperature", (1.0, 4.0))
@pytest.mark.parametrize("chunk_size", (1, 4, 7, 1000))
def test_value_and_gradient_equal_naive(loss_type, temperature, chunk_size):
    """Shifted views, masks with a fully masked batch row, chunk sizes that do not divide the rows."""
    student, teacher, mask = causal_lm_logits()
    kwargs = dict(temperature=temperature, loss_type=loss_type, jsd_beta=JSD_BETA)
    expected_loss, expected_grad = loss_and_gradient(naive_loss, student, teacher, mask, **kwargs)
    loss, grad = loss_and_gradient(chunked_distillation_loss, student, teacher, mask, chunk_size=chunk_size, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert_close_relative(grad, expected_grad, rtol=1e-5)
    assert grad[:, -1].abs().max() == 0 and grad[0].abs().max() == 0, (
        "shifted-off and masked positions get no gradient"
    )


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
def test_closed_form_gradient_matches_autograd(loss_type):
    """The derivation itself, per row, against autograd of `distillation_divergence` at a non-trivial T and β."""
    g = torch.Generator().manual_seed(5)
    student = (4 * torch.randn(6, 29, generator=g)).requires_grad_()
    teacher = 4 * torch.randn(6, 29, generator=g)
    kwargs = dict(temperature=2.5, loss_type=loss_type, jsd_beta=0.8)
    expected_values = losses.distillation_divergence(student, teacher, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected_values.sum(), student)
    values, grad = divergence_and_student_gradient(student.detach(), teacher, **kwargs)
    torch.testing.assert_close(values, expected_values.detach(), rtol=1e-5, atol=1e-6)
    assert_close_relative(grad, expected_grad, rtol=1e-5)


@pytest.mark.parametrize("loss_type", losses.DISTILLATION_LOSSES)
def test_bfloat16_inputs(loss_type):
    """Computed in float32 like the naive loss; the gradient comes back in bfloat16, within one bf16 rounding."""
    student, teacher, mask = causal_lm_logits(dtype=torch.bfloat16, seed=1)
    kwargs = dict(temperature=4.0, loss_type=loss_type, jsd_beta=JSD_BETA)
    expected_loss, expected_grad = loss_and_gradient(naive_loss, student, teacher, mask, **kwargs)
    loss, grad = loss_and_gradient(chunked_distillation_loss, student, teacher, mask, chunk_size=5, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    # The buffer is stored in bf16 before the upstream scale, so it is rounded twice where autograd rounds once.
    bf16_step = 2**-7
    torch.testing.assert_close(
        grad.float(), expected_grad.float(), rtol=bf16_step, atol=bf16_step * expected_grad.abs().max().item()
    )


def test_vocabulary_slice_with_strided_rows():
    """A ``[..., :V']`` slice (the trainer's padded-vocabulary case) has rows with a stride > V'; read as is."""
    student, teacher, mask = causal_lm_logits(seed=7)
    sliced = dict(temperature=4.0, loss_type="kl")
    expected_loss, expected_grad = loss_and_gradient(
        lambda s, t, m, **kw: naive_loss(s[..., :30], t[..., :30], m, **kw), student, teacher, mask, **sliced
    )
    loss, grad = loss_and_gradient(
        lambda s, t, m, **kw: chunked_distillation_loss(s[..., :30], t[..., :30], m, chunk_size=3, **kw),
        student,
        teacher,
        mask,
        **sliced,
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert_close_relative(grad, expected_grad, rtol=1e-5)
    assert grad[..., 30:].abs().max() == 0


def test_four_dim_non_flattening_view():
    """Leading dims that merge neither way (a transposed, shifted view): taken one index of the first dim at a time."""
    g = torch.Generator().manual_seed(8)
    full_student = torch.randn(3, 2, 6, 11, generator=g).requires_grad_()
    teacher = torch.randn(2, 3, 5, 11, generator=g)
    mask = torch.rand(2, 3, 5, generator=g) < 0.6
    kwargs = dict(temperature=4.0, loss_type="jsd", jsd_beta=JSD_BETA)
    student = full_student.transpose(0, 1)[:, :, :-1]
    expected = naive_loss(student, teacher, mask, **kwargs)
    (expected_grad,) = torch.autograd.grad(UPSTREAM * expected, full_student)
    loss = chunked_distillation_loss(student, teacher, mask, chunk_size=4, **kwargs)
    (grad,) = torch.autograd.grad(UPSTREAM * loss, full_student)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert_close_relative(grad, expected_grad, rtol=1e-5)


def test_plain_rows_and_all_masked():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(10, 13, generator=g).requires_grad_()
    teacher = torch.randn(10, 13, generator=g)
    nothing = torch.zeros(10, dtype=torch.bool)
    loss = chunked_distillation_loss(student, teacher, nothing, temperature=2.0, chunk_size=3)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max() == 0

    student.grad = None
    everything = torch.ones(10, dtype=torch.bool)
    loss = chunked_distillation_loss(student, teacher, everything, temperature=2.0, chunk_size=3)
    loss.backward()
    expected = losses.distillation_divergence(student, teacher, temperature=2.0).sum()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    paper_gradient = 2.0 * (torch.softmax(student / 2, -1) - torch.softmax(teacher / 2, -1))  # T (p − q)
    torch.testing.assert_close(student.grad, paper_gradient.detach())


def test_nonfinite_logits_at_masked_positions_stay_out():
    student, teacher, mask = causal_lm_logits(seed=3)
    with torch.no_grad():
        teacher[2, -3:] = float("nan")  # masked padding positions (and the shifted-off last one)
        student[0, 4] = float("inf")  # a fully masked row
    loss, grad = loss_and_gradient(chunked_distillation_loss, student, teacher, mask, temperature=2.0, chunk_size=4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_without_gradient_matches_and_keeps_no_buffer():
    student, teacher, mask = causal_lm_logits(seed=4)
    kwargs = dict(temperature=4.0, loss_type="jsd", jsd_beta=JSD_BETA)
    with torch.no_grad():
        loss = chunked_distillation_loss(student[:, :-1], teacher[:, :-1], mask, chunk_size=4, **kwargs)
        expected = naive_loss(student[:, :-1], teacher[:, :-1], mask, **kwargs)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_inputs_untouched_and_backward_runs_once():
    student, teacher, mask = causal_lm_logits(seed=6)
    student_before, teacher_before = student.detach().clone(), teacher.clone()
    loss = chunked_distillation_loss(student[:, :-1], teacher[:, :-1], mask, temperature=4.0, loss_type="reverse_kl")
    loss.backward(retain_graph=True)
    assert torch.equal(student.detach(), student_before) and torch.equal(teacher, teacher_before)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()  # the gradient buffer was scaled in place; a second pass must not reuse it


def test_invalid_arguments_raise():
    student, teacher = torch.zeros(2, 4, 5, requires_grad=True), torch.zeros(2, 4, 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        chunked_distillation_loss(student, teacher[..., :4], mask, temperature=1.0)
    with pytest.raises(ValueError, match="mask"):
        chunked_distillation_loss(student, teacher, mask[:, :3], temperature=1.0)
    with pytest.raises(ValueError, match="distillation loss"):
        chunked_distillation_loss(student, teacher, mask, temperature=1.0, loss_type="l1")
    with pytest.raises(ValueError, match="constants"):
        chunked_distillation_loss(student, teacher.requires_grad_(), mask, temperature=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(student, teacher.detach(), mask, temperature=1.0, chunk_size=0)
    assert default_chunk_size(32000) == 131 and default_chunk_size(10**9) == 1


def test_empty_sequences():
    """A batch of one-token sequences has nothing to predict after the causal shift."""
    student = torch.randn(2, 1, 7, requires_grad=True)
    loss = chunked_distillation_loss(
        student[:, :-1], torch.randn(2, 1, 7)[:, :-1], torch.ones(2, 0, dtype=torch.bool), temperature=2.0
    )
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().max() == 0
