"""The divergences ``D(teacher ‖ student)`` of the distillation term: one registry entry per divergence.

Each entry (a :class:`Divergence`) holds everything the library needs to know about one divergence:

* ``value`` — the per-position value ``T² · D(q ‖ p)``, differentiable by autograd (the naive path);
* ``value_and_gradient`` — optionally, the same value and its gradient with respect to the student logits in closed
  form, written into a reusable workspace (the chunked path, :mod:`hf_distill.chunked`); without it the chunked path
  differentiates ``value`` with autograd one chunk at a time;
* ``formula`` and ``description`` — how the model card writes it.

Notation (Hinton, Vinyals & Dean 2015): ``z`` student logits and ``v`` teacher logits, both ``[..., V]``; ``T`` the
temperature; ``p = softmax(z / T)``, ``q = softmax(v / T)``; ``a = z / T`` so ``∂/∂z = (1 / T) ∂/∂a``. Every value
carries the ``T²`` factor, which keeps gradient magnitudes independent of ``T`` (the paper's §2), so each gradient
below is ``T`` times the derivative of ``D`` in ``a``.

Adding a divergence (the four built-in ones are registered at the bottom of this file the same way)::

    from hf_distill import register_distillation_loss

    @register_distillation_loss("tvd", formula="T² · ½ Σ|q − p|", description="total variation distance")
    def total_variation(student_logits, teacher_logits, temperature):
        p = torch.softmax(student_logits / temperature, dim=-1)
        q = torch.softmax(teacher_logits / temperature, dim=-1)
        return temperature**2 * 0.5 * (q - p).abs().sum(-1)

after which ``DistillationTrainingArguments(distillation_loss="tvd")`` trains with it on both paths. A value function
receives float32 ``[..., V]`` logits and must treat every position independently (the chunked path evaluates positions
in groups and drops uncounted ones); keyword arguments it names among the divergence options
(:data:`DIVERGENCE_OPTIONS`, e.g. ``jsd_beta``) are passed from the training arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


# Above this temperature the naive path computes in float64 (and the chunked path differentiates it by autograd):
# ``T² · D`` multiplies the float32 rounding of the log-probabilities (≈ 6e-8 · log V each) by T², so at T = 1000 a
# float32 reverse KL or JSD of nearly equal distributions came out negative (−0.0098 where the value is 0.0122).
FLOAT64_ABOVE_TEMPERATURE = 20.0
# The largest temperature accepted: in float64 the same rounding stays below ~1e-9 there. Far beyond it the soft
# targets are uniform and every divergence tends to logit matching, `"mse"`.
MAX_TEMPERATURE = 1000.0

# Training-argument fields that a divergence may take as keyword arguments (passed only to those naming them).
DIVERGENCE_OPTIONS: tuple[str, ...] = ("jsd_beta",)

ValueFunction = Callable[..., torch.Tensor]
ValueAndGradientFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Divergence:
    """One registered distillation divergence.

    Attributes:
        name: the `distillation_loss` value that selects it.
        value: ``value(student_logits, teacher_logits, temperature, **options) -> [...]``: float32 ``T² · D(q ‖ p)``
            per position, from float32 ``[..., V]`` logits; differentiable in ``student_logits``.
        value_and_gradient: optional closed form for the chunked path,
            ``value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out, **options)``
            ``-> (values [...], gradient [..., V])``, where ``workspace`` is float32 ``[4, ..., V]`` scratch space the
            function may overwrite and ``gradient_out`` a float32 ``[..., V]`` tensor to write the gradient into. The
            logits may be of any float dtype and must not be modified.
        formula: the term as the model card's objective writes it, e.g. ``"T² · KL(teacher_T ‖ student_T)"``.
        description: one line for the model card.
    """

    name: str
    value: ValueFunction
    value_and_gradient: ValueAndGradientFunction | None = None
    formula: str = ""
    description: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """The divergence options (:data:`DIVERGENCE_OPTIONS`) that its value function takes."""
        parameters = inspect.signature(self.value).parameters
        return tuple(name for name in DIVERGENCE_OPTIONS if name in parameters)

    def select_options(self, options: dict) -> dict:
        return {name: value for name, value in options.items() if name in self.options}


DISTILLATION_LOSSES: dict[str, Divergence] = {}


def register_distillation_loss(
    name: str,
    value: ValueFunction | None = None,
    *,
    value_and_gradient: ValueAndGradientFunction | None = None,
    formula: str | None = None,
    description: str | None = None,
    overwrite: bool = False,
):
    """Register a divergence under `name` (usable as `distillation_loss=name`); also a decorator of `value`.

    Args:
        name: the name to select it by.
        value: per-position ``T² · D`` (see :class:`Divergence`).
        value_and_gradient: its closed-form gradient for the chunked path (optional; without it the chunked path runs
            autograd on each chunk: the same result, with autograd's intermediates for one chunk held at a time).
        formula, description: for the model card; default ``D_<name>(teacher_T ‖ student_T)`` and the first line of
            `value`'s docstring.
        overwrite: replace an entry of the same name (otherwise a clash is an error).

    Returns:
        The :class:`Divergence` (or, used as a decorator, `value` itself).
    """

    def register(value_function: ValueFunction):
        if not callable(value_function):
            raise TypeError(f"The value of distillation loss {name!r} must be callable, got {type(value_function)}.")
        if name in DISTILLATION_LOSSES and not overwrite and DISTILLATION_LOSSES[name].value is not value_function:
            raise ValueError(
                f"A distillation loss named {name!r} is already registered; pick another name or pass overwrite=True."
            )
        doc = (inspect.getdoc(value_function) or "").strip().splitlines()
        DISTILLATION_LOSSES[name] = Divergence(
            name=name,
            value=value_function,
            value_and_gradient=value_and_gradient,
            formula=formula or f"T² · D_{name}(teacher_T ‖ student_T)",
            description=description or (doc[0] if doc else name),
        )
        return DISTILLATION_LOSSES[name]

    if value is None:
        return lambda value_function: register(value_function).value
    return register(value)


def compute_dtype(temperature: float, device: torch.device) -> torch.dtype:
    """float32, or float64 above :data:`FLOAT64_ABOVE_TEMPERATURE` (except on MPS, which has no float64)."""
    if temperature > FLOAT64_ABOVE_TEMPERATURE and device.type != "mps":
        return torch.float64
    return torch.float32


def get_distillation_loss(loss: str | Divergence | ValueFunction) -> Divergence:
    """The registered :class:`Divergence` for a name (or the entry itself); a callable is registered under its
    ``__name__`` first. The one place that rejects an unknown name."""
    if isinstance(loss, Divergence):
        return loss
    if callable(loss):
        name = getattr(loss, "__name__", "")
        if not name.isidentifier():
            raise ValueError(
                f"A callable `distillation_loss` needs a name to be recorded by (got {name!r}): define it with `def`, "
                "or register it with `register_distillation_loss(name, fn)` and pass the name."
            )
        entry = DISTILLATION_LOSSES.get(name)
        return entry if entry is not None and entry.value is loss else register_distillation_loss(name, loss)
    if loss not in DISTILLATION_LOSSES:
        raise ValueError(
            f"Unknown distillation loss {loss!r}; choose one of {list(DISTILLATION_LOSSES)}, or add yours with "
            "`hf_distill.register_distillation_loss`."
        )
    return DISTILLATION_LOSSES[loss]


# ---- shared pieces of the closed forms ----


def _float32_scaled(logits: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``logits.float() / T`` (the naive loss's order of operations), written into ``out`` unless no copy is needed.

    Strided rows (a chunk spanning several sequences of a causal-shifted view) are copied too: `log_softmax` would
    otherwise make its own contiguous copy, allocated anew for every chunk.
    """
    if logits.dtype == torch.float32 and temperature != 1.0:
        return torch.div(logits, temperature, out=out)
    if logits.dtype == torch.float32 and logits.is_contiguous():
        return logits
    out.copy_(logits)
    return out if temperature == 1.0 else out.div_(temperature)


def _tempered_log_probs(student_logits, teacher_logits, temperature, workspace):
    """``log p`` and ``log q`` written into workspace slots 1 and 2; returns the four slots (0 and 3 are free)."""
    scratch, student_log_probs, teacher_log_probs, product = workspace
    torch.log_softmax(_float32_scaled(student_logits, temperature, scratch), dim=-1, out=student_log_probs)
    torch.log_softmax(_float32_scaled(teacher_logits, temperature, scratch), dim=-1, out=teacher_log_probs)
    return scratch, student_log_probs, teacher_log_probs, product


def _kl_from_log_probs(log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """``KL(target ‖ input) = Σ_i target_i (log target_i − log input_i)`` over the last axis, from log-probabilities.

    Terms with ``target_i = 0`` contribute 0 (``exp(-inf) * finite`` is handled by ``F.kl_div``'s ``log_target``).
    """
    return F.kl_div(log_input, log_target, reduction="none", log_target=True).sum(-1)


def _tempered(student_logits, teacher_logits, temperature):
    return F.log_softmax(student_logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature, dim=-1)


# ---- forward KL ----


def forward_kl(student_logits, teacher_logits, temperature):
    """``T² · KL(q ‖ p) = T² Σ q (log q − log p)``: Hinton et al.'s soft-target cross-entropy minus the teacher's
    entropy (the same gradient)."""
    student_log_probs, teacher_log_probs = _tempered(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(teacher_log_probs, student_log_probs) * temperature**2


def forward_kl_value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out):
    """``∂/∂z = T (p − q)``: ``T²`` times the paper's ``(1/T)(p_i − q_i)``."""
    scratch, student_log_probs, teacher_log_probs, product = _tempered_log_probs(
        student_logits, teacher_logits, temperature, workspace
    )
    teacher_probs = torch.exp(teacher_log_probs, out=scratch)
    values = torch.sub(teacher_log_probs, student_log_probs, out=product).mul_(teacher_probs).sum(dim=-1)
    gradient = torch.exp(student_log_probs, out=gradient_out).sub_(teacher_probs)  # p − q
    return values * temperature**2, gradient.mul_(temperature)


# ---- reverse KL ----


def reverse_kl(student_logits, teacher_logits, temperature):
    """``T² · KL(p ‖ q) = T² Σ p (log p − log q)``: mode seeking."""
    student_log_probs, teacher_log_probs = _tempered(student_logits, teacher_logits, temperature)
    return _kl_from_log_probs(student_log_probs, teacher_log_probs) * temperature**2


def reverse_kl_value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out):
    """With ``r = log p − log q`` and ``D = Σ p r``: ``∂D/∂a_j = Σ_i p_i (δ_ij − p_j)(r_i + 1) = p_j (r_j − D)``, so
    ``∂/∂z = T p (r − D)``."""
    scratch, student_log_probs, teacher_log_probs, product = _tempered_log_probs(
        student_logits, teacher_logits, temperature, workspace
    )
    student_probs = torch.exp(student_log_probs, out=scratch)
    log_ratio = student_log_probs.sub_(teacher_log_probs)  # r = log p − log q
    values = torch.mul(student_probs, log_ratio, out=product).sum(dim=-1)
    gradient = torch.sub(log_ratio, values[..., None], out=gradient_out).mul_(student_probs)  # p (r − D)
    return values * temperature**2, gradient.mul_(temperature)


# ---- generalized Jensen–Shannon ----


def generalized_jsd(student_logits, teacher_logits, temperature, jsd_beta: float = 0.5):
    """``T² [β KL(q ‖ m) + (1 − β) KL(p ‖ m)]`` with ``m = β q + (1 − β) p`` (TRL's GKD convention; ``β = jsd_beta``
    in (0, 1), 0.5 the symmetric JSD)."""
    student_log_probs, teacher_log_probs = _tempered(student_logits, teacher_logits, temperature)
    mixture_log_probs = torch.logaddexp(
        teacher_log_probs + math.log(jsd_beta), student_log_probs + math.log1p(-jsd_beta)
    )
    divergence = jsd_beta * _kl_from_log_probs(teacher_log_probs, mixture_log_probs) + (
        1.0 - jsd_beta
    ) * _kl_from_log_probs(student_log_probs, mixture_log_probs)
    return divergence * temperature**2


def generalized_jsd_value_and_gradient(
    student_logits, teacher_logits, temperature, workspace, gradient_out, jsd_beta: float = 0.5
):
    """The sum equals ``β Σ q log q + (1 − β) Σ p log p − Σ m log m``, whose derivative in ``p_i`` is
    ``(1 − β)(log p_i − log m_i)``; through the softmax, ``∂/∂z = T (1 − β) p (log p − log m − KL(p ‖ m))``."""
    scratch, student_log_probs, teacher_log_probs, product = _tempered_log_probs(
        student_logits, teacher_logits, temperature, workspace
    )
    mixture_log_probs = torch.logaddexp(  # log m, in `scratch`
        torch.add(teacher_log_probs, math.log(jsd_beta), out=scratch),
        torch.add(student_log_probs, math.log1p(-jsd_beta), out=product),
        out=scratch,
    )
    teacher_term = torch.sub(teacher_log_probs, mixture_log_probs, out=product)
    teacher_term = teacher_term.mul_(teacher_log_probs.exp_()).sum(dim=-1)  # KL(q ‖ m)
    student_probs = torch.exp(student_log_probs, out=teacher_log_probs)  # log q is no longer needed
    log_ratio = student_log_probs.sub_(mixture_log_probs)  # log p − log m
    student_term = torch.mul(student_probs, log_ratio, out=product).sum(dim=-1)  # KL(p ‖ m)
    values = jsd_beta * teacher_term + (1.0 - jsd_beta) * student_term
    gradient = torch.sub(log_ratio, student_term[..., None], out=gradient_out).mul_(student_probs)
    return values * temperature**2, gradient.mul_((1.0 - jsd_beta) * temperature)


# ---- logit matching ----


def logit_mse(student_logits, teacher_logits, temperature):
    """``(1 / 2V) Σ_i (z̃_i − ṽ_i)²`` with ``z̃, ṽ`` the logits centred to zero mean over the last axis: the paper's
    high-temperature limit (softmax ignores a per-row shift, and the limit assumes zero-mean logits). Its gradient
    ``(1/V)(z̃ − ṽ)`` is exactly the paper's ``T² · (1 / (V T²))(z_i − v_i)``, so it does not depend on ``T``."""
    difference = student_logits - teacher_logits
    difference = difference - difference.mean(dim=-1, keepdim=True)
    return 0.5 * difference.pow(2).mean(dim=-1)


def logit_mse_value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out):
    """``∂/∂z = (z̃ − ṽ) / V`` (centring is an orthogonal projection, so it passes through unchanged)."""
    scratch, difference, _, product = workspace
    difference = torch.sub(
        _float32_scaled(student_logits, 1.0, scratch), _float32_scaled(teacher_logits, 1.0, product), out=difference
    )
    difference.sub_(difference.mean(dim=-1, keepdim=True))
    values = 0.5 * torch.mul(difference, difference, out=product).mean(dim=-1)
    return values, torch.div(difference, difference.shape[-1], out=gradient_out)


register_distillation_loss(
    "kl",
    forward_kl,
    value_and_gradient=forward_kl_value_and_gradient,
    formula="T² · KL(teacher_T ‖ student_T)",
    description="forward KL(teacher_T ‖ student_T), Hinton et al.'s soft-target loss",
)
register_distillation_loss(
    "reverse_kl",
    reverse_kl,
    value_and_gradient=reverse_kl_value_and_gradient,
    formula="T² · KL(student_T ‖ teacher_T)",
    description="reverse KL(student_T ‖ teacher_T), mode seeking",
)
register_distillation_loss(
    "jsd",
    generalized_jsd,
    value_and_gradient=generalized_jsd_value_and_gradient,
    formula="T² · JSD_β(teacher_T, student_T)",
    description="generalized Jensen–Shannon divergence, mixture m = β·teacher_T + (1 − β)·student_T",
)
register_distillation_loss(
    "mse",
    logit_mse,
    value_and_gradient=logit_mse_value_and_gradient,
    formula="½ · mean_i (z̃_i − ṽ_i)²",
    description="logit matching: mean squared difference of the zero-centred student (z̃) and teacher (ṽ) logits, "
    "the paper's high-temperature limit (does not depend on T)",
)
