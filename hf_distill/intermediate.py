"""Intermediate matches: chosen student layers' hidden states or attention maps pulled towards chosen teacher layers.

The losses of DistilBERT (cosine between last hidden states), TinyBERT (hidden-state MSE through a learned projection
``W_h``, attention-map MSE, on a uniform layer map) and TextBrewer's ``intermediate_matches``, as extra terms of
`DistillationTrainer`'s objective::

    loss = alpha · KD + (1 − alpha) · label_loss + Σ_m weight_m · match_m

This module holds all of it: the specification (:class:`IntermediateMatch`, the presets, parsing), the per-position
math (pure functions with shapes and formulas), the hooks that capture the matched layers during one forward, and the
learned projections (:class:`IntermediateMatcher`, with their checkpoint file). `DistillationTrainer` only wires it in.

Layer numbering — the ``hidden_states`` convention of transformers (``output_hidden_states=True``), for a model with
``L = config.num_hidden_layers`` blocks:

* hidden layer ``0`` is the embeddings' output (the input of block 1), ``k`` in ``1 … L−1`` the output of block ``k``,
  and ``L`` the base model's ``last_hidden_state`` (so, like ``hidden_states[L]``, after a final layer norm where the
  model has one, e.g. GPT-2's ``ln_f``);
* attention layer ``k`` in ``1 … L`` is block ``k``'s self-attention probabilities ``[B, heads, L_q, L_k]``; the
  embeddings (``0``) have none.

Only the matched layers are captured, by forward hooks registered for the duration of one forward on the blocks (a
pre-hook on block 1 for layer 0, a hook on the base model for layer ``L``, hooks on the matched blocks' attention
modules); nothing is requested with ``output_hidden_states``. Attention probabilities exist only in eager attention:
attention matches switch both models to it (``set_attn_implementation("eager")``), which materialises every layer's
``B · heads · L²`` probabilities and is slower than SDPA/flash attention.

Which positions count — the same as for the KD term, so that, summed over a micro-batch and divided by the optimizer
step's count of positions (all micro-batches, all processes), each match term is a mean per counted position and
gradient accumulation stays exact:

* token-level students (token classifiers, masked and causal LMs): the tokens whose label is not −100 (without labels,
  whose attention mask is 1); for causal LMs the hidden state at ``t`` counts when the logit at ``t`` does (it predicts
  token ``t + 1``), so the last position never counts;
* sequence-level students (one counted position per row): each counted row contributes the mean of the per-token values
  over its attended tokens (all tokens without an attention mask), so the term is a mean over counted rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .private_apis import attention_recorder
from .teachers import EnsembleTeacher


logger = logging.get_logger(__name__)

MATCH_FEATURES = ("hidden", "attention")
MATCH_LOSSES = {"hidden": ("mse", "cosine"), "attention": ("mse", "kl")}
PRESETS = ("distilbert", "tinybert")
PROJECTIONS_FILE = "distillation_projections.safetensors"
# The ε of `torch.nn.CosineEmbeddingLoss`, added to each squared norm.
COSINE_EPS = 1e-12


# ---- the specification ----


@dataclasses.dataclass(frozen=True)
class IntermediateMatch:
    """One match: student layer ``student_layer``'s `feature` pulled towards teacher layer ``teacher_layer``'s.

    Attributes:
        student_layer, teacher_layer: layer indices in the ``hidden_states`` convention (module docstring): ``0`` the
            embeddings, ``k`` block ``k``; attention maps exist for blocks ``1 … L`` only.
        feature: ``"hidden"`` (hidden states) or ``"attention"`` (self-attention probabilities).
        loss: ``"mse"`` or ``"cosine"`` for hidden states, ``"mse"`` or ``"kl"`` for attention maps.
        weight: the term's weight in the objective, finite and ≥ 0.
    """

    student_layer: int
    teacher_layer: int
    feature: str = "hidden"
    loss: str = "mse"
    weight: float = 1.0

    def __post_init__(self):
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer ≥ 0 (0 = the embeddings), got {value!r}.")
        if self.feature not in MATCH_FEATURES:
            raise ValueError(f"unknown `feature` {self.feature!r}; choose one of {list(MATCH_FEATURES)}.")
        if self.loss not in MATCH_LOSSES[self.feature]:
            other = "attention" if self.feature == "hidden" else "hidden"
            hint = f" ('{self.loss}' is for {other} matches)" if self.loss in MATCH_LOSSES[other] else ""
            raise ValueError(
                f"`loss` {self.loss!r} does not apply to {self.feature} matches{hint}; choose one of "
                f"{list(MATCH_LOSSES[self.feature])}."
            )
        if self.feature == "attention" and 0 in (self.student_layer, self.teacher_layer):
            raise ValueError(
                "attention maps are per block, layers 1 … L; layer 0 (the embeddings) has none. Use a block's index, "
                "or feature 'hidden' for the embeddings' output."
            )
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"`weight` must be a finite number ≥ 0, got {weight!r}.")
        object.__setattr__(self, "weight", float(weight))

    @property
    def name(self) -> str:
        """The logged key: ``loss_match_<student>_<teacher>``, ``loss_match_attn_<student>_<teacher>`` for attention."""
        kind = "attn_" if self.feature == "attention" else ""
        return f"loss_match_{kind}{self.student_layer}_{self.teacher_layer}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_intermediate_matches(value: Any) -> str | list[dict[str, Any]] | None:
    """`DistillationTrainingArguments.intermediate_matches`, validated and normalised (what needs no model).

    Accepts None, a preset name (``"distilbert"``, ``"tinybert"``), a list of match dicts (or
    :class:`IntermediateMatch`), one dict, or any of these as a JSON string (the command line). Returns None (no
    matches), the preset name, or a list of complete match dicts (defaults filled in).
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("[", "{")):
            if text not in PRESETS:
                raise ValueError(
                    f"`intermediate_matches`: unknown preset {value!r}; choose one of {list(PRESETS)}, or give the "
                    'matches as a list (JSON on the command line), e.g. \'[{"student_layer": 2, "teacher_layer": 4}]\'.'
                )
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"`intermediate_matches` is not valid JSON ({error}): {value!r}.") from None
    if isinstance(value, (Mapping, IntermediateMatch)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            "`intermediate_matches` must be a preset name, a list of matches (dicts with student_layer, "
            f"teacher_layer, feature, loss, weight) or that list as a JSON string, got {type(value).__name__}."
        )
    matches = [_match_from_entry(entry, index) for index, entry in enumerate(value)]
    names = [match.name for match in matches]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(
            f"`intermediate_matches` pairs the same layers with the same feature more than once ({duplicated}); "
            "each (student_layer, teacher_layer, feature) may appear once: merge them into one match."
        )
    return [match.to_dict() for match in matches] or None


def _match_from_entry(entry: Any, index: int) -> IntermediateMatch:
    if isinstance(entry, IntermediateMatch):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"`intermediate_matches`[{index}] must be a dict, got {entry!r}.")
    fields = [f.name for f in dataclasses.fields(IntermediateMatch)]
    unknown = sorted(set(entry) - set(fields))
    missing = [name for name in ("student_layer", "teacher_layer") if name not in entry]
    if unknown or missing:
        problem = f"unknown key(s) {unknown}" if unknown else f"missing {missing}"
        raise ValueError(f"`intermediate_matches`[{index}]: {problem}; a match takes the keys {fields}.")
    try:
        return IntermediateMatch(**entry)
    except ValueError as error:
        raise ValueError(f"`intermediate_matches`[{index}] {dict(entry)}: {error}") from None


def _text_config(model: nn.Module, role: str):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise ValueError(
            f"`intermediate_matches` need transformers models (their config gives depth, width and heads); the "
            f"{role} is a {type(model).__name__} without a `config`. Drop `intermediate_matches` for it."
        )
    return config.get_text_config()


def num_layers(config, role: str = "model") -> int:
    """``config.num_hidden_layers``, the number of blocks ``L``."""
    value = getattr(config, "num_hidden_layers", None)
    if not isinstance(value, int):
        raise ValueError(f"The {role}'s config has no `num_hidden_layers`; give `intermediate_matches` explicitly.")
    return value


def expand_intermediate_matches(value: Any, student_config, teacher_config) -> list[IntermediateMatch]:
    """The matches `value` (as `parse_intermediate_matches` accepts it) stands for, for these two models' configs.

    Presets, with ``L_s``, ``L_t`` the students' and teacher's ``num_hidden_layers``:

    * ``"distilbert"`` — cosine between the last hidden states: ``{L_s ↔ L_t, hidden, cosine, weight 1}``;
    * ``"tinybert"`` — TinyBERT's uniform layer map ``m ↔ ⌊m · L_t / L_s⌋``: hidden-state MSE for ``m = 0 … L_s``
      (embeddings ``0 ↔ 0`` included) and attention-map MSE for ``m = 1 … L_s``, each of weight 1. Needs
      ``L_t ≥ L_s``.
    """
    value = parse_intermediate_matches(value)
    if value is None:
        return []
    if not isinstance(value, str):
        return [IntermediateMatch(**entry) for entry in value]
    student_layers, teacher_layers = num_layers(student_config, "student"), num_layers(teacher_config, "teacher")
    if value == "distilbert":
        return [IntermediateMatch(student_layers, teacher_layers, "hidden", "cosine")]
    if teacher_layers < student_layers:
        raise ValueError(
            f"`intermediate_matches='tinybert'` maps each student layer to a deeper teacher layer, but the teacher has "
            f"{teacher_layers} blocks and the student {student_layers}. Give the matches explicitly."
        )
    layer_map = [(m, m * teacher_layers // student_layers) for m in range(student_layers + 1)]
    hidden = [IntermediateMatch(m, t, "hidden", "mse") for m, t in layer_map]
    return hidden + [IntermediateMatch(m, t, "attention", "mse") for m, t in layer_map[1:]]


# ---- the math: per-position values, then a weighted sum over counted positions ----


def project(hidden: torch.Tensor, projection: nn.Linear | None) -> torch.Tensor:
    """``hidden [..., D_s]`` in float32, through ``projection`` (``W h + b``, ``[..., D_t]``) when given; autocast off."""
    hidden = hidden.float()
    if projection is None:
        return hidden
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return projection(hidden)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(1/D) Σ_d (s_d − t_d)²`` per position: ``[B, L, D]`` (student already projected to the teacher's width D) →
    ``[B, L]``, float32."""
    return (student.float() - teacher.float()).pow(2).mean(-1)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 − cos(s, t)`` per position, ``cos = s·t / sqrt((|s|² + ε)(|t|² + ε))`` (ε = `COSINE_EPS`, as
    `torch.nn.CosineEmbeddingLoss` with target 1): ``[B, L, D]`` → ``[B, L]``, float32."""
    student, teacher = student.float(), teacher.float()
    dot = (student * teacher).sum(-1)
    norms = ((student * student).sum(-1) + COSINE_EPS) * ((teacher * teacher).sum(-1) + COSINE_EPS)
    return 1.0 - dot / norms.sqrt()


def group_heads(teacher: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Teacher maps ``[B, H_t, L_q, L_k]`` as ``num_heads`` heads: the mean of each group of ``H_t / num_heads``
    consecutive teacher heads (still a distribution over keys). ``H_t`` must be a multiple of ``num_heads``."""
    teacher_heads = teacher.shape[1]
    if teacher_heads == num_heads:
        return teacher
    if teacher_heads % num_heads:
        raise ValueError(
            f"Cannot compare {num_heads} student attention heads with {teacher_heads} teacher heads: a student head "
            "is compared with the mean of a group of consecutive teacher heads, so the teacher's must be a multiple."
        )
    return teacher.unflatten(1, (num_heads, teacher_heads // num_heads)).mean(2)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(1/H) Σ_h Σ_k (a_s − a_t)²`` per query position: ``[B, H, L_q, L_k]`` → ``[B, L_q]``, float32.

    Summed (not averaged) over keys, so padded keys — probability 0 in both maps — leave the value unchanged and it
    does not depend on how far a batch is padded (TinyBERT's element mean would, by a factor ``1/L_k``)."""
    return (student.float() - teacher.float()).pow(2).sum(-1).mean(1)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``(1/H) Σ_h KL(a_t ‖ a_s) = (1/H) Σ_h Σ_k a_t (log a_t − log a_s)`` per query position (MiniLM's attention
    loss): ``[B, H, L_q, L_k]`` → ``[B, L_q]``, float32. Keys where ``a_t = 0`` add 0; both maps are clamped to the
    smallest normal float32 inside the logs, so a key the student gives 0 but the teacher does not costs ≈ 87·a_t
    instead of inf."""
    tiny = torch.finfo(torch.float32).tiny
    student, teacher = student.float(), teacher.float()
    # The difference of logs first: less cancellation than Σ a_t log a_t − Σ a_t log a_s for nearly equal maps.
    return (teacher * (teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log())).sum(-1).mean(1)


def position_weights(
    counted: torch.Tensor, attention_mask: torch.Tensor | None, length: int, *, shift: bool
) -> torch.Tensor:
    """``[B, length]`` float32 weights of the per-position values: summed with them they give a micro-batch's sum of
    the match term over its counted positions (see the module docstring).

    Args:
        counted: the counted positions, ``[B, L']`` (token level; causal LMs: shifted, ``L' = length − 1``) or
            ``[B]`` (one position per row).
        attention_mask: ``[B, length]``, used at sequence level (each row's attended tokens); None: all tokens.
        length: the sequence length of the matched tensors.
        shift: a causal LM: the hidden state at ``t`` counts when the logit at ``t`` does (``counted[:, t]``).
    """
    if counted.dim() == 2:
        if shift:
            counted = F.pad(counted, (0, 1), value=False)
        if counted.shape[1] != length:
            raise ValueError(
                f"The matched layers have {length} positions, the labels {counted.shape[1]}: intermediate matches need "
                "one hidden state per labelled token."
            )
        return counted.float()
    attended = torch.ones(counted.shape[0], length, device=counted.device)
    if attention_mask is not None and tuple(attention_mask.shape) == (counted.shape[0], length):
        attended = attention_mask.float()
    return attended / attended.sum(-1, keepdim=True).clamp(min=1) * counted.float()[:, None]


def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ values · weights`` over positions with a weight > 0 (a NaN at a position that does not count stays out)."""
    return torch.where(weights > 0, values * weights, torch.zeros((), device=values.device)).sum()


# ---- finding and hooking the layers ----


@dataclasses.dataclass
class _ModelLayers:
    base: nn.Module
    blocks: list[nn.Module]
    attention: list[nn.Module] | None  # per block; None when no attention is matched
    attention_index: int = 1


def _find_layers(model: nn.Module, role: str, with_attention: bool) -> _ModelLayers:
    """The base model, its ``L`` blocks (the one `nn.ModuleList` of length ``config.num_hidden_layers``) and, when
    asked, each block's self-attention module (where transformers records ``output_attentions``)."""
    depth = num_layers(_text_config(model, role), role)
    base = getattr(model, "base_model", model)
    candidates = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == depth
    ]
    if len(candidates) != 1:
        found = [name for name, _ in candidates] or "none"
        raise ValueError(
            f"`intermediate_matches`: cannot tell the {role}'s blocks ({type(model).__name__}): looked for one "
            f"nn.ModuleList of config.num_hidden_layers={depth} modules, found {found}. Matches support models with "
            "one stack of blocks (encoder-only or decoder-only transformers)."
        )
    blocks = list(candidates[0][1])
    if not with_attention:
        return _ModelLayers(base, blocks, None)
    recorder = attention_recorder(model)
    if recorder is None:
        raise ValueError(
            f"`intermediate_matches`: the {role} ({type(model).__name__}) does not say which module holds its "
            "attention probabilities (it cannot return `output_attentions`); use hidden-state matches for it."
        )
    target_class, index, layer_name = recorder
    attention = []
    for number, block in enumerate(blocks, start=1):
        found = [
            module
            for name, module in block.named_modules()
            if isinstance(module, target_class) and (layer_name is None or f".{layer_name.strip('.')}." in f".{name}.")
        ]
        if len(found) != 1:
            raise ValueError(
                f"`intermediate_matches`: block {number} of the {role} holds {len(found)} {target_class.__name__} "
                "modules, so its self-attention is ambiguous; use hidden-state matches for this model."
            )
        attention.append(found[0])
    return _ModelLayers(base, blocks, attention, index)


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    return output[0]


@contextlib.contextmanager
def capture_layers(
    layers: _ModelLayers, hidden: Sequence[int], attention: Sequence[int]
) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Hooks on exactly the `hidden` and `attention` layers for the duration of the ``with`` block (one forward).

    Yields ``{"hidden": {layer: [B, L, D]}, "attention": {layer: [B, H, L_q, L_k]}}``, filled by the forward; the
    tensors are the model's own (in its graph for the student, under no_grad for the teacher).
    """
    captured: dict[str, dict[int, torch.Tensor]] = {"hidden": {}, "attention": {}}
    depth = len(layers.blocks)

    def keep(kind: str, layer: int, value: torch.Tensor | None) -> None:
        if value is None and kind == "attention":
            raise ValueError(
                f"Block {layer}'s attention module returned no attention probabilities; attention matches need eager "
                "attention (`model.set_attn_implementation('eager')`), which this model did not keep."
            )
        captured[kind][layer] = value

    handles = []
    try:
        for layer in hidden:
            if layer == 0:  # the embeddings' output: block 1's input, as `hidden_states[0]`

                def hook(module, args, kwargs, layer=layer):
                    keep("hidden", layer, args[0] if args else kwargs["hidden_states"])

                handles.append(layers.blocks[0].register_forward_pre_hook(hook, with_kwargs=True))
            else:  # block k's output; layer L: the base model's `last_hidden_state`, as `hidden_states[L]`
                module = layers.base if layer == depth else layers.blocks[layer - 1]
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, output, layer=layer: keep("hidden", layer, _first(output))
                    )
                )
        for layer in attention:
            index = layers.attention_index
            handles.append(
                layers.attention[layer - 1].register_forward_hook(
                    lambda m, a, output, layer=layer, index=index: keep("attention", layer, output[index])
                )
            )
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ---- the trainer's object: matches, projections, hooks, checkpoint file ----


class IntermediateMatcher(nn.Module):
    """The expanded matches of a run and the learned projections they need.

    A hidden-state match between different widths ``D_s ≠ D_t`` gets a projection ``nn.Linear(D_s, D_t)`` (TinyBERT's
    ``W_h``, with a bias), float32, trained with the student and saved in checkpoints (`PROJECTIONS_FILE`) but never in
    the student. Its parameters are this module's; the models are not its submodules.

    Args:
        matches: the expanded matches (`expand_intermediate_matches`).
        student, teacher: the two models (transformers models with one stack of blocks).
    """

    def __init__(self, matches: Sequence[IntermediateMatch], student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.matches = list(matches)
        configs = {"student": _text_config(student, "student"), "teacher": _text_config(teacher, "teacher")}
        for role, config in configs.items():
            depth = num_layers(config, role)
            for match in self.matches:
                layer = getattr(match, f"{role}_layer")
                if layer > depth:
                    raise ValueError(
                        f"`intermediate_matches`: {match.name} uses {role} layer {layer}, but the {role} has {depth} "
                        f"blocks: hidden layers are 0 (embeddings) … {depth}, attention layers 1 … {depth}. Use a "
                        f"layer in that range."
                    )
        self.projections = nn.ModuleDict()
        student_width = getattr(configs["student"], "hidden_size", None)
        teacher_width = getattr(configs["teacher"], "hidden_size", None)
        for index, match in enumerate(self.matches):
            if match.feature == "hidden" and student_width != teacher_width:
                if not (isinstance(student_width, int) and isinstance(teacher_width, int)):
                    raise ValueError(
                        "`intermediate_matches`: hidden-state matches need both configs' `hidden_size` (to size the "
                        "projection between them)."
                    )
                self.projections[str(index)] = nn.Linear(student_width, teacher_width, dtype=torch.float32)
            if match.feature == "attention":
                heads = [getattr(configs[role], "num_attention_heads", None) for role in ("student", "teacher")]
                if all(isinstance(h, int) for h in heads) and heads[1] % heads[0]:
                    raise ValueError(
                        f"`intermediate_matches`: {match.name} compares attention maps of a student with {heads[0]} "
                        f"heads and a teacher with {heads[1]}: each student head is compared with the mean of a group "
                        "of consecutive teacher heads, so the teacher's count must be a multiple of the student's. "
                        "Use a student whose head count divides the teacher's, or drop the attention matches."
                    )
        self.register_buffer("weights", torch.tensor([m.weight for m in self.matches]), persistent=False)
        self._layers: dict[str, tuple[nn.Module, _ModelLayers]] = {}
        self._with_attention = any(match.feature == "attention" for match in self.matches)
        for role, model in (("student", student), ("teacher", teacher)):
            self._layers_of(model, role)  # fails now, not at the first step, on a model without findable blocks
            if self._with_attention and hasattr(model, "set_attn_implementation"):
                # Only eager attention returns the probabilities. The switch is not saved in the config.
                model.set_attn_implementation("eager")
        if self._with_attention:
            logger.info(
                "intermediate_matches: attention matches switched student and teacher to eager attention "
                "(the attention probabilities exist only there); SDPA/flash attention are faster."
            )
            dropout = next(
                (
                    getattr(configs["student"], name)
                    for name in ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
                    if getattr(configs["student"], name, 0)
                ),
                0,
            )
            if dropout:
                logger.warning(
                    f"intermediate_matches: the student's attention dropout is {dropout}; in training its captured "
                    "attention maps are the dropped-out ones. Set it to 0 for attention matches (KL especially)."
                )

    @property
    def names(self) -> list[str]:
        return [match.name for match in self.matches]

    def describe(self) -> list[dict[str, Any]]:
        """The expanded matches as plain dicts (model card, checkpoint metadata)."""
        return [match.to_dict() for match in self.matches]

    def _layers_of(self, model: nn.Module, role: str) -> _ModelLayers:
        cached = self._layers.get(role)
        if cached is None or cached[0] is not model:  # e.g. `model_init` built a new student
            cached = (model, _find_layers(model, role, self._with_attention))
            self._layers[role] = cached
        return cached[1]

    def capture(self, model: nn.Module, role: str):
        """`capture_layers` on `model` (the unwrapped student or the teacher) for the layers `role` matches."""
        hidden = sorted({getattr(m, f"{role}_layer") for m in self.matches if m.feature == "hidden"})
        attention = sorted({getattr(m, f"{role}_layer") for m in self.matches if m.feature == "attention"})
        return capture_layers(self._layers_of(model, role), hidden, attention)

    def match_sums(
        self,
        student: Mapping[str, Mapping[int, torch.Tensor]],
        teacher: Mapping[str, Mapping[int, torch.Tensor]],
        counted: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        shift: bool,
    ) -> torch.Tensor:
        """``[M]`` float32: each match's per-position values summed over the micro-batch's counted positions (weighted
        by `position_weights`), from the tensors `capture` gathered; differentiable in the student's and projections'.
        """
        sums = []
        for index, match in enumerate(self.matches):
            student_value = student[match.feature].get(match.student_layer)
            teacher_value = teacher[match.feature].get(match.teacher_layer)
            if student_value is None or teacher_value is None:
                role = "student" if student_value is None else "teacher"
                raise ValueError(
                    f"{match.name}: the {role}'s layer was not captured in this step (did its forward run? intermediate "
                    "matches need an online teacher, not cached teacher outputs)."
                )
            teacher_value = teacher_value.to(student_value.device)
            if match.feature == "hidden":
                student_value = project(
                    student_value, self.projections[str(index)] if str(index) in self.projections else None
                )
                values = (hidden_mse if match.loss == "mse" else hidden_cosine)(student_value, teacher_value)
            else:
                teacher_value = group_heads(teacher_value, student_value.shape[1])
                values = (attention_mse if match.loss == "mse" else attention_kl)(student_value, teacher_value)
            weights = position_weights(counted, attention_mask, values.shape[1], shift=shift)
            sums.append(weighted_sum(values, weights))
        return torch.stack(sums)

    def weighted_total(self, sums: torch.Tensor) -> torch.Tensor:
        """``Σ_m weight_m · sums_m``."""
        return (sums * self.weights.to(sums.device)).sum()

    # ---- optimizer, distributed gradients, checkpoints ----

    def add_to_optimizer(self, optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
        """Add the projections to `optimizer` (unless there already): weights with `weight_decay`, biases without, as
        Trainer groups the student's parameters. At the optimizer's default learning rate, so the scheduler drives it."""
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        weights = [
            p for name, p in self.projections.named_parameters() if name.endswith("weight") and id(p) not in present
        ]
        biases = [
            p for name, p in self.projections.named_parameters() if name.endswith("bias") and id(p) not in present
        ]
        for params, decay in ((weights, weight_decay), (biases, 0.0)):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": decay})

    def average_gradients(self) -> None:
        """All-reduce (mean) the projections' gradients over processes: they are outside the DDP-wrapped student."""
        for parameter in self.projections.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= torch.distributed.get_world_size()

    def save(self, folder: str) -> None:
        """Write the projections to ``folder/PROJECTIONS_FILE`` (nothing when no match needs one)."""
        if not len(self.projections):
            return
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.projections.state_dict().items()}
        save_file(tensors, os.path.join(folder, PROJECTIONS_FILE), metadata={"matches": json.dumps(self.describe())})

    def saved_in(self, folder: str) -> bool:
        """Whether checkpoint `folder` has what `load` needs (always, when no match needs a projection)."""
        return not len(self.projections) or os.path.isfile(os.path.join(folder, PROJECTIONS_FILE))

    def load(self, folder: str) -> None:
        """Restore the projections saved in checkpoint `folder`, refusing a file written for other matches."""
        if not len(self.projections):
            return
        path = os.path.join(folder, PROJECTIONS_FILE)
        if not self.saved_in(folder):
            raise ValueError(
                f"The checkpoint {folder} has no {PROJECTIONS_FILE}, the learned projections of the intermediate "
                "matches: it was written by a run without these matches, or its save was interrupted. Resume from a "
                "checkpoint of this run, or train without `resume_from_checkpoint`."
            )
        with safe_open(path, framework="pt") as f:
            saved_matches = json.loads((f.metadata() or {}).get("matches", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if saved_matches != self.describe():
            raise ValueError(
                f"{path} holds the projections of other intermediate matches ({saved_matches}) than this run's "
                f"({self.describe()}); resume with the `intermediate_matches` the checkpoint was trained with."
            )
        self.projections.load_state_dict(tensors)  # copied into the existing parameters


class IntermediateMatchesCallback(TrainerCallback):
    """Keeps the projections in step with the run: averages their gradients over processes before each optimizer step
    (they are not in the DDP-wrapped model), clears them after it, and writes the projections into each checkpoint
    folder (`PROJECTIONS_FILE`)."""

    def __init__(self, matcher: IntermediateMatcher):
        self.matcher = matcher

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.matcher.average_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.matcher.zero_grad(set_to_none=True)  # Trainer zeroes the student's gradients only (`model.zero_grad()`)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            self.matcher.save(folder)


def build_intermediate_matcher(spec: Any, student: nn.Module, teacher: nn.Module | None) -> IntermediateMatcher | None:
    """The run's :class:`IntermediateMatcher` for `DistillationTrainingArguments.intermediate_matches` (None: none),
    refusing what cannot be matched: no teacher to run (cached teacher outputs only) or an ensemble of teachers."""
    if parse_intermediate_matches(spec) is None:
        return None
    if teacher is None:
        raise ValueError(
            "`intermediate_matches` need the teacher's hidden states, but this trainer has no `teacher_model` (it "
            "learns from cached teacher outputs, which hold logits only). Pass the teacher as `teacher_model` and "
            "train on data without cached teacher columns, or drop `intermediate_matches`."
        )
    if isinstance(teacher, EnsembleTeacher):
        raise ValueError(
            f"`intermediate_matches` match one teacher's layers, but `teacher_model` is an ensemble of "
            f"{len(teacher.teachers)}. Distil from a single teacher, or drop `intermediate_matches`."
        )
    student_config, teacher_config = _text_config(student, "student"), _text_config(teacher, "teacher")
    matches = expand_intermediate_matches(spec, student_config, teacher_config)
    return IntermediateMatcher(matches, student, teacher)
