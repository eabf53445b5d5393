"""Initialise a student from its teacher's own layers: DistilBERT's recipe (Sanh et al., 2019).

"With distillation, the initialization is really important": DistilBERT starts as BERT with one layer out of two, the
embeddings and head kept as they are, and only then is distilled. `init_student_from_teacher` does this for any
`transformers` model whose transformer blocks are one ``nn.ModuleList`` sized by ``config.num_hidden_layers``
(BERT-family encoders, GPT-2, Llama/Qwen/Mistral-family decoders, ...):

1. the teacher's config is copied with the new layer count, and every config field holding one entry per layer (a
   list as long as the teacher's layer count: ``layer_types``, per-layer sliding windows...) keeps the kept layers'
   entries;
2. a new model of the teacher's class is built from that config — so everything a block derives from its index
   (``layer_idx``, used by the KV cache) is the student's index, and the student is exactly what
   ``from_pretrained`` gives after ``save_pretrained``;
3. every parameter and buffer is copied from the teacher (a clone: nothing is shared), block ``keep_layers[i]`` of the
   teacher becoming block ``i`` of the student; the embeddings, final norm and head are copied as they are.

A model whose weights outside the blocks depend on the layer count, or whose blocks cannot be found, is refused
with a `ValueError` rather than half-copied; so is an encoder-decoder model (two stacks, two layer counts).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights


__all__ = ["evenly_spread_layers", "init_student_from_teacher"]

# Config fields that are lists but not one entry per layer, whatever their length.
_NOT_PER_LAYER = frozenset({"architectures"})


def evenly_spread_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """`num_layers` block indices spread evenly over `num_teacher_layers`, first and last included.

    Layer ``i`` of the student is the teacher's ``round(i * (L - 1) / (k - 1))`` (L = `num_teacher_layers`, k =
    `num_layers`, halves rounded up); ``k = 1`` keeps layer 0. For k = L / 2 this takes one layer out of two:
    12 -> 6 gives ``[0, 2, 4, 7, 9, 11]``, the layers DistilBERT and DistilGPT2 were initialised from (Hugging Face's
    extraction scripts). Taking literally every other layer, ``[0, 2, ..., L - 2]``, is
    ``keep_layers=range(0, L, 2)``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"`num_layers` must be an integer from 1 to the teacher's {num_teacher_layers} layers, got {num_layers!r}."
        )
    if num_layers == 1:
        return [0]
    span, steps = num_teacher_layers - 1, num_layers - 1
    # round-half-up of i * span / steps, in integers: floor((2 * i * span + steps) / (2 * steps))
    return [(2 * i * span + steps) // (2 * steps) for i in range(num_layers)]


def _checked_keep_layers(keep_layers: Iterable[int], num_teacher_layers: int) -> list[int]:
    valid = f"0-based block indices, sorted, without repeats, each from 0 to {num_teacher_layers - 1}"
    try:
        kept = list(keep_layers)
    except TypeError:
        raise ValueError(f"`keep_layers` must be a list of {valid}; got {keep_layers!r}.") from None
    problem = None
    if not kept:
        problem = "it is empty"
    elif not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        problem = "not all entries are integers"
    elif any(not 0 <= i < num_teacher_layers for i in kept):
        problem = f"the teacher has {num_teacher_layers} layers"
    elif any(a >= b for a, b in zip(kept, kept[1:])):
        problem = "they are not sorted, or repeat"
    if problem:
        raise ValueError(f"`keep_layers` must be {valid}; got {keep_layers!r} ({problem}).")
    return kept


def _teacher_record(teacher: PreTrainedModel) -> dict[str, Any]:
    """How the student's config names its teacher: the Hub id, the directory name of a local checkpoint (with
    ``teacher_source: local``; a full path may say something about the author's machine), or the class name of a
    teacher built from a config (``teacher_source: unnamed``)."""
    name_or_path = getattr(teacher.config, "name_or_path", "") or getattr(teacher, "name_or_path", "") or ""
    if name_or_path and os.path.isdir(name_or_path):
        return {"teacher": os.path.basename(os.path.normpath(name_or_path)), "teacher_source": "local"}
    if name_or_path:
        return {"teacher": name_or_path}
    return {"teacher": type(teacher).__name__, "teacher_source": "unnamed"}


def _module_lists(model: nn.Module, length: int) -> dict[str, nn.ModuleList]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == length
    }


def _per_layer_lists(teacher: nn.Module, student: nn.Module, num_teacher_layers: int, num_layers: int) -> list[str]:
    """Paths of the module lists that hold one module per layer: as long as the teacher's layer count in the teacher,
    and as long as the student's at the same place in the student (outermost ones only)."""
    in_student = _module_lists(student, num_layers)
    paths = [path for path in _module_lists(teacher, num_teacher_layers) if path in in_student]
    return [path for path in paths if not any(path.startswith(other + ".") for other in paths)]


def _teacher_name_of(name: str, layer_lists: list[str], kept: list[int]) -> str:
    """The teacher's name of the student's parameter or buffer `name`: block ``i`` of a per-layer list is the
    teacher's block ``kept[i]``."""
    for path in layer_lists:
        prefix = f"{path}." if path else ""
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            if index.isdigit():
                return f"{prefix}{kept[int(index)]}.{rest}" if rest else f"{prefix}{kept[int(index)]}"
    return name


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Every name, tied ones included (remove_duplicate=False), and non-persistent buffers (rotary tables...).
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def init_student_from_teacher(
    teacher: PreTrainedModel, keep_layers: Iterable[int] | None = None, num_layers: int | None = None
) -> PreTrainedModel:
    """A new, smaller model of the teacher's class made of some of the teacher's transformer blocks (DistilBERT's
    initialisation), ready to be distilled from that teacher.

    The student has the teacher's embeddings, final norm and head, and the kept blocks in their order, all copied
    (it shares no tensor with the teacher, which is left untouched), with the teacher's dtypes and devices, every
    parameter trainable, and the teacher's train/eval mode and generation config. Its config is the teacher's with
    the layer count (``num_hidden_layers``, whatever the model calls it: GPT-2's ``n_layer``) and each per-layer
    field (any list with one entry per teacher layer, e.g. ``layer_types``) reduced to the kept layers. It records
    its origin as ``config.distillation_init`` (saved in ``config.json``)::

        {"teacher": "google-bert/bert-base-uncased", "teacher_num_layers": 12, "kept_layers": [0, 2, 4, 7, 9, 11]}

    (``teacher`` is the teacher's Hub id; for a local checkpoint its directory name, with ``"teacher_source":
    "local"``; for a teacher built from a config its class name, with ``"teacher_source": "unnamed"``.) The model
    card `DistillationTrainer` writes then names the teacher as the student's ``base_model``.

    Args:
        teacher: a `transformers.PreTrainedModel` whose blocks form one ``nn.ModuleList`` of
            ``config.num_hidden_layers`` modules (``bert.encoder.layer``, GPT-2's ``transformer.h``, Llama's
            ``model.layers``...).
        keep_layers: the teacher's blocks to keep, as 0-based indices, sorted and without repeats.
        num_layers: instead of `keep_layers`, how many blocks to keep, spread evenly (`evenly_spread_layers`: first
            and last kept, ``round(i * (L - 1) / (k - 1))``; 6 of 12 gives DistilBERT's ``[0, 2, 4, 7, 9, 11]``).

    Give exactly one of `keep_layers` and `num_layers`.

    Returns:
        The student, a new model of the teacher's class. With all blocks dropped but the kept ones, its outputs are
        the teacher's computed through the kept blocks only.

    Raises:
        ValueError: neither or both of `keep_layers` and `num_layers`; indices unsorted, repeated or out of range; a
            teacher whose blocks cannot be found, or whose other weights depend on the layer count; an encoder-decoder
            teacher.
    """
    if (keep_layers is None) == (num_layers is None):
        raise ValueError(
            "Give exactly one of `keep_layers` (the teacher's block indices to keep) and `num_layers` (how many "
            "blocks to keep, spread evenly)."
        )
    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(
            f"`teacher` must be a transformers `PreTrainedModel` (its config says how many layers it has), got "
            f"{type(teacher).__name__}."
        )
    config = teacher.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(teacher).__name__} is an encoder-decoder model: its two stacks have layer counts of their own, "
            "and `init_student_from_teacher` handles single-stack models (encoders, decoders) only."
        )
    num_teacher_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(
            f"{type(teacher).__name__}'s config has no `num_hidden_layers` (nor a field mapped to it); "
            "`init_student_from_teacher` needs it to find the teacher's blocks."
        )
    if keep_layers is not None:
        kept = _checked_keep_layers(keep_layers, num_teacher_layers)
    else:
        kept = evenly_spread_layers(num_teacher_layers, num_layers)
    if not _module_lists(teacher, num_teacher_layers):
        raise ValueError(
            f"{type(teacher).__name__} has no `nn.ModuleList` of {num_teacher_layers} modules (its "
            "`config.num_hidden_layers`): cannot find its transformer blocks."
        )

    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(kept)
    for field, value in list(vars(student_config).items()):
        if (
            not field.startswith("_")
            and field not in _NOT_PER_LAYER
            and isinstance(value, (list, tuple))
            and len(value) == num_teacher_layers
        ):
            setattr(student_config, field, type(value)(value[j] for j in kept))
    student_config.name_or_path = ""  # the student is not the teacher's checkpoint; its origin is recorded below
    record = _teacher_record(teacher)
    student_config.distillation_init = {
        "teacher": record.pop("teacher"),
        **record,
        "teacher_num_layers": num_teacher_layers,
        "kept_layers": kept,
    }

    # Every tensor is overwritten below: skip the random initialisation (costly for large models).
    with no_init_weights():
        student = type(teacher)._from_config(student_config, dtype=teacher.dtype)
    student.tie_weights()  # `no_init_weights` skips it too (an input embedding and its head stay one tensor)

    layer_lists = _per_layer_lists(teacher, student, num_teacher_layers, len(kept))
    if not layer_lists:
        raise ValueError(
            f"Built with {len(kept)} layers, {type(teacher).__name__} has no module list of that length where the "
            f"teacher has one of {num_teacher_layers}: `num_hidden_layers` does not size its blocks."
        )
    teacher_tensors = _tensors(teacher)
    unused = set(teacher_tensors)
    with torch.no_grad():
        for name, tensor in _tensors(student).items():
            source_name = _teacher_name_of(name, layer_lists, kept)
            source = teacher_tensors.get(source_name)
            if source is None or source.shape != tensor.shape:
                found = "missing" if source is None else f"of shape {tuple(source.shape)}"
                raise ValueError(
                    f"Cannot initialise {type(teacher).__name__} with {len(kept)} layers from the teacher: the "
                    f"student's `{name}` (shape {tuple(tensor.shape)}) comes from the teacher's `{source_name}`, "
                    f"which is {found}. The model has weights outside its blocks ({', '.join(layer_lists)}) that "
                    "depend on the layer count."
                )
            # A clone: the teacher's dtype and device, storage of its own. Tied tensors (the same Parameter under
            # two names) are set twice to equal clones, and stay tied.
            tensor.data = source.detach().clone()
            unused.discard(source_name)
    dropped = {f"{path}.{j}." for path in layer_lists for j in range(num_teacher_layers) if j not in kept}
    unused = sorted(name for name in unused if not any(name.startswith(prefix) for prefix in dropped))
    if unused:
        raise ValueError(
            f"Cannot initialise {type(teacher).__name__} with {len(kept)} layers from the teacher: the student has "
            f"nothing for the teacher's {', '.join(f'`{name}`' for name in unused[:5])}."
        )

    student.requires_grad_(True)
    student.train(teacher.training)
    if getattr(teacher, "generation_config", None) is not None and student.can_generate():
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student
