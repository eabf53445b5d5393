"""`init_student_from_teacher`: DistilBERT's initialisation (a student made of some of its teacher's blocks).

The reference for every architecture is the teacher with the dropped blocks deleted from its ModuleList by hand (a
deepcopy, its layer count and per-layer config fields updated, ``layer_idx`` renumbered): the student must compute
exactly what that does, and load back from disk with the Auto classes exactly as it was made.
"""

from __future__ import annotations

import copy
import json
from fractions import Fraction

import pytest
import torch
from conftest import SEQ_LEN, VOCAB_SIZE, bert_config, causal_lm_dataset, gpt2_config, sequence_dataset
from huggingface_hub import ModelCard
from test_hub import make_args
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import hf_distill
from hf_distill import DistillationTrainer, init_student_from_teacher
from hf_distill.student_init import evenly_spread_layers


TEACHER_LAYERS = 4


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEACHER_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**values, **overrides})


def qwen2_config() -> Qwen2Config:
    # One full-attention and one sliding-window layer out of two, with a window shorter than the inputs.
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEACHER_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        use_sliding_window=True,
        sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )


# name: (build the teacher, path of its blocks, Auto class)
ARCHITECTURES = {
    "bert-seq-cls": (
        lambda: BertForSequenceClassification(bert_config(16, num_hidden_layers=TEACHER_LAYERS)),
        "bert.encoder.layer",
        AutoModelForSequenceClassification,
    ),
    "bert-token-cls": (
        lambda: BertForTokenClassification(bert_config(16, num_hidden_layers=TEACHER_LAYERS)),
        "bert.encoder.layer",
        AutoModelForTokenClassification,
    ),
    "bert-mlm": (
        lambda: BertForMaskedLM(bert_config(16, num_hidden_layers=TEACHER_LAYERS)),
        "bert.encoder.layer",
        AutoModelForMaskedLM,
    ),
    "gpt2": (lambda: GPT2LMHeadModel(gpt2_config(16, n_layer=TEACHER_LAYERS)), "transformer.h", AutoModelForCausalLM),
    "llama": (lambda: LlamaForCausalLM(llama_config()), "model.layers", AutoModelForCausalLM),
    "qwen2-layer-types": (lambda: Qwen2ForCausalLM(qwen2_config()), "model.layers", AutoModelForCausalLM),
}


def make_teacher(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = ARCHITECTURES[name][0]().eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and GPT-2's biases at 0: make every tensor distinct
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    attention_mask = torch.ones(3, SEQ_LEN, dtype=torch.long)
    attention_mask[1, -3:] = 0  # one right-padded row
    return {"input_ids": torch.randint(3, VOCAB_SIZE, (3, SEQ_LEN), generator=g), "attention_mask": attention_mask}


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def without_blocks(teacher, blocks_path: str, keep: list[int]):
    """The teacher with the other blocks deleted from its ModuleList by hand: the reference the student must equal."""
    reference = copy.deepcopy(teacher)
    blocks = reference.get_submodule(blocks_path)
    for index in reversed(range(len(blocks))):
        if index not in keep:
            del blocks[index]
    reference.config.num_hidden_layers = len(keep)
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [reference.config.layer_types[j] for j in keep]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # what the KV cache indexes layers by
    return reference


def storages(model) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {tensor.untyped_storage().data_ptr() for tensor in tensors if tensor.numel()}


def tied_groups(model) -> list[list[str]]:
    """Names that are one and the same parameter, grouped."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_student_computes_what_the_teacher_without_the_dropped_blocks_computes(architecture, tmp_path):
    _, blocks_path, auto_class = ARCHITECTURES[architecture]
    teacher = make_teacher(architecture)
    teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    batch = inputs()

    student = init_student_from_teacher(teacher, keep_layers=[0, 3])

    assert type(student) is type(teacher) and student is not teacher
    assert student.config.num_hidden_layers == 2 and len(student.get_submodule(blocks_path)) == 2
    assert student.config.distillation_init == {
        "teacher": type(teacher).__name__,
        "teacher_source": "unnamed",
        "teacher_num_layers": TEACHER_LAYERS,
        "kept_layers": [0, 3],
    }
    reference = without_blocks(teacher, blocks_path, [0, 3])
    assert (logits(student, batch) - logits(reference, batch)).abs().max().item() == 0.0
    assert not torch.allclose(logits(student, batch), logits(teacher, batch))  # the dropped blocks did matter
    # The embeddings, final norm and head are the teacher's; so is every kept block.
    reference_state = reference.state_dict()
    assert student.state_dict().keys() == reference_state.keys()
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name
    assert tied_groups(student) == tied_groups(reference)  # an input embedding and its tied head stay one tensor

    # Nothing shared with the teacher, which is left as it was; the student trains, in the teacher's mode.
    assert not storages(student) & storages(teacher)
    assert all(torch.equal(tensor, teacher_state[name]) for name, tensor in teacher.state_dict().items())
    assert teacher.config.num_hidden_layers == TEACHER_LAYERS and not hasattr(teacher.config, "distillation_init")
    assert all(parameter.requires_grad for parameter in student.parameters()) and not student.training

    # Saved and loaded back with the Auto class: the same model, and the same record.
    student.save_pretrained(tmp_path / "student")
    loaded = auto_class.from_pretrained(tmp_path / "student").eval()
    assert type(loaded) is type(student)
    assert (logits(loaded, batch) - logits(student, batch)).abs().max().item() == 0.0
    assert loaded.config.distillation_init == student.config.distillation_init
    saved_config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved_config["distillation_init"]["kept_layers"] == [0, 3]


def test_gpt2_layer_count_is_updated_under_its_own_name():
    student = init_student_from_teacher(make_teacher("gpt2"), keep_layers=[1, 2, 3])
    assert student.config.n_layer == 3 and len(student.transformer.h) == 3


def test_llama_blocks_are_renumbered_and_generate_with_cache_as_the_teacher_without_the_blocks():
    teacher = make_teacher("llama")
    student = init_student_from_teacher(teacher, keep_layers=[0, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    reference = without_blocks(teacher, "model.layers", [0, 3])
    prompt = inputs()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(**prompt, use_cache=True, **settings)
        uncached = student.generate(**prompt, use_cache=False, **settings)
        expected = reference.generate(**prompt, use_cache=True, **settings)
    assert cached.shape == (3, SEQ_LEN + 6)
    assert torch.equal(cached, expected) and torch.equal(cached, uncached)


def test_per_layer_config_fields_follow_the_kept_layers(tmp_path):
    teacher = make_teacher("qwen2-layer-types")
    teacher.config.per_layer_scale = [10, 11, 12, 13]  # any list with one entry per layer is treated as per-layer
    student = init_student_from_teacher(teacher, keep_layers=[1, 2])

    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.config.per_layer_scale == [11, 12]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [3, None]
    assert teacher.config.layer_types == qwen2_config().layer_types  # the teacher's config is not touched
    reference = without_blocks(teacher, "model.layers", [1, 2])
    assert torch.equal(logits(student, inputs()), logits(reference, inputs()))
    wrong = copy.deepcopy(student)
    wrong.config.layer_types = ["full_attention", "full_attention"]  # the layers' attention is read from the config
    assert not torch.allclose(logits(wrong, inputs()), logits(student, inputs()))

    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.layer_types == ["sliding_attention", "full_attention"]


def test_num_layers_spreads_the_kept_layers_evenly_first_and_last_included():
    # 6 of 12: the layers DistilBERT and DistilGPT2 were initialised from (one out of two, ends kept).
    assert evenly_spread_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spread_layers(4, 2) == [0, 3]
    assert evenly_spread_layers(24, 12) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert evenly_spread_layers(7, 1) == [0]
    for total in range(1, 25):
        assert evenly_spread_layers(total, total) == list(range(total))
        for count in range(2, total + 1):
            # The documented rule: round(i * (L - 1) / (k - 1)), halves rounded up.
            expected = [int(Fraction(i * (total - 1), count - 1) + Fraction(1, 2)) for i in range(count)]
            assert evenly_spread_layers(total, count) == expected
            assert expected[0] == 0 and expected[-1] == total - 1 and len(set(expected)) == count

    student = init_student_from_teacher(make_teacher("bert-seq-cls"), num_layers=2)
    assert student.config.distillation_init["kept_layers"] == [0, 3]
    every_other = init_student_from_teacher(make_teacher("bert-seq-cls"), keep_layers=range(0, TEACHER_LAYERS, 2))
    assert every_other.config.distillation_init["kept_layers"] == [0, 2]


@pytest.mark.parametrize(
    "keep_layers, problem",
    [
        ([3, 0], "not sorted"),
        ([1, 1], "repeat"),
        ([0, 4], "has 4 layers"),
        ([-1, 2], "has 4 layers"),
        ([], "empty"),
        ([0, 1.0], "not all entries are integers"),
        (3, "must be a list"),
    ],
)
def test_bad_keep_layers_are_refused_naming_the_argument_and_the_valid_range(keep_layers, problem):
    with pytest.raises(ValueError, match="`keep_layers`") as error:
        init_student_from_teacher(make_teacher("bert-seq-cls"), keep_layers=keep_layers)
    assert "from 0 to 3" in str(error.value) and problem in str(error.value)


def test_exactly_one_of_keep_layers_and_num_layers():
    teacher = make_teacher("gpt2")
    for kwargs in ({}, {"keep_layers": [0, 1], "num_layers": 2}):
        with pytest.raises(ValueError, match="exactly one of `keep_layers`.*and `num_layers`"):
            init_student_from_teacher(teacher, **kwargs)
    for num_layers in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match="`num_layers` must be an integer from 1 to the teacher's 4 layers"):
            init_student_from_teacher(teacher, num_layers=num_layers)
    with pytest.raises(ValueError, match="must be a transformers `PreTrainedModel`"):
        init_student_from_teacher(torch.nn.Linear(2, 2), num_layers=1)


def test_teachers_it_cannot_reduce_are_refused_not_half_copied():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB_SIZE, d_model=16, d_kv=8, d_ff=32, num_layers=4))
    with pytest.raises(ValueError, match="encoder-decoder"):
        init_student_from_teacher(t5, num_layers=2)
    # ALBERT's layers share one set of weights: no list of per-layer blocks to take some from.
    albert = AlbertForMaskedLM(
        AlbertConfig(
            vocab_size=VOCAB_SIZE, embedding_size=8, hidden_size=16, num_hidden_layers=4, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match="cannot find its transformer blocks"):
        init_student_from_teacher(albert, num_layers=2)


def test_the_trainer_accepts_the_student_and_its_card_names_the_teacher_as_base_model(tmp_path):
    teacher = make_teacher("bert-seq-cls")
    teacher.config.name_or_path = "org/tiny-teacher"  # as if loaded from the Hub; nothing is downloaded
    student = init_student_from_teacher(teacher, keep_layers=[0, 3])
    assert student.config.distillation_init["teacher"] == "org/tiny-teacher"
    assert "teacher_source" not in student.config.distillation_init
    assert student.config.name_or_path == ""  # the student is not the teacher's checkpoint

    trainer = DistillationTrainer(  # refuses students that share a parameter with their teacher
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path / "out", max_steps=1),
        train_dataset=sequence_dataset(16, seed=1),
        eval_dataset=sequence_dataset(8, seed=2),
    )
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "org/tiny-teacher"
    assert card.data.distillation["teacher"] == "org/tiny-teacher"
    assert card.data.distillation["initialized_from_teacher_layers"] == [0, 3]
    assert "initialised from the teacher itself" in card.text and "layers\n0, 3 kept" in card.text
    assert "not as `base_model`" not in card.text


def test_card_of_a_student_initialised_from_a_local_teacher_has_no_base_model(tmp_path):
    teacher = make_teacher("bert-seq-cls")
    teacher.save_pretrained(tmp_path / "my-teacher")
    teacher = AutoModelForSequenceClassification.from_pretrained(tmp_path / "my-teacher")
    student = init_student_from_teacher(teacher, num_layers=2)
    assert student.config.distillation_init["teacher"] == "my-teacher"  # the directory's name, not its full path
    assert student.config.distillation_init["teacher_source"] == "local"

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path / "out", max_steps=1),
        train_dataset=sequence_dataset(16, seed=1),
    )
    card = hf_distill.model_card.build_distillation_model_card(trainer)
    assert card.data.base_model is None  # base_model is a Hub id
    assert card.data.distillation["initialized_from_teacher_layers"] == [0, 3]
    assert "(not set here: the teacher is not a Hub model)" in card.text
    assert str(tmp_path) not in str(card)


def test_causal_lm_student_distils_from_its_teacher(tmp_path):
    teacher = make_teacher("llama")
    student = init_student_from_teacher(teacher, num_layers=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path / "out", max_steps=2),
        train_dataset=causal_lm_dataset(16),
    )
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(tensor, before[name]) for name, tensor in student.state_dict().items())
