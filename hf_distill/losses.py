"""The knowledge-distillation math, as pure functions.

Notation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):

* ``z`` student logits, ``v`` teacher logits, both ``[..., V]`` (``V`` classes or vocabulary entries);
* ``T`` the temperature; ``p = softmax(z / T)`` the student's and ``q = softmax(v / T)`` the teacher's
  tempered distributions.

Every divergence (registered in :mod:`hf_distill.divergences`) is computed per *position* (a row of a classifier, a token of a token-level model) in
float32 with ``log_softmax``, whatever the dtype of the inputs, and returns ``T² · D(q ‖ p)`` — the T² factor keeps the
gradient magnitude independent of ``T`` (the paper's §2). With that factor the gradient of the forward KL with respect
to the student logits is exactly ``T · (p − q)``, i.e. ``T²`` times the paper's ``(1/T)(p_i − q_i)``.

The trainer reduces these per-position values with :func:`masked_sum` and divides by the number of counted positions
of the whole (gradient-accumulated, all-process) batch, so the KD term is a mean over counted positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .divergences import DISTILLATION_LOSSES as DISTILLATION_LOSSES  # re-exported: its home before the registry
from .divergences import Divergence, compute_dtype, get_distillation_loss


# Any registered name (see `hf_distill.divergences`); the four built-in ones are "kl", "reverse_kl", "jsd", "mse".
DistillationLossType = str

IGNORE_INDEX = -100


def distillation_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    loss_type: DistillationLossType | Divergence = "kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-position soft-target loss ``T² · D(q ‖ p)``.

    Args:
        student_logits: ``[..., V]`` student logits ``z`` (any float dtype; upcast to float32).
        teacher_logits: ``[..., V]`` teacher logits ``v``, same shape.
        temperature: ``T > 0``.
        loss_type: a registered divergence (`hf_distill.divergences`, where each is defined with its formula):
            * ``"kl"`` — forward ``KL(q ‖ p) = Σ q (log q − log p)``, Hinton's soft-target cross-entropy minus the
              teacher entropy (same gradient). ``∂/∂z = T (p − q)`` after the ``T²`` factor.
            * ``"reverse_kl"`` — ``KL(p ‖ q) = Σ p (log p − log q)``, mode seeking.
            * ``"jsd"`` — generalized Jensen–Shannon divergence with ``m = β q + (1 − β) p``:
              ``β KL(q ‖ m) + (1 − β) KL(p ‖ m)`` (TRL's GKD convention; ``β = jsd_beta`` in (0, 1), 0.5 is the
              symmetric JSD).
            * ``"mse"`` — logit matching, the paper's high-temperature limit: ``(1 / 2V) Σ_i (z̃_i − ṽ_i)²`` with the
              logits centred to zero mean; its gradient ``(1/V)(z̃ − ṽ)`` does not depend on ``T``.
            * any name added with :func:`hf_distill.register_distillation_loss`.
        jsd_beta: the mixture weight ``β`` of ``"jsd"``; passed only to divergences that take it.

    Returns:
        ``[...]`` float32 tensor: ``T² · D`` for each position (no reduction). Computed in float32, or in float64 when
        ``T`` exceeds `hf_distill.divergences.FLOAT64_ABOVE_TEMPERATURE` (float32 rounding times ``T²`` would
        dominate the value there).
    """
    divergence = get_distillation_loss(loss_type)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have"
            " the same shape."
        )
    options = divergence.select_options({"jsd_beta": jsd_beta})
    dtype = compute_dtype(temperature, student_logits.device)
    values = divergence.value(student_logits.to(dtype), teacher_logits.to(dtype), temperature, **options)
    return values.float()


# The "logit" of an empty rest bucket (k = V, or a teacher with no mass outside its top k): exp of it divided by any
# accepted temperature is exactly 0 in float32 and float64, and unlike -inf it gives 0 · finite = 0 in every divergence.
EMPTY_BUCKET_LOGIT = -1e30


def top_k_tail_logits(
    student_logits: torch.Tensor,
    top_k_ids: torch.Tensor,
    teacher_top_k_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher "logits" over k + 1 categories — the teacher's top k, plus one bucket for the rest —
    whose tempered softmaxes are the two bucketed distributions; any registered divergence then compares them.

    With ``K`` the teacher's top-k ids, ``V`` the vocabulary, ``p_T = softmax(z / T)`` the student's distribution:

    * student: ``[z_K, T · logsumexp_{j ∉ K}(z_j / T)]``, so ``softmax(· / T) = [p_T(K), 1 − Σ_K p_T]``: the
      student's own rest mass at T, exact (a log-sum-exp over the entries outside K, not ``1 − Σ``, so it keeps its
      relative precision however small it is);
    * teacher: ``[lp_K, lr + (T − 1) · log(V − k)]`` from its top-k log-probabilities ``lp_K`` and tail log-mass ``lr``
      at T = 1. At T = 1 this is exact: ``softmax = [q(K), 1 − Σ_K q]``. At T ≠ 1 the teacher's tempered rest mass
      would need its tail distribution, which the cache does not hold; it is taken as if that mass were spread
      uniformly over the V − k entries outside K: each carries ``m = e^lr / (V − k)``, and the tempered bucket is
      ``(V − k) · m^(1/T)`` against ``q_i^(1/T)`` for the kept entries. Exact whenever the teacher's tail is uniform;
      otherwise, by the power-mean inequality, the rest bucket gets *more* than its true tempered weight at T > 1
      and *less* at T < 1 (before renormalisation over the k + 1 categories).

    At T = 1 the result is the divergence between the two distributions coarse-grained to k + 1 categories: never
    negative, at most the full divergence (data-processing inequality), equal to it at k = V, where the rest bucket
    is empty (``EMPTY_BUCKET_LOGIT`` on both sides, contributing 0).

    Args:
        student_logits: ``[..., V]`` the student's logits (float32 is used for the log-sum-exp; gradients flow).
        top_k_ids: ``[..., k]`` int64, the teacher's top-k ids.
        teacher_top_k_logprobs: ``[..., k]`` the teacher's log-probabilities at those ids, at T = 1.
        teacher_tail_logprob: ``[...]`` the log of the teacher's mass outside them at T = 1 (``-inf``: none).
        temperature: T.

    Returns:
        ``(student [..., k + 1], teacher [..., k + 1])`` float32.
    """
    vocab_size, k = student_logits.shape[-1], top_k_ids.shape[-1]
    student = student_logits.float()
    kept = student.gather(-1, top_k_ids)
    if k < vocab_size:
        scaled = student if temperature == 1.0 else student / temperature
        rest = scaled.scatter(-1, top_k_ids, float("-inf")).logsumexp(-1, keepdim=True)
        rest = rest if temperature == 1.0 else rest * temperature
    else:  # no entry outside the top k (a log-sum-exp over nothing would be -inf, with a NaN gradient)
        rest = kept.new_full((*kept.shape[:-1], 1), EMPTY_BUCKET_LOGIT)
    tail = teacher_tail_logprob.float().unsqueeze(-1)
    if temperature != 1.0 and k < vocab_size:
        tail = tail + (temperature - 1.0) * math.log(vocab_size - k)
    tail = torch.where(tail == float("-inf"), EMPTY_BUCKET_LOGIT, tail)  # NaN and +inf stay: reported as non-finite
    return torch.cat([kept, rest], dim=-1), torch.cat([teacher_top_k_logprobs.float(), tail], dim=-1)


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Align a causal LM's logits with the tokens they predict, exactly as its label loss does.

    The logit at position ``t`` predicts token ``t + 1``: returns ``logits[:, :-1]`` ``[B, L-1, V]`` and
    ``labels[:, 1:]`` ``[B, L-1]`` (``None`` stays ``None``).
    """
    return logits[..., :-1, :], None if labels is None else labels[..., 1:]


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ values[mask]`` as a float32 scalar; ``values`` and ``mask`` share their shape ``[...]``.

    ``torch.where`` (not multiplication) keeps a NaN/inf at an uncounted position — e.g. padding — out of the sum.
    """
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at T = 1 over positions whose label is not -100 (``logits [..., V]``, ``labels [...]``).

    Used as the label loss only for students that do not compute a loss themselves (e.g. a plain ``nn.Module``).
    """
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


ENSEMBLE_REDUCTIONS: tuple[str, ...] = ("mean_probs", "mean_log_probs")


def check_ensemble_settings(reduction: str, weights, num_teachers: int) -> None:
    """Raise a clear `ValueError` for an unknown reduction or weights that don't fit the teachers."""
    if reduction not in ENSEMBLE_REDUCTIONS:
        raise ValueError(f"Unknown `ensemble_reduction` {reduction!r}; choose one of {list(ENSEMBLE_REDUCTIONS)}.")
    if weights is not None:
        if num_teachers == 1:
            raise ValueError(
                f"`teacher_weights` {list(weights)} weigh the members of an ensemble, but there is one teacher: drop "
                "`teacher_weights`, or pass a list of teachers as `teacher_model`."
            )
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise ValueError(f"`teacher_weights` must be finite numbers, got {list(weights)}.")
        if len(weights) != num_teachers:
            raise ValueError(
                f"`teacher_weights` has {len(weights)} entries for {num_teachers} teachers; give one each."
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"`teacher_weights` must be non-negative with a positive sum, got {list(weights)}.")


def ensemble_teacher_logits(
    teacher_logits: list[torch.Tensor],
    *,
    reduction: str = "mean_probs",
    weights=None,
    temperature: float,
) -> torch.Tensor:
    """Combine an ensemble's logits ``[..., V]`` each into "logits" whose tempered softmax is the ensemble's target.

    With weights ``w_j`` (default uniform, normalised to sum to 1) and ``q_j = softmax(z_j / T)``:

    * ``"mean_probs"`` — arithmetic mean ``q = Σ_j w_j q_j``; returns ``T · log q`` so that ``softmax(out / T) = q``.
      Depends on T.
    * ``"mean_log_probs"`` — geometric mean, renormalised: ``q ∝ Π_j q_j^{w_j} = softmax(Σ_j w_j z_j / T)``; returns
      ``Σ_j w_j z_j`` (independent of T).

    Returns a float32 ``[..., V]`` tensor usable wherever a single teacher's logits are.
    """
    stacked = torch.stack([logits.float() for logits in teacher_logits])  # [J, ..., V]
    weight = (
        torch.full((len(teacher_logits),), 1.0 / len(teacher_logits))
        if weights is None
        else torch.tensor(weights, dtype=torch.float32) / float(sum(weights))
    )
    weight = weight.to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if reduction == "mean_log_probs":
        return (weight * stacked).sum(0)
    if reduction == "mean_probs":
        log_probs = F.log_softmax(stacked / temperature, dim=-1)
        return temperature * torch.logsumexp(log_probs + weight.log(), dim=0)
    raise ValueError(f"Unknown `ensemble_reduction` {reduction!r}; choose one of {list(ENSEMBLE_REDUCTIONS)}.")


SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def scheduled_value(start: float, end: float | None, schedule: str, progress: float) -> float:
    """A hyperparameter moving from `start` to `end` as training `progress` goes from 0 to 1.

    ``constant``: start; ``linear``: start + (end − start)·progress; ``cosine``: end + (start − end)·(1 + cos(π·progress))/2.
    """
    if schedule == "constant" or end is None:
        return start
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
