"""The fused lm_head + KD loss equals the naive path (full logits → the existing loss functions → autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_distill import losses
from hf_distill.fused import fused_linear_distillation_loss


JSD_BETA = 0.3
UPSTREAM = 0.37  # an upstream gradient ≠ 1, as the trainer's division by the counted positions gives
N, H, H_TEACHER, VOCAB, PADDED, K = 13, 8, 6, 29, 32, 5


def head(hidden, weight, bias, scale, softcap):
    logits = F.linear(hidden, weight, bias)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def make_inputs(seed=0, bias=True, vocab=VOCAB, head_rows=VOCAB):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(head_rows, H, generator=g) / 2).requires_grad_()
    student_bias = torch.randn(head_rows, generator=g).requires_grad_() if bias else None
    teacher_hidden = torch.randn(N, H_TEACHER, generator=g)
    teacher_weight = torch.randn(head_rows + 3, H_TEACHER, generator=g) / 2  # a teacher padded differently
    teacher_bias = torch.randn(head_rows + 3, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[1, 4, 5, 11]] = False
    labels = torch.randint(0, head_rows, (N,), generator=g)
    labels[[1, 4, 5, 7]] = losses.IGNORE_INDEX  # row 7 counts for KD but has no label
    return dict(
        student_hidden=student_hidden,
        student_weight=weight,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        mask=mask,
        labels=labels,
    )


def naive(inputs, *, source, kd_weight, ce_weight, temperature, loss_type, vocab_size, scale, softcap, use_labels):
    """The trainer's naive computation on full logits: (loss, kd_sum, ce_sum)."""
    student = head(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], scale, softcap)
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 0.5, 7.0).detach()
    kwargs = dict(temperature=temperature, loss_type=loss_type, jsd_beta=JSD_BETA)
    student_kd, teacher_kd = student[:, :vocab_size], teacher[:, :vocab_size]
    if source.startswith("top_k"):
        log_probs = teacher_kd.log_softmax(-1)
        top = log_probs.topk(K, dim=-1)
        if source == "top_k_tail":
            tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
            student_kd, teacher_kd = losses.top_k_tail_logits(student_kd, top.indices, top.values, tail, temperature)
        else:
            student_kd, teacher_kd = student_kd.gather(-1, top.indices), top.values
    kd_sum = losses.masked_sum(losses.distillation_divergence(student_kd, teacher_kd, **kwargs), inputs["mask"])
    ce_sum = (
        F.cross_entropy(student.float(), inputs["labels"], ignore_index=losses.IGNORE_INDEX, reduction="sum")
        if use_labels
        else torch.zeros(())
    )
    return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum


def teacher_arguments(inputs, source, vocab_size):
    """The teacher signal as `fused_linear_distillation_loss` takes it, for each source."""
    if source == "online":
        return dict(
            teacher_hidden=inputs["teacher_hidden"],
            teacher_weight=inputs["teacher_weight"],
            teacher_bias=inputs["teacher_bias"],
            teacher_logit_scale=0.5,
            teacher_softcap=7.0,
        )
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 0.5, 7.0)
    teacher = teacher[:, :vocab_size]
    if source == "cache":
        return dict(teacher_logits=teacher)
    top = teacher.log_softmax(-1).topk(K, dim=-1)
    arguments = dict(top_k_ids=top.indices, top_k_logprobs=top.values)
    if source == "top_k_tail":
        arguments["top_k_tail"] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return arguments


def gradients(loss, inputs):
    tensors = [inputs["student_hidden"], inputs["student_weight"]]
    if inputs["student_bias"] is not None:
        tensors.append(inputs["student_bias"])
    return torch.autograd.grad(UPSTREAM * loss, tensors)


def assert_close_relative(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1e-30))


CASES = [
    # (source, loss_type, temperature, kd_weight, ce_weight, padded, scale, softcap, bias, chunk_size)
    ("online", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("online", "reverse_kl", 1.0, 1.0, 0.0, True, 1.0, None, False, 3),
    ("online", "jsd", 3.0, 0.5, 0.5, True, 0.8, 5.0, True, 5),
    ("online", "mse", 2.0, 0.7, 0.3, False, 1.0, 4.0, True, 100),
    ("cache", "kl", 1.0, 0.9, 0.1, True, 1.3, None, True, 1),
    ("cache", "reverse_kl", 2.0, 0.6, 0.4, False, 1.0, 6.0, False, 4),
    ("cache", "jsd", 1.0, 1.0, 0.0, False, 1.0, None, True, 7),
    ("cache", "mse", 4.0, 0.2, 0.8, True, 1.0, None, True, 2),
    ("top_k", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("top_k", "jsd", 1.0, 1.0, 0.0, True, 1.0, 5.0, True, 3),
    ("top_k_tail", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("top_k_tail", "reverse_kl", 1.0, 0.5, 0.5, True, 0.7, 6.0, False, 6),
    ("top_k_tail", "mse", 3.0, 1.0, 0.0, False, 1.0, None, True, 5),
    ("top_k_tail", "jsd", 2.0, 0.8, 0.2, False, 1.0, None, True, 100),
    ("online", "kl", 50.0, 0.9, 0.1, False, 1.0, None, True, 4),  # float64 above T = 20: autograd per chunk
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[:5])))
def test_value_and_gradients_equal_naive(case):
    source, loss_type, temperature, kd_weight, ce_weight, padded, scale, softcap, bias, chunk_size = case
    inputs = make_inputs(bias=bias, head_rows=PADDED if padded else VOCAB)
    vocab_size = VOCAB
    settings = dict(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, loss_type=loss_type)
    use_labels = True
    expected, expected_kd, expected_ce = naive(
        inputs, source=source, vocab_size=vocab_size, scale=scale, softcap=softcap, use_labels=use_labels, **settings
    )
    expected_grads = gradients(expected, inputs)
    result = fused_linear_distillation_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["student_bias"],
        inputs["mask"],
        labels=inputs["labels"],
        jsd_beta=JSD_BETA,
        vocab_size=vocab_size if padded or source == "online" else None,
        student_logit_scale=scale,
        student_softcap=softcap,
        chunk_size=chunk_size,
        **teacher_arguments(inputs, source, vocab_size),
        **settings,
    )
    torch.testing.assert_close(result.loss, expected.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.kd_sum, expected_kd.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.ce_sum, expected_ce.float(), rtol=1e-5, atol=0)
    assert not result.teacher_nonfinite and not result.kd_sum.requires_grad
    for actual, wanted in zip(gradients(result.loss, inputs), expected_grads):
        assert_close_relative(actual, wanted)


def test_without_labels_and_unmasked_rows_never_read():
    """No label term; NaN in the hidden states and teacher logits of rows that do not count stays out (the naive
    reference runs on the clean inputs: through a matmul its own weight gradient would turn NaN)."""
    inputs = make_inputs()
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 1.0, None)[:, :VOCAB]
    student = head(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], 1.0, None)
    values = losses.distillation_divergence(student, teacher, temperature=2.0, loss_type="kl")
    expected = losses.masked_sum(values, inputs["mask"])
    expected_grads = gradients(expected, inputs)
    with torch.no_grad():
        inputs["student_hidden"][1] = float("nan")
    teacher[1] = float("nan")
    result = fused_linear_distillation_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["student_bias"],
        inputs["mask"],
        teacher_logits=teacher,
        temperature=2.0,
        chunk_size=3,
    )
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=0)
    assert result.ce_sum == 0 and not result.teacher_nonfinite
    for actual, wanted in zip(gradients(result.loss, inputs), expected_grads):
        assert_close_relative(actual, wanted)


def test_nonfinite_teacher_on_a_counted_row_is_reported():
    inputs = make_inputs()
    teacher = torch.zeros(N, VOCAB)
    teacher[0, 3] = float("inf")
    result = fused_linear_distillation_loss(
        inputs["student_hidden"], inputs["student_weight"], teacher_logits=teacher, chunk_size=4
    )
    assert result.teacher_nonfinite


def test_tied_embeddings_and_bfloat16():
    """A head tied to the input embedding gets both gradients; bf16 inputs give bf16 gradients close to float32's."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(VOCAB, H)
    tokens = torch.randint(0, VOCAB, (N,))
    teacher = torch.randn(N, VOCAB)
    labels = torch.randint(0, VOCAB, (N,))

    def run(fused):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(tokens))
        if fused:
            loss = fused_linear_distillation_loss(
                hidden, embedding.weight, teacher_logits=teacher, labels=labels, ce_weight=0.5, chunk_size=5
            ).loss
        else:
            logits = F.linear(hidden, embedding.weight)
            kd = losses.distillation_divergence(logits, teacher, temperature=1.0).sum()
            loss = kd + 0.5 * F.cross_entropy(logits, labels, reduction="sum")
        loss.backward()
        return loss.detach(), embedding.weight.grad.clone()

    (fused_loss, fused_grad), (naive_loss, naive_grad) = run(True), run(False)
    torch.testing.assert_close(fused_loss, naive_loss, rtol=1e-5, atol=0)
    assert_close_relative(fused_grad, naive_grad)

    hidden = torch.randn(N, H, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(VOCAB, H, dtype=torch.bfloat16, requires_grad=True)
    result = fused_linear_distillation_loss(hidden, weight, teacher_logits=teacher.bfloat16(), chunk_size=4)
    result.loss.backward()
    assert result.loss.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    reference_hidden = hidden.detach().float().requires_grad_()
    reference = losses.distillation_divergence(
        F.linear(reference_hidden, weight.detach().float()), teacher.bfloat16().float(), temperature=1.0
    ).sum()
    reference.backward()
    torch.testing.assert_close(result.loss, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad, rtol=2e-2, atol=1e-2)


def test_no_grad_gives_the_values():
    inputs = make_inputs()
    with torch.no_grad():
        result = fused_linear_distillation_loss(
            inputs["student_hidden"],
            inputs["student_weight"],
            inputs["student_bias"],
            inputs["mask"],
            labels=inputs["labels"],
            ce_weight=0.5,
            **teacher_arguments(inputs, "online", VOCAB),
            vocab_size=VOCAB,
        )
    expected, _, _ = naive(
        inputs,
        source="online",
        kd_weight=1.0,
        ce_weight=0.5,
        temperature=1.0,
        loss_type="kl",
        vocab_size=VOCAB,
        scale=1.0,
        softcap=None,
        use_labels=True,
    )
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=0)


def test_bad_arguments_are_named():
    inputs = make_inputs()
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    with pytest.raises(ValueError, match="exactly one teacher signal"):
        fused_linear_distillation_loss(hidden, weight)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB + 1))
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB), vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="Unknown distillation loss"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB), loss_type="nope")
