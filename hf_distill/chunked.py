"""Token-level distillation at bounded memory: the KD loss computed over chunks of positions.

For a causal LM the KD term compares ``[N, V]`` logits of teacher and student (``N`` counted tokens, ``V`` the
vocabulary). :func:`hf_distill.losses.distillation_divergence` upcasts both to float32, takes both log-softmaxes and
lets autograd keep them (and their elementwise products) for the backward: about five float32 ``[N, V]`` tensors at
once on top of the logits themselves (≈ 5 GiB at N = 8192, V = 32000). :func:`chunked_distillation_loss` computes the same sum

    Σ_{counted n} T² · D(q_n ‖ p_n)        (``p = softmax(z / T)`` student, ``q = softmax(v / T)`` teacher)

``chunk_size`` positions at a time, and with each chunk's value it writes that chunk's gradient with respect to the
student logits into one ``[N, V]`` buffer of the student's dtype. Backward then only scales that buffer by the incoming
gradient, in place. Its extra memory is therefore the gradient the student's logits need anyway, plus four float32
``[chunk_size, V]`` work tensors reused by every chunk (measured: 0.25 × the naive loss's peak at N = 8192, V = 32000,
in 0.6 × its time; `benchmarks/bench_kd_memory.py`).

When the logits are views of larger tensors (the causal shift ``logits[..., :-1, :]``), autograd's backward of the view
still builds a zero-filled gradient of the whole ``[B, L, V]`` tensor and copies this one into it, as it does for the
naive loss: one more ``[B, L, V]`` tensor in backward, outside this function's control.

Each divergence's closed-form gradient lives with its value in :mod:`hf_distill.divergences` (one entry per
divergence). A divergence registered without one is differentiated by autograd one chunk at a time: the same value and
gradient, at the cost of autograd's intermediates for one chunk (a few float32 ``[chunk_size, V]`` tensors) and one
extra pass over each chunk.

The teacher logits are constants (the trainer computes them under ``no_grad``); positions outside ``mask`` contribute
neither value nor gradient, and are never read, so a NaN/inf there (padding) stays out as with
:func:`hf_distill.losses.masked_sum`.

The *fused* variant, :mod:`hf_distill.fused` (the idea of Liger's ``LigerFusedLinearJSD``), starts one step
earlier: from the student's last hidden state ``[N, H]`` and ``lm_head`` weight ``[V, H]`` it forms the logits chunk
by chunk with this module's per-chunk closed forms, and returns gradients for the hidden state, the weight and the
bias. It removes the remaining ``[N, V]`` tensors (the student's logits, their gradient, and the teacher's logits when
the teacher is an online causal LM too), which matters once those dominate: e.g. N = 64K tokens at V = 152K is
≈ 40 GiB per float32 ``[N, V]`` tensor. Since transformers models always materialise ``logits`` unless called with
``logits_to_keep``, `DistillationTrainer` uses it only on causal-LM training steps (``kd_fuse_lm_head``), where it calls
the models with ``logits_to_keep=1`` and ``output_hidden_states=True``; this module serves every other case.
"""

from __future__ import annotations

import torch

from .divergences import Divergence, compute_dtype, get_distillation_loss
from .losses import DistillationLossType, distillation_divergence, masked_sum


# About 4M float32 elements (16 MiB) per work tensor: small against an [N, V] buffer, large enough that the per-chunk
# Python overhead is negligible next to the exp/log of a chunk.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one float32 ``[chunk_size, V]`` work tensor holds about 4M elements (at least 1 row)."""
    return max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


def divergence_and_student_gradient(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    loss_type: DistillationLossType | Divergence,
    jsd_beta: float = 0.5,
    workspace: torch.Tensor | None = None,
    gradient_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``T² · D(q ‖ p)`` and its gradient with respect to the student logits.

    In closed form when the divergence has one (`Divergence.value_and_gradient`), else — and above
    `hf_distill.divergences.FLOAT64_ABOVE_TEMPERATURE`, where the value is computed in float64 — by autograd on these
    rows.

    Args:
        student_logits: ``[..., V]`` student logits, ``C`` rows in all (any float dtype; computed in float32; never
            modified).
        teacher_logits: ``[..., V]`` teacher logits, same shape.
        temperature, loss_type, jsd_beta: as in :func:`hf_distill.losses.distillation_divergence`.
        workspace: optional float32 ``[4, ≥C, V]`` scratch space, reused across chunks. Every intermediate of a closed
            form is written into it, so a chunk allocates nothing ``[C, V]``-sized: freeing and re-allocating such
            tensors for every chunk makes the allocator return them to the OS and fault them in again, which more than
            doubled the time per element on CPU.
        gradient_out: optional float32 ``[..., V]`` tensor that receives the gradient (e.g. a slice of the caller's
            gradient buffer, sparing a copy).

    Returns:
        ``(values [...], gradient [..., V])``, both float32: ``values`` equals ``distillation_divergence(...)`` and
        ``gradient`` (``gradient_out`` when given) is ``∂ values.sum() / ∂ student_logits``.
    """
    divergence = get_distillation_loss(loss_type)
    options = divergence.select_options({"jsd_beta": jsd_beta})
    shape, vocab_size = student_logits.shape, student_logits.shape[-1]
    if gradient_out is None:
        gradient_out = torch.empty(shape, dtype=torch.float32, device=student_logits.device)
    dtype = compute_dtype(temperature, student_logits.device)
    if divergence.value_and_gradient is None or dtype != torch.float32:
        with torch.enable_grad():
            rows = student_logits.detach().to(dtype).requires_grad_(True)
            values = divergence.value(rows, teacher_logits.to(dtype), temperature, **options)
            (gradient,) = torch.autograd.grad(values.sum(), rows)
        return values.detach().float(), gradient_out.copy_(gradient)
    num_rows = student_logits.numel() // vocab_size
    if workspace is None:
        workspace = torch.empty(4, num_rows, vocab_size, dtype=torch.float32, device=student_logits.device)
    views = tuple(buffer[:num_rows].view(shape) for buffer in workspace)
    return divergence.value_and_gradient(student_logits, teacher_logits, temperature, views, gradient_out, **options)


def _as_sequences(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Views ``[E, R, V]`` (``E`` sequences of ``R`` rows) of same-shape ``[..., V]`` tensors, covering their rows in
    row-major order, grouped alike for all of them.

    One group in the usual cases: tensors whose rows flatten (``[1, N, V]``), or ``[B, L', V]`` slices such as the
    causal shift ``logits[:, :-1]`` (whose rows do not flatten across sequences). Otherwise one group per index of the
    first dim. Nothing is copied.
    """
    vocab_size = tensors[0].shape[-1]
    shapes = [(1, -1, vocab_size)]
    if tensors[0].dim() >= 3:
        shapes.append((-1, tensors[0].shape[-2], vocab_size))
    for shape in shapes:
        try:
            return [tuple(tensor.view(shape) for tensor in tensors)]
        except RuntimeError:
            pass
    per_index = zip(*(tensor.unbind(0) for tensor in tensors))
    return [group for sub_tensors in per_index for group in _as_sequences(*sub_tensors)]


def _chunks(num_sequences: int, num_rows: int, chunk_size: int):
    """``(sequence slice, row slice)`` pairs of at most ``chunk_size`` rows: whole sequences when they fit, so a chunk
    spans several of them (fewer, larger kernel calls); otherwise pieces of one sequence."""
    if num_sequences == 0 or num_rows == 0:
        return
    if num_rows <= chunk_size:
        step = chunk_size // num_rows
        for start in range(0, num_sequences, step):
            yield slice(start, min(start + step, num_sequences)), slice(None)
    else:
        for sequence in range(num_sequences):
            for start in range(0, num_rows, chunk_size):
                yield slice(sequence, sequence + 1), slice(start, start + chunk_size)


class _ChunkedDistillationLoss(torch.autograd.Function):
    """Sum of ``T² · D`` over counted rows; the gradient is computed chunk by chunk during forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, mask, temperature, loss_type, jsd_beta, chunk_size):
        vocab_size = student_logits.shape[-1]
        needs_gradient = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        kwargs = dict(temperature=temperature, loss_type=loss_type, jsd_beta=jsd_beta)
        if needs_gradient:
            # Contiguous, so it takes any [E, R, V] view; the returned gradient need not share the input's strides.
            gradient = torch.zeros(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
            # One scratch space for all chunks (see `divergence_and_student_gradient`).
            workspace = torch.empty(
                4, min(chunk_size, mask.numel()), vocab_size, dtype=torch.float32, device=student_logits.device
            )

        mask_offset = 0
        flat_mask = mask.reshape(-1)
        tensors = (student_logits, teacher_logits, gradient) if needs_gradient else (student_logits, teacher_logits)
        for student_group, teacher_group, *gradient_group in _as_sequences(*tensors):
            num_sequences, num_rows, _ = student_group.shape
            group_mask = flat_mask[mask_offset : mask_offset + num_sequences * num_rows].view(num_sequences, num_rows)
            mask_offset += num_sequences * num_rows
            for sequences, rows in _chunks(num_sequences, num_rows, chunk_size):
                chunk_mask = group_mask[sequences, rows]
                if not chunk_mask.any():
                    continue
                student_chunk, teacher_chunk = student_group[sequences, rows], teacher_group[sequences, rows]
                if not needs_gradient:
                    values = distillation_divergence(student_chunk, teacher_chunk, **kwargs)
                    total += masked_sum(values, chunk_mask)
                    continue
                gradient_chunk = gradient_group[0][sequences, rows]
                # A float32 buffer takes the gradient directly; otherwise it is written by copy (and cast).
                in_place = gradient.dtype == torch.float32
                values, chunk_gradient = divergence_and_student_gradient(
                    student_chunk,
                    teacher_chunk,
                    workspace=workspace,
                    gradient_out=gradient_chunk if in_place else None,
                    **kwargs,
                )
                # Uncounted rows (padding) were computed with the rest, cheaper than gathering the counted ones; their
                # values and gradients are dropped here, NaN/inf included.
                total += masked_sum(values, chunk_mask)
                if not chunk_mask.all():
                    chunk_gradient.masked_fill_(~chunk_mask[..., None], 0)
                if not in_place:
                    gradient_chunk.copy_(chunk_gradient)

        if needs_gradient:
            ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (gradient,) = ctx.saved_tensors
        # In place: the buffer is ours alone. A second backward through the same graph is refused by autograd's
        # version check on saved tensors rather than silently scaling twice.
        return gradient.mul_(grad_output), None, None, None, None, None, None


def chunked_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    loss_type: DistillationLossType = "kl",
    jsd_beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``Σ_{mask} T² · D(q ‖ p)`` computed ``chunk_size`` positions at a time, with an exact closed-form gradient.

    Same value and gradient as
    ``losses.masked_sum(losses.distillation_divergence(student_logits, teacher_logits, ...), mask)``, without holding
    float32 ``[N, V]`` log-softmaxes of both models: the extra memory is one ``[..., V]`` gradient buffer in the
    student's dtype (what the student's logits receive in backward anyway) and four float32 ``[chunk_size, V]`` work
    tensors.

    Args:
        student_logits: ``[..., V]`` student logits, any float dtype; may be a strided view such as the causal shift
            ``logits[..., :-1, :]`` (read in place, never copied whole).
        teacher_logits: ``[..., V]`` teacher logits, same shape; treated as constants (no gradient flows to them).
        mask: ``[...]`` bool, the positions that count.
        temperature: ``T > 0``.
        loss_type: a registered divergence name (see :func:`hf_distill.losses.distillation_divergence`).
        jsd_beta: ``β`` of ``"jsd"``.
        chunk_size: positions per chunk; default :func:`default_chunk_size` (≈ 4M elements per work tensor). A chunk
            holds whole sequences when they fit (several, when ``[B, L', V]`` rows do not flatten), else part of one;
            chunks with no counted position are skipped, uncounted positions inside a chunk are computed and dropped
            (as the naive loss computes every position).

    Returns:
        A float32 scalar, the *sum* over counted positions (the trainer divides by the step's counted positions).
        Its backward may run once (the gradient buffer is scaled in place). Written for CPU first: on a GPU each chunk's
        mask test (`any`/`all`) reads back to the host, a small sync per chunk.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have"
            " the same shape."
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the logits' leading shape {tuple(student_logits.shape[:-1])}."
        )
    get_distillation_loss(loss_type)  # an unknown name fails here, before any work
    if teacher_logits.requires_grad:
        raise ValueError(
            "chunked_distillation_loss treats the teacher logits as constants; detach them (or use "
            "losses.distillation_divergence to differentiate through the teacher)."
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(student_logits.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _ChunkedDistillationLoss.apply(
        student_logits, teacher_logits, mask.bool(), temperature, loss_type, jsd_beta, chunk_size
    )
