"""What hf-distill needs to know about a student or teacher model: its logits, its task, which positions count."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import find_batch_size

from . import losses
from .losses import IGNORE_INDEX

# Auto classes tried, in order, to load a teacher given as a path or Hub id with the student's task head.
TASK_AUTO_CLASSES = (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    AutoModelForSequenceClassification,
    AutoModelForImageClassification,
)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a `ModelOutput`/dict with ``logits``, or a bare tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    raise TypeError(
        f"Cannot find logits in a model output of type {type(outputs).__name__}: return a tensor of logits, a dict with "
        "a 'logits' key, or a transformers `ModelOutput`."
    )


def _mapping_names(auto_class) -> set[str]:
    """Class names an `AutoModelFor...` maps to, registered ones included."""
    mapping = auto_class._model_mapping
    names = {cls.__name__ for cls in mapping._extra_content.values()}
    for value in mapping._model_mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def auto_class_for(model: nn.Module):
    """The `AutoModelFor...` class whose mapping holds `type(model)`, or None."""
    return next((a for a in TASK_AUTO_CLASSES if type(model).__name__ in _mapping_names(a)), None)


def load_teacher(name_or_path: str, student: nn.Module | None, init_kwargs: dict | None = None) -> PreTrainedModel:
    """Load a teacher from a path or Hub id with the `AutoModelFor...` class of the student's task head (without a
    student: the class of the first architecture its config names)."""
    init_kwargs = dict(init_kwargs or {})
    if student is None:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(name_or_path).architectures or []
        auto_class = next((a for a in TASK_AUTO_CLASSES for arch in architectures[:1]
                           if arch in _mapping_names(a)), None)
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


def output_size(model: nn.Module) -> int | None:
    """Size of the last axis of the model's logits (vocabulary or number of labels), if knowable without a forward."""
    if not isinstance(model, PreTrainedModel):
        return None
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and getattr(output_embeddings, "weight", None) is not None:
        return output_embeddings.weight.shape[0]
    return getattr(model.config, "num_labels", None)


def accepted_arguments(model: nn.Module) -> set[str] | None:
    """Input names `model.forward` takes, or None when it takes any (a plain module with ``**kwargs``).

    A transformers model's ``**kwargs`` carry attention/loss options, not data columns, so only its named parameters
    count.
    """
    parameters = inspect.signature(model.forward).parameters
    if not isinstance(model, PreTrainedModel) and any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return None
    return {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model is a causal LM whose logit at t predicts token t + 1 (Trainer's own test for its smoother)."""
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and not is_encoder_decoder(model)


def is_token_level(model: nn.Module) -> bool:
    """One prediction per token (LMs, token classifiers), so without labels the attention mask says what counts."""
    return isinstance(model, PreTrainedModel) and (
        model.get_output_embeddings() is not None or auto_class_for(model) is AutoModelForTokenClassification
    )


def counted_positions(inputs: Mapping[str, Any], *, token_level: bool, shift: bool, main_input_name: str):
    """Boolean mask ``[B]`` (sequence level) or ``[B, L']`` (token level) of the positions the losses count.

    A position counts when its label is not -100; without labels, when its attention mask is 1 (token level) or always
    (one row, one position). Causal LMs (`shift`) drop the first position: the logit at t predicts token t + 1.
    """
    labels = inputs.get("labels")
    if labels is not None:
        mask = labels.ne(IGNORE_INDEX)
    elif token_level:
        reference = inputs.get("attention_mask", inputs.get("decoder_attention_mask"))
        if reference is None:
            reference = torch.ones_like(inputs[main_input_name], dtype=torch.bool)
        mask = reference.bool()
    else:
        batch_size = find_batch_size(inputs)
        device = next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        mask = torch.ones(batch_size, dtype=torch.bool, device=device)
    return mask[..., 1:] if shift and mask.dim() > 1 else mask


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


class EnsembleTeacher(nn.Module):
    """Several teachers as one: `forward` returns the ensemble's combined logits (`losses.ensemble_teacher_logits`).

    `temperature` is set by the trainer before each use (an arithmetic mean of tempered distributions depends on it).
    Each teacher receives the inputs its `forward` takes.
    """

    def __init__(self, teachers: Sequence[nn.Module], reduction: str = "mean_probs", weights=None,
                 temperature: float = 1.0):
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

    def forward(self, **inputs) -> torch.Tensor:
        per_teacher = [
            logits_of(teacher(**{k: v for k, v in inputs.items() if names is None or k in names}))
            for teacher, names in zip(self.teachers, self._arguments)
        ]
        return losses.ensemble_teacher_logits(per_teacher, reduction=self.reduction, weights=self.weights,
                                              temperature=self.temperature)
