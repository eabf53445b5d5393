"""Fused ``lm_head`` + distillation loss: the KD (and label) loss of a causal LM without its ``[N, V]`` logits.

:func:`hf_distill.chunked.chunked_distillation_loss` bounds the loss's *work* memory, but the student's logits, their
gradient and the teacher's logits are still ``[N, V]`` tensors (``N`` counted tokens, ``V`` the vocabulary): at
N = 64K, V = 152K one float32 ``[N, V]`` tensor is ≈ 40 GiB. :func:`fused_linear_distillation_loss` starts one step
earlier, from the student's last hidden state ``h [N, H]`` and its output head ``W [V_s, H]`` (+ bias ``b``), and forms
the logits ``chunk_size`` rows at a time:

    z = softcap(s · (h Wᵀ + b))        softcap(x) = c · tanh(x / c)  (when ``final_logit_softcapping = c`` is set)

For each chunk it computes the divergence ``T² · D(q ‖ p)`` (``p = softmax(z / T)``, ``q`` the teacher's), the label
cross-entropy ``CE = logsumexp(z) − z_label`` at T = 1 over the student's whole ``V_s``, and their closed-form gradient
``dz`` with respect to the chunk's logits (`hf_distill.chunked.divergence_and_student_gradient`: autograd on that chunk
for a divergence registered without a closed form). ``dz`` is chained through the softcap and scale
(``∂z/∂x = s · (1 − tanh²(s x / c))``) and accumulated at once into the gradients of ``h`` (``dz W``), ``W``
(``dzᵀ h``) and ``b`` (``Σ_rows dz``); backward only multiplies them by the incoming gradient. The matmuls with
``W`` (forward and backward) run in the dtype the model's own head would use: the autocast dtype under autocast, else
``W``'s (float16's backward in float32); everything else in float32. Nothing of size ``[N, V]`` outlives a chunk: the extra memory is seven float32
``[chunk_size, V]`` buffers, reused by every chunk, and a float32 sum of ``W``'s gradient.

The teacher's logits come from one of

* an *online* teacher's last hidden state and head (``teacher_hidden [N, H_t]``, ``teacher_weight [V_t, H_t]``,
  optional ``teacher_bias``, ``teacher_logit_scale``, ``teacher_softcap``), formed per chunk like the student's;
* a full cache, ``teacher_logits [N, V]``;
* a top-k cache, ``top_k_ids [N, k]``, ``top_k_logprobs [N, k]`` and optionally ``top_k_tail [N]`` (the trainer's
  cache columns): the divergence is then taken over the k (or k + 1, with the rest bucket) categories of
  :func:`hf_distill.losses.top_k_tail_logits`, and its gradient scattered back onto the vocabulary (the rest bucket's
  through ``∂(T · logsumexp_{j ∉ K}(z_j / T)) / ∂z_j = softmax_{j ∉ K}(z / T)``).

Only the rows that count (``mask`` for the KD term, ``labels ≠ -100`` for the label term) are read, chunk by chunk, so
padding costs nothing and a NaN there stays out. The teacher is a constant: no gradient reaches it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .chunked import divergence_and_student_gradient
from .divergences import get_distillation_loss
from .losses import IGNORE_INDEX, DistillationLossType, distillation_divergence, top_k_tail_logits


# About 2M elements per float32 [chunk, V] work tensor on CPU (64 rows at V = 32000). A fused chunk holds seven of them
# (both models' logits, the gradient, the closed form's four scratch tensors): at the chunked path's 4M elements a
# whole GPT-2 KD step at V = 32000, N = 2048 peaked 0.87 of one float32 [N, V] tensor above the same models without
# logits, at 2M 0.29 (`benchmarks/bench_kd_step_memory.py`), in the same time: fused loss fwd + bwd at N = 2048,
# H = 256, one thread, alternated medians 2.50 s (2M) vs 2.61 s (4M); 1M elements was 11 % slower than 2M.
_FUSED_CHUNK_ELEMENTS = 1 << 21
# On a GPU, 128M (1046 rows at V = 128256): the loss alone at N = 8192, H = 4096, V = 128256, bf16, on one H200
# (`benchmarks/gpu/bench_fused_memory.py`) took 170 ms with 261-row chunks, 113 ms with 1024 and 100 ms with 4096,
# against 100 ms for the logits path, and peaked 4.3, 7.3 and 19.1 GB above its inputs, against 33.7 GB.
_FUSED_CHUNK_ELEMENTS_ACCELERATOR = 1 << 27


def default_fused_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per fused chunk: about 2M elements per float32 ``[chunk_size, V]`` work tensor on CPU, 128M on an
    accelerator (at least 1 row)."""
    elements = _FUSED_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else _FUSED_CHUNK_ELEMENTS_ACCELERATOR
    return max(1, elements // max(1, vocab_size))


class FusedDistillationLoss(NamedTuple):
    """What :func:`fused_linear_distillation_loss` returns.

    Attributes:
        loss: float32 scalar ``kd_weight · kd_sum + ce_weight · ce_sum``, differentiable in the student's hidden
            state, weight and bias.
        kd_sum: detached ``Σ_mask T² · D`` (float32).
        ce_sum: detached ``Σ_{labels ≠ -100} CE`` (float32; 0 without labels).
        teacher_nonfinite: bool scalar, True when a teacher logit (or cached value) on a counted row was NaN/inf.
    """

    loss: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    teacher_nonfinite: torch.Tensor


@dataclasses.dataclass
class _Settings:
    """Everything but the student's differentiable tensors (constants for autograd)."""

    mask: torch.Tensor  # [N] bool, KD rows
    labels: torch.Tensor | None  # [N] int64
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    top_k_ids: torch.Tensor | None
    top_k_logprobs: torch.Tensor | None
    top_k_tail: torch.Tensor | None
    kd_weight: float
    ce_weight: float
    temperature: float
    loss_type: DistillationLossType
    jsd_beta: float
    vocab_size: int
    student_logit_scale: float
    student_softcap: float | None
    teacher_logit_scale: float
    teacher_softcap: float | None
    chunk_size: int


def _head(hidden, weight, bias, scale: float, softcap: float | None, out: torch.Tensor | None = None):
    """``(z, ∂z/∂x)`` for ``hidden [C, H]``, ``weight [V, H]`` (+ ``bias``) of one dtype, the matmul's: the float32
    logits as the model forms them (scale, then ``c · tanh(x / c)``) and their elementwise derivative with respect to
    the head's output (None when it is 1). ``out``: an optional ``[C, V]`` float32 buffer for ``z`` (a chunk's logits
    then allocate nothing float32)."""
    if out is None:
        logits = F.linear(hidden, weight, bias).float()
    elif weight.dtype != torch.float32:  # a bf16/fp16 product, as the model's own head gives it, then float32
        logits = out.copy_(F.linear(hidden, weight, bias))
    elif bias is None:
        logits = torch.mm(hidden, weight.t(), out=out)
    else:
        logits = torch.addmm(bias, hidden, weight.t(), out=out)
    derivative = None
    if scale != 1.0:
        logits = logits.mul_(scale)
        derivative = scale
    if softcap is not None:
        tanh = torch.tanh(logits.div_(softcap))
        logits = torch.mul(tanh, softcap, out=logits)
        derivative = (1.0 - tanh * tanh).mul_(scale)
    return logits, derivative


def _teacher_chunk(settings: _Settings, rows, width: int, out: torch.Tensor):
    """The teacher's dense logits ``[C, width]`` at `rows` (a slice or indices): a full cache's rows as stored (any
    float dtype; the divergence converts them), or an online teacher's float32 logits, formed in ``out``."""
    if settings.teacher_logits is not None:
        return settings.teacher_logits[rows]
    logits, _ = _head(
        settings.teacher_hidden[rows].to(settings.teacher_weight.dtype),
        settings.teacher_weight,
        settings.teacher_bias,
        settings.teacher_logit_scale,
        settings.teacher_softcap,
        out=out,
    )
    return logits[:, :width]


def _kd_value_and_gradient(settings: _Settings, logits, rows, workspace, gradient_out, with_gradient):
    """Per-row ``T² · D`` over the chunk and its gradient ``[C, V_s]`` with respect to the student's logits (written
    into ``gradient_out``), plus the teacher values that were compared (for the finiteness check)."""
    kwargs = dict(temperature=settings.temperature, loss_type=settings.loss_type, jsd_beta=settings.jsd_beta)
    width, num_rows = settings.vocab_size, logits.shape[0]
    student = logits[:, :width]
    if settings.top_k_ids is None:
        online_width = settings.teacher_weight.shape[0] if settings.teacher_weight is not None else 0
        teacher = _teacher_chunk(settings, rows, width, workspace.slot(4, num_rows, online_width))
        if not with_gradient:
            return distillation_divergence(student, teacher.float(), **kwargs), None, teacher
        if width < logits.shape[-1]:  # padding rows of the head: no KD gradient
            gradient_out[:, width:] = 0.0
        values, _ = divergence_and_student_gradient(
            student,
            teacher,
            workspace=workspace.slots(4, num_rows, width),
            gradient_out=gradient_out[:, :width],
            **kwargs,
        )
        return values, gradient_out, teacher

    ids = settings.top_k_ids[rows].long()
    logprobs = settings.top_k_logprobs[rows]
    tail = settings.top_k_tail[rows] if settings.top_k_tail is not None else None
    if tail is not None:
        student_buckets, teacher = top_k_tail_logits(student, ids, logprobs, tail, settings.temperature)
    else:
        student_buckets, teacher = student.gather(-1, ids), logprobs.float()
    if not with_gradient:
        return distillation_divergence(student_buckets, teacher, **kwargs), None, teacher
    values, bucket_gradient = divergence_and_student_gradient(student_buckets, teacher, **kwargs)
    k = ids.shape[-1]
    gradient = gradient_out.zero_()
    if tail is not None and k < width:
        # The rest bucket T · logsumexp_{j ∉ K}(z_j / T): its derivative is the tempered softmax outside K.
        scaled = student if settings.temperature == 1.0 else student / settings.temperature
        outside = torch.softmax(scaled.scatter(-1, ids, float("-inf")), dim=-1)
        gradient[:, :width] = outside.mul_(bucket_gradient[:, k:])
    gradient.scatter_add_(-1, ids, bucket_gradient[:, :k])
    return values, gradient, teacher


class _Workspace:
    """Float32 ``[C, V]`` buffers reused by every chunk: the student's logits (slot 5), the teacher's (4), the
    gradient (6) and the closed forms' four scratch tensors (0–3). Freeing and re-allocating tensors of this size for
    every chunk makes the allocator return them to the OS and fault them in again (see
    `hf_distill.chunked.divergence_and_student_gradient`)."""

    def __init__(self, rows: int, columns: int, device: torch.device):
        # `columns`: the widest head, max(V_s, V_t)
        self.buffer = torch.empty(7, rows * columns, dtype=torch.float32, device=device)

    def slot(self, index: int, rows: int, columns: int) -> torch.Tensor:
        """Slot `index` as a contiguous ``[rows, columns]`` tensor."""
        return self.buffer[index, : rows * columns].view(rows, columns)

    def slots(self, count: int, rows: int, columns: int) -> torch.Tensor:
        """Slots ``0 .. count-1`` as one ``[count, rows, columns]`` view (the closed forms' workspace argument)."""
        return self.buffer[:count, : rows * columns].view(count, rows, columns)


def _cross_entropy(logits, labels, gradient, weight: float, *, accumulate: bool, every_row: bool, log_probs):
    """Per-row ``logsumexp(z) − z_label`` (rows with label -100 give 0) and, when ``gradient`` is given, ``weight ·
    (softmax(z) − onehot)`` written into it (added to it with `accumulate`). ``log_probs``: a ``[C, V]`` scratch
    buffer. Returns ``(values, whether gradient holds a gradient)``."""
    counted = labels.ne(IGNORE_INDEX)
    safe = torch.where(counted, labels, 0)[:, None]
    torch.log_softmax(logits, dim=-1, out=log_probs)
    values = torch.where(counted, -log_probs.gather(-1, safe).squeeze(-1), 0.0)
    if gradient is None:
        return values, accumulate
    probs = log_probs.exp_()
    probs.scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=probs.dtype))  # softmax − onehot, as autograd has it
    if not every_row:
        probs.mul_(counted[:, None])
    if accumulate:
        gradient.add_(probs.mul_(weight))
    else:
        torch.mul(probs, weight, out=gradient)
    return values, True


def _matmul_operand(tensor, dtype):
    """``tensor`` in the matmul's dtype ``dtype`` (None: its own). None stays None."""
    return tensor if tensor is None or dtype is None else tensor.to(dtype)


class _FusedLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, settings: _Settings):
        # The heads' matmuls run in the dtype the models' own heads would: the autocast dtype under autocast, else the
        # weight's (float32 for a float32 model, bf16 for a bf16 one). Everything after them runs in float32.
        device_type = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        teacher_weight = _matmul_operand(settings.teacher_weight, autocast_dtype)
        settings = dataclasses.replace(
            settings,
            teacher_weight=teacher_weight,
            teacher_bias=_matmul_operand(
                settings.teacher_bias, None if teacher_weight is None else teacher_weight.dtype
            ),
        )
        with torch.autocast(device_type, enabled=False):
            return _FusedLinearDistillation._forward(
                ctx, hidden, _matmul_operand(weight, autocast_dtype), bias, settings, weight
            )

    @staticmethod
    def _forward(ctx, hidden, weight_m, bias, settings: _Settings, weight):
        needs = ctx.needs_input_grad[:3]
        with_gradient = any(needs)
        device = hidden.device
        matmul_dtype = weight_m.dtype
        bias_m = _matmul_operand(bias, matmul_dtype)
        # float16's backward runs in float32: the gradient of the loss's sum (the trainer's 1/N and an fp16 GradScaler's
        # scale only come in backward) can fall below float16's range, where autograd's scaled one would not.
        backward_dtype = torch.float32 if matmul_dtype == torch.float16 else matmul_dtype
        backward_weight = weight_m.to(backward_dtype) if with_gradient else None
        counted_ce = settings.labels.ne(IGNORE_INDEX) if settings.labels is not None else None
        counted = settings.mask if counted_ce is None else settings.mask | counted_ce
        rows_all = counted.nonzero().squeeze(-1)  # gathered first: padding costs nothing
        # The usual case (the trainer passes the counted positions only): every row counts for both terms. Chunks are
        # then slices (no gathers), and no row of the gradient needs zeroing.
        every_row = len(rows_all) == len(counted)
        every_kd_row = bool(settings.mask[rows_all].all())
        every_ce_row = counted_ce is None or bool(counted_ce[rows_all].all())
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        grad_hidden = grad_weight = grad_bias = None
        if with_gradient:
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if needs[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if needs[1] else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device) if needs[2] else None
        chunk_size = settings.chunk_size
        teacher_width = settings.teacher_weight.shape[0] if settings.teacher_weight is not None else 0
        workspace = _Workspace(min(chunk_size, max(1, len(rows_all))), max(weight.shape[0], teacher_width), device)
        for start in range(0, len(rows_all), chunk_size):
            rows = slice(start, start + chunk_size) if every_row else rows_all[start : start + chunk_size]
            hidden_rows = hidden[rows].to(matmul_dtype)
            num_rows = hidden_rows.shape[0]
            logits, derivative = _head(
                hidden_rows,
                weight_m,
                bias_m,
                settings.student_logit_scale,
                settings.student_softcap,
                out=workspace.slot(5, num_rows, weight.shape[0]),
            )
            kd_rows = settings.mask[rows]
            gradient = workspace.slot(6, num_rows, weight.shape[0])
            values, kd_gradient, teacher = _kd_value_and_gradient(
                settings, logits, rows, workspace, gradient, with_gradient
            )
            # A NaN/inf on a row that does not count (a label-only row) stays out: rows are reduced first, then masked.
            teacher_row_sums = teacher.sum(-1, dtype=torch.float32)
            if every_kd_row:
                kd_sum += values.sum()
                nonfinite |= ~torch.isfinite(teacher_row_sums.sum())
            else:
                kd_sum += torch.where(kd_rows, values, 0.0).sum()
                nonfinite |= ~torch.isfinite(torch.where(kd_rows, teacher_row_sums, 0.0).sum())
            has_gradient = with_gradient and settings.kd_weight != 0
            if has_gradient:  # the gradient is the chunk's slot: in place
                if not every_kd_row:
                    kd_gradient.masked_fill_(~kd_rows[:, None], 0.0)
                kd_gradient.mul_(settings.kd_weight)
            if settings.labels is not None:
                ce_values, has_gradient = _cross_entropy(
                    logits,
                    settings.labels[rows],
                    gradient if with_gradient and settings.ce_weight != 0 else None,
                    settings.ce_weight,
                    accumulate=has_gradient,
                    every_row=every_ce_row,
                    log_probs=workspace.slot(1, num_rows, weight.shape[0]),
                )
                ce_sum += ce_values.sum()
            if not has_gradient:
                continue
            if derivative is not None:
                gradient = gradient.mul_(derivative)
            if grad_bias is not None:
                grad_bias += gradient.sum(0)
            # The head's backward matmuls in its forward's dtype, as autograd would run them (float16's in float32, see
            # `backward_dtype`); sums in float32.
            if backward_dtype != torch.float32:
                gradient, hidden_rows = gradient.to(backward_dtype), hidden_rows.to(backward_dtype)
            if grad_hidden is not None:
                if every_row and backward_dtype == torch.float32:
                    torch.mm(gradient, backward_weight, out=grad_hidden[rows])
                elif every_row:
                    grad_hidden[rows] = gradient @ backward_weight
                else:
                    grad_hidden.index_copy_(0, rows, (gradient @ backward_weight).float())
            if grad_weight is not None:
                if backward_dtype == torch.float32:
                    grad_weight.addmm_(gradient.t(), hidden_rows.float())
                else:
                    grad_weight += gradient.t() @ hidden_rows
        loss = settings.kd_weight * kd_sum + settings.ce_weight * ce_sum
        if with_gradient:
            ctx.grads = (
                None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
            )
        kd_sum, ce_sum = kd_sum.clone(), ce_sum.clone()
        ctx.mark_non_differentiable(kd_sum, ce_sum, nonfinite)
        return loss, kd_sum, ce_sum, nonfinite

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads = ctx.grads
        del ctx.grads  # a second backward through the same graph has nothing left to scale
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    top_k_ids: torch.Tensor | None = None,
    top_k_logprobs: torch.Tensor | None = None,
    top_k_tail: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    loss_type: DistillationLossType = "kl",
    jsd_beta: float = 0.5,
    vocab_size: int | None = None,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_logit_scale: float = 1.0,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
) -> FusedDistillationLoss:
    """``kd_weight · Σ_mask T² · D(q ‖ p) + ce_weight · Σ_{labels ≠ -100} CE`` from hidden states, chunk by chunk.

    Equal in value and gradient to forming the logits ``z = softcap(s · (h Wᵀ + b))`` in full and summing
    ``losses.distillation_divergence`` over ``mask`` and ``F.cross_entropy(z, labels, reduction="sum")`` (see the
    module docstring for the formulas), without any ``[N, V]`` tensor.

    Args:
        student_hidden: ``[N, H]`` the student's final hidden states (what its head reads), any float dtype.
        student_weight: ``[V_s, H]`` the head's weight (may be tied to the input embedding: autograd accumulates).
        student_bias: ``[V_s]`` or None.
        mask: ``[N]`` bool, the rows the KD term counts; default all.
        teacher_hidden, teacher_weight, teacher_bias: an online teacher's ``[N, H_t]`` hidden states and
            ``[V_t, H_t]`` (+ ``[V_t]``) head; constants.
        teacher_logits: a full cache, ``[N, V]`` (``V`` = `vocab_size`).
        top_k_ids, top_k_logprobs, top_k_tail: a top-k cache, ``[N, k]``, ``[N, k]`` at T = 1, and ``[N]`` (the log
            mass outside the top k) or None.
        labels: ``[N]`` int64 next-token labels (-100: not counted), or None for no label term.
        kd_weight, ce_weight: the weights of the two sums in ``loss``.
        temperature, loss_type, jsd_beta: as in :func:`hf_distill.losses.distillation_divergence`.
        vocab_size: the entries the KD term compares (padded heads: the rest are padding, sliced off the student's
            and the teacher's logits); default ``V_s``. The label term always uses the student's whole ``V_s``.
        student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap: the models' post-head transforms
            (``config.logit_scale``, ``config.final_logit_softcapping``); 1.0 / None for none.
        chunk_size: rows per chunk; default :func:`default_fused_chunk_size` of ``V_s`` and the device (about 2M
            elements per work tensor on CPU, 128M on a GPU).

    Returns:
        :class:`FusedDistillationLoss` ``(loss, kd_sum, ce_sum, teacher_nonfinite)``. The gradients are computed during
        forward (only those of inputs that require one); backward may run once.
    """
    num_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    sources = [teacher_hidden is not None, teacher_logits is not None, top_k_ids is not None]
    if sum(sources) != 1:
        raise ValueError(
            "Give exactly one teacher signal: teacher_hidden + teacher_weight (online), teacher_logits (full cache), "
            "or top_k_ids + top_k_logprobs (top-k cache)."
        )
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight (the teacher's output head).")
    if top_k_ids is not None and top_k_logprobs is None:
        raise ValueError("top_k_ids needs top_k_logprobs.")
    if student_hidden.dim() != 2 or student_weight.dim() != 2 or student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} must be [N, H] and student_weight "
            f"{tuple(student_weight.shape)} [V, H]."
        )
    vocab_size = vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= vocab:
        raise ValueError(f"vocab_size must be in [1, {vocab}] (the student's head), got {vocab_size}.")
    if teacher_weight is not None and teacher_weight.shape[0] < vocab_size:
        raise ValueError(
            f"The teacher's head has {teacher_weight.shape[0]} rows, fewer than the {vocab_size} compared entries."
        )
    if teacher_logits is not None and teacher_logits.shape != (num_rows, vocab_size):
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must be [N, vocab_size] = [{num_rows}, {vocab_size}]."
        )
    mask = torch.ones(num_rows, dtype=torch.bool, device=student_hidden.device) if mask is None else mask.bool()
    if mask.shape != (num_rows,) or (labels is not None and labels.shape != (num_rows,)):
        raise ValueError(f"mask and labels must be [N] = [{num_rows}].")
    get_distillation_loss(loss_type)  # an unknown name fails here
    chunk_size = default_fused_chunk_size(vocab, student_hidden.device) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")

    def constant(tensor):
        return None if tensor is None else tensor.detach()

    settings = _Settings(
        mask=mask,
        labels=constant(labels),
        teacher_hidden=constant(teacher_hidden),
        teacher_weight=constant(teacher_weight),
        teacher_bias=constant(teacher_bias),
        teacher_logits=constant(teacher_logits),
        top_k_ids=constant(top_k_ids),
        top_k_logprobs=constant(top_k_logprobs),
        top_k_tail=constant(top_k_tail),
        kd_weight=float(kd_weight),
        ce_weight=float(ce_weight),
        temperature=float(temperature),
        loss_type=loss_type,
        jsd_beta=float(jsd_beta),
        vocab_size=vocab_size,
        student_logit_scale=float(student_logit_scale),
        student_softcap=student_softcap,
        teacher_logit_scale=float(teacher_logit_scale),
        teacher_softcap=teacher_softcap,
        chunk_size=chunk_size,
    )
    return FusedDistillationLoss(
        *_FusedLinearDistillation.apply(student_hidden, student_weight, student_bias, settings)
    )


# ---- the output head of a causal LM ----


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A model's output head as :func:`fused_linear_distillation_loss` takes it: ``z = softcap(s · (h Wᵀ + b))``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden [..., H]`` (for checking the head against the model's own logits)."""
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(hidden.device.type, enabled=False):
            return _head(hidden.float(), self.weight.float(), bias, self.logit_scale, self.softcap)[0]


def linear_head(model: nn.Module) -> LinearHead | str:
    """The :class:`LinearHead` of a transformers causal LM, or why it has none usable here.

    The head is ``get_output_embeddings()`` (an ``nn.Linear``, possibly tied to the input embedding); the transforms
    after it are read from the config: ``logit_scale`` (Cohere) and ``final_logit_softcapping`` (Gemma 2/3). A model
    that transforms its logits otherwise is caught by :func:`head_reproduces_logits` on the first batch.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__} has no linear output head (`get_output_embeddings()` is {type(head).__name__})"
    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scale is not None and not isinstance(scale, numbers.Real):
        return f"{type(model).__name__}'s `config.logit_scale` is not a number"
    if softcap is not None and not (isinstance(softcap, numbers.Real) and softcap > 0):
        softcap = None
    return LinearHead(head.weight, head.bias, 1.0 if scale is None else float(scale), softcap)


def head_reproduces_logits(
    head: LinearHead, last_hidden: torch.Tensor, logits: torch.Tensor, *, reduced_precision: bool = False
) -> bool:
    """Whether ``head`` applied to the model's last hidden states ``[..., H]`` gives its own ``logits`` ``[..., V]`` (to
    the rounding of the model's dtype): the check that `hidden_states[-1]` is what the head reads, and that no other
    transform follows it. ``reduced_precision``: the model ran under bf16/fp16 autocast, so float32 ``logits`` may be
    bf16/fp16 results converted afterwards (accelerate's prepared forward converts its outputs); they get the bf16/fp16
    tolerance."""
    if logits.shape[:-1] != last_hidden.shape[:-1] or logits.shape[-1] != head.weight.shape[0]:
        return False
    with torch.no_grad():
        expected = head.logits(last_hidden)
        tolerance = 1e-5 if logits.dtype == torch.float32 and not reduced_precision else 2e-2
        return bool(
            torch.allclose(logits.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
        )
