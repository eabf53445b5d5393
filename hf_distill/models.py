"""What hf-distill needs to know about a student or teacher model: its logits, its task, which positions count."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import find_batch_size

from .losses import IGNORE_INDEX


# Auto classes tried, in order, to load a teacher given as a path or Hub id with the student's task head, each with the
# public config -> model class mapping behind it (which holds models added with `AutoModelFor....register` too).
TASK_AUTO_CLASSES = (
    (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING),
    (AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING),
    (AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING),
    (AutoModelForTokenClassification, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING),
    (AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING),
    (AutoModelForImageClassification, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING),
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


def _model_classes(mapping, config_class: type[PretrainedConfig]) -> tuple[type, ...]:
    """The model classes `mapping` (an `AutoModelFor...` mapping) gives for `config_class`; importing only those."""
    if config_class not in mapping:
        return ()
    classes = mapping[config_class]
    return tuple(classes) if isinstance(classes, (tuple, list)) else (classes,)


def auto_class_for(model: nn.Module):
    """The `AutoModelFor...` class whose mapping holds `type(model)` for its config class, or None."""
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return None
    return next(
        (
            auto_class
            for auto_class, mapping in TASK_AUTO_CLASSES
            if type(model) in _model_classes(mapping, type(config))
        ),
        None,
    )


def auto_class_for_architecture(config: PretrainedConfig):
    """The `AutoModelFor...` class that loads the first architecture a config names, or None."""
    architecture = (config.architectures or [None])[0]
    return next(
        (
            auto_class
            for auto_class, mapping in TASK_AUTO_CLASSES
            if architecture in {c.__name__ for c in _model_classes(mapping, type(config))}
        ),
        None,
    )


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
