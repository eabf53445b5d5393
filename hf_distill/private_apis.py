"""Every private API of another library that hf-distill uses, each with its reason, in one place.

Private names can change in any release. Each one used is wrapped or named here, and `tests/test_private_apis.py`
checks that each still exists and behaves as relied on, so an upgrade that breaks one fails loudly there instead of
silently somewhere in a run.

| private API | library | used for | why no public one |
| --- | --- | --- | --- |
| `TrainingArguments._VALID_DICT_FIELDS` | transformers | `teacher_model_init_kwargs` given as a JSON string on the command line is parsed into a dict, like `lr_scheduler_kwargs` | the list that `TrainingArguments.__post_init__` parses is the only hook for that |
| `Trainer._set_signature_columns_if_needed` / `Trainer._signature_columns` | transformers | keep the cached teacher columns when Trainer drops the columns the student's `forward` does not take | the columns kept are decided only there (`remove_unused_columns` has no extension point) |
| `Trainer.save_model(_internal_call=True)` | transformers | saving the student after a failed push without triggering another push | `save_model` pushes by itself when `push_to_hub=True` unless this flag is set |
| `Trainer._prepare_inputs` | transformers | evaluation batches without labels, for which `DistillationTrainer.prediction_step` computes the KD terms itself, reach the device as in Trainer's own `prediction_step` | Trainer has no public method that prepares a batch (device placement, DeepSpeed dtype) |
| `PreTrainedModel._can_record_outputs` | transformers | find, in each block, the module whose output holds the attention probabilities (attention matches hook only the matched blocks' ones) | `output_attentions=True` returns every layer's maps; the module that records them is named only there |
"""

from __future__ import annotations

from transformers import TrainingArguments


# `TrainingArguments` fields parsed from JSON strings when given on the command line.
TRAINING_ARGUMENTS_DICT_FIELDS: list[str] = list(TrainingArguments._VALID_DICT_FIELDS)

# Trainer's hook that decides which dataset columns reach the model (overridden by `DistillationTrainer`).
SIGNATURE_COLUMNS_HOOK = "_set_signature_columns_if_needed"


def save_model_without_push(trainer) -> None:
    """`trainer.save_model()` without the push to the Hub it starts by itself when `push_to_hub=True`."""
    trainer.save_model(_internal_call=True)


def prepare_inputs(trainer, inputs):
    """`inputs` as `trainer.prediction_step` and `training_step` pass them to `compute_loss` (on the device)."""
    return trainer._prepare_inputs(inputs)


def attention_recorder(model) -> tuple[type, int, str | None] | None:
    """Where `model` records `output_attentions`: (module class, index of the probabilities in its output tuple, the
    name the module must carry, e.g. ``"attn"`` to tell GPT-2's self-attention from its cross-attention), or None."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(spec, list):
        spec = spec[0] if spec else None
    if spec is None or isinstance(spec, str):
        return None
    if isinstance(spec, type):  # a bare class: transformers records index 1 of its output for attentions
        return spec, 1, None
    if getattr(spec, "target_class", None) is None:
        return None
    return spec.target_class, spec.index, spec.layer_name
