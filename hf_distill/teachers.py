"""Teachers: resolve, load, combine, freeze, place and run them, and align what they say with the student.

`DistillationTrainer` keeps only the Trainer hooks and the loss mix; everything about the teacher is here:

* :func:`build_teacher` — a model, a plain ``nn.Module``, a path / Hub id, or a list of these (an
  :class:`EnsembleTeacher`) → one frozen module in eval mode on the student's device;
* :func:`teacher_fingerprint` / :func:`teacher_identity` — a cheap identity of a teacher's weights, recorded in teacher
  caches and checked against the teacher a run is given;
* :func:`teacher_forward` — one no-grad forward on the inputs the teacher takes, under the student's autocast;
* :class:`TeacherSignal` / :func:`align_teacher_signal` — the teacher's signal for one micro-batch (dense logits or
  top-k log-probabilities, computed online or read from a cache) next to the student logits it is compared with.

Placement under DeepSpeed and FSDP is in :mod:`hf_distill.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging

from . import losses
from .models import accepted_arguments, auto_class_for, auto_class_for_architecture, logits_of, output_size


logger = logging.get_logger(__name__)

TeacherLike = PreTrainedModel | nn.Module | str


# ---- loading and identity ----


def load_teacher(name_or_path: str, student: nn.Module | None, init_kwargs: dict | None = None) -> PreTrainedModel:
    """Load a teacher from a path or Hub id with the `AutoModelFor...` class of the student's task head (without a
    student: the class of the first architecture its config names), with `init_kwargs` for `from_pretrained`."""
    init_kwargs = dict(init_kwargs or {})
    if _looks_like_a_path(name_or_path) and not os.path.exists(name_or_path):
        raise ValueError(
            f"The teacher path {name_or_path!r} does not exist (resolved to {os.path.abspath(name_or_path)!r}). Give "
            "the directory a teacher was saved to with `save_pretrained`, or a Hub id such as 'org/model'."
        )
    if student is None:
        auto_class = auto_class_for_architecture(AutoConfig.from_pretrained(name_or_path))
    else:
        auto_class = auto_class_for(student)
    if auto_class is None:
        raise ValueError(
            f"Cannot tell which AutoModelFor... class loads a teacher for a {type(student).__name__} student; load the "
            f"teacher yourself and pass the model as `teacher_model` instead of {name_or_path!r}."
        )
    for key in ("dtype", "torch_dtype"):  # "bfloat16" from a CLI/JSON config means torch.bfloat16
        if isinstance(init_kwargs.get(key), str) and init_kwargs[key] != "auto":
            init_kwargs[key] = getattr(torch, init_kwargs[key])
    return auto_class.from_pretrained(name_or_path, **init_kwargs)


def _looks_like_a_path(name_or_path: str) -> bool:
    """A filesystem path rather than a Hub id ('org/name' or 'name'): absolute, relative, home-based, or deeper."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or os.sep != "/"
        and os.sep in name_or_path
    )


def teacher_fingerprint(model: nn.Module) -> str:
    """A short, cheap identity of a teacher's weights: sha256 over every parameter's shape and first 1,024 values.

    Used to refuse cached teacher logits computed by another teacher. Reads ~4 kB per tensor, not the whole model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_name(model: nn.Module) -> str:
    """`name_or_path` of a transformers model, else its class name."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__


def ensemble_members(teacher: nn.Module | None) -> list[nn.Module]:
    """The individual teachers: an ensemble's members, a single teacher alone, none for no teacher."""
    if teacher is None:
        return []
    return list(teacher.teachers) if isinstance(teacher, EnsembleTeacher) else [teacher]


def teacher_identity(teachers: Sequence[nn.Module]) -> list[dict[str, str]]:
    """``[{"name": ..., "fingerprint": ...}]`` per teacher, as teacher caches record them."""
    return [{"name": model_name(t), "fingerprint": teacher_fingerprint(t)} for t in teachers]


# ---- ensembles ----


class EnsembleTeacher(nn.Module):
    """Several teachers as one: `forward` returns the ensemble's combined logits (`losses.ensemble_teacher_logits`).

    An arithmetic mean of tempered distributions depends on the temperature, so `forward` takes it
    (``temperature=``; default the one given here). Each teacher receives the inputs its `forward` takes.
    """

    def __init__(
        self, teachers: Sequence[nn.Module], reduction: str = "mean_probs", weights=None, temperature: float = 1.0
    ):
        super().__init__()
        losses.check_ensemble_settings(reduction, weights, len(teachers))
        self.teachers = nn.ModuleList(teachers)
        self.reduction, self.weights, self.temperature = reduction, weights, temperature
        self._arguments = [accepted_arguments(t) for t in teachers]
        if all(names is not None for names in self._arguments):
            # Show the members' inputs as this module's signature, so column filtering (Trainer's
            # `remove_unused_columns`, `accepted_arguments`) keeps exactly what some member takes.
            names = sorted(set().union(*self._arguments))
            forward = functools.partial(type(self).forward, self)
            forward.__signature__ = inspect.Signature(
                [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
            )
            self.forward = forward  # per instance: ensembles of different members have different inputs

    def forward(self, temperature: float | None = None, **inputs) -> torch.Tensor:
        per_teacher = [
            logits_of(teacher(**{k: v for k, v in inputs.items() if names is None or k in names}))
            for teacher, names in zip(self.teachers, self._arguments)
        ]
        return losses.ensemble_teacher_logits(
            per_teacher,
            reduction=self.reduction,
            weights=self.weights,
            temperature=self.temperature if temperature is None else temperature,
        )


def as_teacher_list(
    teacher_model: TeacherLike | Sequence[TeacherLike], student: nn.Module | None, init_kwargs: dict | None
) -> list[nn.Module]:
    """`teacher_model` (one or a list) as a list of modules, paths and Hub ids loaded."""
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    if not teachers:
        raise ValueError("`teacher_model` is an empty list; give at least one teacher.")
    teachers = [load_teacher(t, student, init_kwargs) if isinstance(t, str) else t for t in teachers]
    for teacher in teachers:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher_model` entries must be nn.Modules or paths/Hub ids, got {type(teacher)}.")
    return teachers


def build_teacher(teacher_model, student: nn.Module, args, *, device: torch.device | None) -> nn.Module | None:
    """Load and combine the teacher(s), freeze them (eval mode, no gradients) and move them to `device`.

    Args:
        teacher_model: a model, a path / Hub id, or a list of them; None for none.
        student: the student, whose task head chooses the Auto class of teachers given by name.
        args: the `DistillationTrainingArguments` (`teacher_model_init_kwargs`, `ensemble_reduction`,
            `teacher_weights`, `temperature`).
        device: where to put the teacher; None leaves it where it is (DeepSpeed/FSDP place it later, a
            `device_map`-dispatched teacher stays dispatched).
    """
    if teacher_model is None:
        return None
    teachers = as_teacher_list(teacher_model, student, args.teacher_model_init_kwargs)
    check_not_shared(student, teachers)
    losses.check_ensemble_settings(args.ensemble_reduction, args.teacher_weights, len(teachers))
    if len(teachers) > 1:
        for member in teachers[1:]:
            check_output_sizes(teachers[0], member)
        teacher = EnsembleTeacher(teachers, args.ensemble_reduction, args.teacher_weights, args.temperature)
    else:
        teacher = teachers[0]
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None and getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


def check_not_shared(student: nn.Module, teachers: Sequence[nn.Module]) -> None:
    """Refuse a teacher that is the student, or shares parameters (or their storage) with it.

    Freezing such a teacher would freeze the shared part of the student too (its weights would silently stay as
    they are), and training the student would change the teacher.
    """
    student_parameters = {}
    for name, parameter in student.named_parameters():
        student_parameters[id(parameter)] = name
        if _storage_pointer(parameter):
            student_parameters[_storage_pointer(parameter)] = name
    for teacher in teachers:
        if teacher is student:
            raise ValueError(
                "The same model was passed as the student (`model`) and as `teacher_model`. Distil from a separate "
                "teacher, e.g. `teacher_model=copy.deepcopy(model)` for self-distillation."
            )
        for name, parameter in teacher.named_parameters():
            shared = student_parameters.get(id(parameter)) or student_parameters.get(_storage_pointer(parameter))
            if shared:
                raise ValueError(
                    f"The student's parameter `{shared}` is the teacher's `{name}` (a module shared between the two, "
                    "e.g. `student.bert.embeddings = teacher.bert.embeddings`). The teacher is frozen, so that part of "
                    "the student would never train. Give the student its own copy: `copy.deepcopy(...)` of the "
                    "shared module."
                )


def _storage_pointer(parameter: torch.Tensor) -> int | None:
    """Where a parameter's data lives (this process's shard for an FSDP2-sharded `DTensor`); None when empty."""
    local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    return local.untyped_storage().data_ptr() if local.numel() else None


def check_output_sizes(
    student: nn.Module, teacher: nn.Module | None, *, shift_labels: bool = False, tokenizer_size: int | None = None
) -> int | None:
    """Raise on a teacher/student output-size mismatch; return the vocabulary slice for padded causal LMs.

    Causal LMs (`shift_labels`) whose vocabularies differ only in padding past the tokenizer's `tokenizer_size` real
    entries are compared on those entries: the returned size. None when the sizes agree (or are unknown).
    """
    if isinstance(teacher, EnsembleTeacher):
        teacher = teacher.teachers[0]
    student_size, teacher_size = output_size(student), output_size(teacher) if teacher is not None else None
    if student_size is None or teacher_size is None or student_size == teacher_size:
        return None
    if shift_labels and tokenizer_size is not None and tokenizer_size <= min(student_size, teacher_size):
        logger.info(
            f"Teacher vocabulary {teacher_size} and student vocabulary {student_size} differ only in padding past "
            f"the tokenizer's {tokenizer_size} entries: distilling over those {tokenizer_size}."
        )
        return tokenizer_size
    raise ValueError(
        f"Teacher and student outputs differ in size: teacher {teacher_size}, student {student_size} "
        "(num_labels or vocabulary size). Use a teacher with the student's label set / tokenizer. (Causal LMs whose "
        "vocabularies only differ by padding are accepted when `processing_class` is their tokenizer.)"
    )


# ---- running the teacher ----


def _teacher_inputs(inputs: Mapping[str, Any], accepted: set[str] | None, *, keep_labels: bool = False) -> dict:
    """The batch's inputs that the teacher takes (`accepted`, None for any), without ``labels`` unless `keep_labels`,
    and with ``use_cache=False`` where it takes one (a KV cache is of no use to a single forward pass)."""
    teacher_inputs = {
        key: value
        for key, value in inputs.items()
        if (key != "labels" or keep_labels) and (accepted is None or key in accepted)
    }
    if accepted is not None and "use_cache" in accepted:
        teacher_inputs["use_cache"] = False
    return teacher_inputs


def check_cached_positions(num_cached: int, mask: torch.Tensor) -> None:
    """A token-level cache holds one row per counted position of its batch (``mask [...]`` bool), in order."""
    if num_cached != int(mask.sum()):
        raise ValueError(
            f"Cached teacher outputs hold {num_cached} positions for a batch that counts {int(mask.sum())}: they were "
            "computed with other labels/attention masks or for other rows. Recompute them with "
            "`precompute_teacher_logits` on this dataset."
        )


def teacher_forward(
    teacher: nn.Module,
    inputs: Mapping[str, Any],
    *,
    accepted: set[str] | None,
    keep_labels: bool = False,
    temperature: float | None = None,
    autocast: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """The teacher's logits for a batch: one forward under ``torch.no_grad()`` (and `autocast`, the student's).

    Args:
        teacher: the (prepared) teacher module.
        inputs: the batch, labels included; only the inputs the teacher takes (`accepted`, None for any) are passed.
        keep_labels: pass ``labels`` on (an encoder-decoder teacher builds its decoder inputs from them).
        temperature: given to an :class:`EnsembleTeacher` (whose arithmetic mean depends on it); None otherwise.
        autocast: a context-manager factory, e.g. ``accelerator.autocast``: the student runs under accelerate's
            autocast (its forward is wrapped at `prepare`); the teacher is never prepared, so it gets it explicitly.
    """
    teacher_inputs = _teacher_inputs(inputs, accepted, keep_labels=keep_labels)
    if temperature is not None:
        teacher_inputs["temperature"] = temperature
    with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
        return logits_of(teacher(**teacher_inputs))


def teacher_last_hidden_state(
    teacher: nn.Module,
    inputs: Mapping[str, Any],
    *,
    accepted: set[str] | None,
    autocast: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal-LM teacher's final hidden states ``[B, L, H]`` and its last position's logits ``[B, 1, V]``: one
    no-grad forward (as :func:`teacher_forward`) that skips the full logits (``logits_to_keep=1``), for the fused
    ``lm_head`` path (`hf_distill.fused`)."""
    teacher_inputs = _teacher_inputs(inputs, accepted)
    with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
        outputs = teacher(**teacher_inputs, output_hidden_states=True, logits_to_keep=1)
    return (outputs.hidden_states or [None])[-1], outputs.logits


# ---- the teacher's signal for one micro-batch ----


@dataclasses.dataclass
class TeacherSignal:
    """Student and teacher outputs over the same counted positions: what the KD term compares.

    Dense (full logits, online or cached) or sparse (the teacher's top-k, cached); the rows are the batch's positions
    (online: ``[B, (L',)]``) or its counted positions only (cached token level: ``[N]``).

    Attributes:
        student_logits: ``[..., V']`` student logits, or ``[..., k]`` gathered at the teacher's top-k ids (``[..., k + 1]``
            with a rest bucket: `hf_distill.losses.top_k_tail_logits`).
        teacher_logits: ``[..., V']`` teacher logits, or ``[..., k]`` top-k log-probabilities at T = 1 (``[..., k + 1]``
            with a rest bucket).
        mask: ``[...]`` bool, the positions that count.
        top_k_ids: ``[..., k]`` the teacher's top-k ids (descending), or None for a dense signal.
        student_full_logits: top-k only: the student's full logits ``[..., V]``, for its argmax.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    mask: torch.Tensor
    top_k_ids: torch.Tensor | None = None
    student_full_logits: torch.Tensor | None = None

    def agreement(self) -> torch.Tensor:
        """Number of counted positions where the student's top-1 equals the teacher's (two argmaxes over ``V``)."""
        if self.top_k_ids is not None:  # the ids are sorted, so the teacher's top-1 is the first
            student, teacher = self.student_full_logits.detach().argmax(-1), self.top_k_ids[..., 0]
        else:
            student, teacher = self.student_logits.detach().argmax(-1), self.teacher_logits.argmax(-1)
        return (student.eq(teacher) & self.mask).sum()


def align_teacher_signal(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    cached_teacher_outputs: torch.Tensor | None,
    cached_top_k_ids: torch.Tensor | None,
    online_teacher_logits: Callable[[], torch.Tensor],
    shift_labels: bool,
    token_level: bool,
    vocab_size: int | None,
    cached_top_k_tail: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> TeacherSignal:
    """The :class:`TeacherSignal` of a micro-batch.

    Args:
        student_logits: the student's logits ``[B, (L,) V]``.
        mask: the counted positions ``[B, (L',)]`` (causal LMs: already shifted).
        cached_teacher_outputs: the batch's cached teacher logits or top-k log-probabilities (`hf_distill.teacher_cache`),
            None when the teacher runs online.
        cached_top_k_ids: the cached top-k ids, when the cache holds top-k log-probabilities.
        online_teacher_logits: runs the teacher (called only without a cache).
        shift_labels: a causal LM: the logit at t predicts token t + 1, so the last position is dropped.
        token_level: one prediction per token: cached outputs hold counted positions only.
        vocab_size: compare only the first `vocab_size` entries (padded vocabularies), or None for all.
        cached_top_k_tail: the cached log-mass outside the teacher's top k (``top_k_tail`` caches), or None.
        temperature: T, with `cached_top_k_tail` (the student's rest bucket and the teacher's re-tempered one depend
            on it).

    Online: the full ``[B, (L',) V]`` tensors. Cached token-level outputs hold counted positions only, so the student's
    are selected to match: ``[N, V]`` with an all-true mask. Cached top-k: the student's logits at the teacher's top-k
    ids, ``[..., k]``; with a tail, ``[..., k + 1]`` "logits" of both over the top k plus a rest bucket
    (`hf_distill.losses.top_k_tail_logits`).
    """
    if shift_labels:
        student_logits = student_logits[..., :-1, :]
    if cached_teacher_outputs is None:
        teacher_logits = online_teacher_logits()
        if shift_labels:
            teacher_logits = teacher_logits[..., :-1, :]
        if vocab_size is not None:
            student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
        signal = TeacherSignal(student_logits, teacher_logits, mask)
    else:
        teacher_logits = cached_teacher_outputs
        if token_level:
            check_cached_positions(teacher_logits.shape[0], mask)
            student_logits, mask = student_logits[mask], mask.new_ones(teacher_logits.shape[0])
        if cached_top_k_ids is not None:
            top_k_ids = cached_top_k_ids.long()
            if top_k_ids.shape[:-1] != student_logits.shape[:-1]:
                raise ValueError(
                    f"Cached top-k teacher outputs {tuple(top_k_ids.shape)} do not match the batch's "
                    f"positions {tuple(student_logits.shape[:-1])}."
                )
            if cached_top_k_tail is not None:
                student_kd, teacher_kd = losses.top_k_tail_logits(
                    student_logits, top_k_ids, teacher_logits, cached_top_k_tail, temperature
                )
            else:
                student_kd, teacher_kd = student_logits.gather(-1, top_k_ids), teacher_logits
            return TeacherSignal(student_kd, teacher_kd, mask, top_k_ids, student_full_logits=student_logits)
        signal = TeacherSignal(student_logits, teacher_logits, mask)
    if signal.student_logits.shape != signal.teacher_logits.shape:
        raise ValueError(
            f"Teacher and student outputs differ: teacher logits {tuple(signal.teacher_logits.shape)}, student logits "
            f"{tuple(signal.student_logits.shape)} (last axis: num_labels or vocabulary size). Use a teacher with the "
            "student's label set / tokenizer (or recompute cached teacher outputs for this dataset)."
        )
    if signal.mask.shape != signal.student_logits.shape[:-1]:
        raise ValueError(
            f"Labels of shape {tuple(signal.mask.shape)} do not match logits of shape "
            f"{tuple(signal.student_logits.shape)} (one label per position expected; -100 marks positions to ignore)."
        )
    return signal
