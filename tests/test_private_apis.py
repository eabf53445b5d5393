"""Each private API of another library that hf-distill relies on (`hf_distill/private_apis.py`) still exists and does
what it is used for; and model introspection goes through public APIs only."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from conftest import bert_config, features_dataset
from test_trainer import make_args
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from hf_distill import DistillationTrainer, private_apis
from hf_distill.models import auto_class_for, is_token_level, shifts_labels
from hf_distill.teachers import load_teacher


PACKAGE = Path(__file__).resolve().parents[1] / "hf_distill"


def test_every_private_use_is_listed():
    """Outside `private_apis.py`, no `._name` of another library's object is read (attributes of our own classes and
    `Trainer` state set by hf-distill's own subclass are fine)."""
    listed = (PACKAGE / "private_apis.py").read_text()
    for name in (
        "_VALID_DICT_FIELDS",
        "_set_signature_columns_if_needed",
        "_signature_columns",
        "_internal_call",
        "Trainer._prepare_inputs",
        "_can_record_outputs",
    ):
        assert f"{name}" in listed
    for path in PACKAGE.glob("*.py"):
        if path.name == "private_apis.py":
            continue
        text = path.read_text()
        for name in (
            "_model_mapping",
            "_extra_content",
            "_commit_hash",
            "_internal_call",
            "accelerator._models",  # no longer used: the FSDP2 teacher is sharded with torch's public `fully_shard`
            "TrainingArguments._VALID_DICT_FIELDS",
            "._prepare_inputs",
            "_can_record_outputs",
        ):
            assert name not in text, f"{path.name} uses {name}: go through hf_distill.private_apis"


def test_training_arguments_parse_listed_dict_fields_from_json():
    assert "lr_scheduler_kwargs" in private_apis.TRAINING_ARGUMENTS_DICT_FIELDS
    args = make_args(Path("unused"), teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def test_trainer_signature_columns_hook_decides_the_kept_columns(tmp_path):
    assert callable(getattr(Trainer, private_apis.SIGNATURE_COLUMNS_HOOK))
    trainer = Trainer(
        model=BertForSequenceClassification(bert_config()),
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )
    getattr(trainer, private_apis.SIGNATURE_COLUMNS_HOOK)()
    assert "input_ids" in trainer._signature_columns and "labels" in trainer._signature_columns


def test_save_model_takes_the_internal_call_flag():
    assert "_internal_call" in inspect.signature(Trainer.save_model).parameters


def test_trainer_prepare_inputs_puts_a_batch_on_the_device(tmp_path):
    trainer = Trainer(
        model=BertForSequenceClassification(bert_config()),
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
    )
    batch = private_apis.prepare_inputs(trainer, {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert batch["input_ids"].device == trainer.args.device and batch["input_ids"].shape == (2, 3)


def test_attention_recorder_names_the_module_holding_attention_probabilities():
    """`output_attentions` is recorded from that module's output at that index (BERT: a bare class; GPT-2: an
    `OutputRecorder` whose layer name tells self- from cross-attention)."""
    from conftest import gpt2_config

    for model in (BertForSequenceClassification(bert_config()), GPT2LMHeadModel(gpt2_config())):
        model.set_attn_implementation("eager")
        target_class, index, layer_name = private_apis.attention_recorder(model)
        modules = [
            module
            for name, module in model.named_modules()
            if isinstance(module, target_class) and (layer_name is None or name.endswith(layer_name.strip(".")))
        ]
        assert len(modules) == 1
        recorded = []
        modules[0].register_forward_hook(lambda module, args, output, r=recorded, i=index: r.append(output[i]))
        outputs = model(input_ids=torch.ones(1, 4, dtype=torch.long), output_attentions=True)
        assert torch.equal(recorded[0], outputs.attentions[0])
    assert private_apis.attention_recorder(torch.nn.Linear(2, 2)) is None


class RegisteredConfig(BertConfig):
    model_type = "hf-distill-registered-bert"


class RegisteredBertForSequenceClassification(BertForSequenceClassification):
    config_class = RegisteredConfig


def test_task_of_registered_models_through_public_mappings(tmp_path):
    """`AutoModelFor....register` adds to the public mappings hf-distill reads (no private mapping internals)."""
    AutoConfig.register(RegisteredConfig.model_type, RegisteredConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(
        RegisteredConfig, RegisteredBertForSequenceClassification, exist_ok=True
    )
    student = RegisteredBertForSequenceClassification(RegisteredConfig(**bert_config().to_dict()))
    assert auto_class_for(student) is AutoModelForSequenceClassification
    assert auto_class_for(BertForSequenceClassification(bert_config())) is AutoModelForSequenceClassification
    assert auto_class_for(torch.nn.Linear(2, 2)) is None
    student.save_pretrained(tmp_path / "teacher")
    teacher = load_teacher(str(tmp_path / "teacher"), None)  # by the architecture its config names
    assert type(teacher) is RegisteredBertForSequenceClassification
    assert not is_token_level(student) and not shifts_labels(student)


def test_causal_lm_is_recognised():
    from conftest import gpt2_config

    model = GPT2LMHeadModel(gpt2_config())
    assert shifts_labels(model) and is_token_level(model)


def test_trainer_keeps_working_with_a_plain_module(tmp_path):
    """The private hook override keeps cached columns and still filters the student's inputs."""
    from conftest import PlainLogitsTeacher, PlainMLP

    trainer = DistillationTrainer(
        model=PlainMLP(),
        teacher_model=PlainLogitsTeacher(),
        args=make_args(tmp_path),
        train_dataset=features_dataset(n=8),
    )
    trainer._set_signature_columns_if_needed()
    assert "teacher_logits" in trainer._signature_columns and "features" in trainer._signature_columns
