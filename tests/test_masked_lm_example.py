"""`examples/text_corpus.py` (stdlib corpus, tokenizers, blocks) and `examples/distill_masked_lm.py` end to end."""

import json

import datasets
import pytest
import torch
from conftest import REPO_ROOT
from text_corpus import (
    SPLITS,
    chunk_into_blocks,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    split_of,
    stdlib_source_files,
    tokenizer_fingerprint,
    train_tokenizer,
)
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

import hf_distill
from hf_distill import DistillationTrainer, DistillationTrainingArguments


CODE = 'def parse(self, text):\n    """Split text."""\n    return [word.strip() for word in text.split(",") if word]\n'


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_files=40)


@pytest.fixture(scope="module")
def wordpiece(corpus):
    return train_tokenizer(corpus["train"], kind="wordpiece", vocab_size=600)


# ---------------------------------------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_splits_are_disjoint(corpus):
    again = load_stdlib_corpus(max_files=40)
    assert again.files == corpus.files and again.texts == corpus.texts and again.fingerprint == corpus.fingerprint
    all_files = [path for split in SPLITS for path in corpus.files[split]]
    assert len(all_files) == len(set(all_files)) == 40
    assert [len(corpus.files[split]) for split in SPLITS] == [36, 2, 2]  # the caps shared by the fractions
    for split in SPLITS:
        assert corpus.files[split] == sorted(corpus.files[split])
        assert len(corpus[split]) == len(corpus.files[split])
    assert corpus["train"] and not any(path.split("/")[0] in {"test", "idlelib", "encodings"} for path in all_files)


def test_a_files_split_depends_on_its_path_alone(corpus):
    full = stdlib_source_files()
    assert full == sorted(full) and len(full) > 100
    assert not [path for path in full if {"test", "tests", "site-packages"} & set(path.split("/")[:-1])]
    for split in SPLITS:
        assert all(split_of(path) == split for path in corpus.files[split])
    shares = {split: sum(split_of(path) == split for path in full) / len(full) for split in SPLITS}
    assert 0.8 < shares["train"] < 0.97 and shares["validation"] > 0 and shares["test"] > 0


def test_caps_and_recorded_provenance():
    capped = load_stdlib_corpus(max_chars=200_000)
    info = capped.info
    assert sum(info["num_chars"].values()) <= 200_000 and info["num_chars"]["test"] <= 0.05 * 200_000
    assert all(info["num_files"][split] >= 1 for split in SPLITS)
    assert info["num_files"] == {split: len(capped.files[split]) for split in SPLITS}
    assert info["python_version"].count(".") == 2 and "Python versions" in info["note"]
    assert info["settings"]["max_chars"] == 200_000
    with pytest.raises(ValueError, match="split .* is empty"):
        load_stdlib_corpus(max_chars=50)
    # A larger cap gives a different corpus, hence a different fingerprint (the caches' key).
    assert load_stdlib_corpus(max_chars=300_000).fingerprint != capped.fingerprint


# ------------------------------------------------------------------------------------------------------ tokenizers


def test_wordpiece_has_bert_special_tokens_and_round_trips_up_to_whitespace(wordpiece):
    assert wordpiece.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (wordpiece.pad_token_id, wordpiece.mask_token_id) == (0, 4) and len(wordpiece) == 600
    ids = wordpiece(CODE)["input_ids"]
    assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
    assert wordpiece.unk_token_id not in ids
    decoded = wordpiece.decode(ids, skip_special_tokens=True)
    assert "".join(decoded.split()) == "".join(CODE.split())


def test_bpe_round_trips_any_text_exactly(corpus):
    bpe = train_tokenizer(corpus["train"], kind="bpe", vocab_size=400)
    text = CODE + "\tcafé ∑ 😀  \n\n"
    ids = bpe(text)["input_ids"]
    assert bpe.decode(ids) == text and bpe.eos_token_id not in ids
    assert bpe.eos_token == bpe.bos_token == "<|endoftext|>" and bpe.pad_token == "<|pad|>"


def test_tokenizer_training_is_deterministic_up_to_ties(corpus, wordpiece):
    """BPE: the same vocabulary every time. WordPiece: the same but for merges tied at the vocabulary size (whose
    order `tokenizers` does not fix), ids in sorted order after the special tokens."""
    bpe = [train_tokenizer(corpus["train"], kind="bpe", vocab_size=400) for _ in range(3)]
    assert all(tokenizer.get_vocab() == bpe[0].get_vocab() for tokenizer in bpe)
    assert len({tokenizer_fingerprint(tokenizer) for tokenizer in bpe}) == 1
    for _ in range(3):
        again = train_tokenizer(corpus["train"], kind="wordpiece", vocab_size=600).get_vocab()
        assert len(set(again) ^ set(wordpiece.get_vocab())) <= 6  # 600 tokens: at most 3 swapped
        learned = sorted(again, key=again.get)[5:]
        assert learned == sorted(learned)


def test_tokenizer_is_cached_by_settings(tmp_path, corpus):
    first, directory, loaded = load_or_train_tokenizer(corpus, tmp_path, "wordpiece", vocab_size=500)
    assert not loaded and directory.parent == tmp_path
    second, same_directory, loaded = load_or_train_tokenizer(corpus, tmp_path, "wordpiece", vocab_size=500)
    assert loaded and same_directory == directory and second.get_vocab() == first.get_vocab()
    assert second(CODE)["input_ids"] == first(CODE)["input_ids"]
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    _, other_directory, loaded = load_or_train_tokenizer(corpus, tmp_path, "wordpiece", vocab_size=550)
    assert not loaded and other_directory != directory


def test_chunk_into_blocks_cuts_the_token_stream(corpus, wordpiece):
    texts = corpus["train"][:5]
    blocks = chunk_into_blocks(wordpiece, texts, block_size=32)
    assert isinstance(blocks, datasets.Dataset) and blocks.column_names == ["input_ids", "attention_mask"]
    stream = []
    for text in texts:
        stream += wordpiece(text, add_special_tokens=False)["input_ids"] + [wordpiece.sep_token_id]
    assert len(blocks) == len(stream) // 30
    for i, row in enumerate(blocks):
        assert len(row["input_ids"]) == 32 and row["attention_mask"] == [1] * 32
        assert row["input_ids"][0] == wordpiece.cls_token_id and row["input_ids"][-1] == wordpiece.sep_token_id
        assert row["input_ids"][1:-1] == stream[30 * i : 30 * (i + 1)]
    assert len(chunk_into_blocks(wordpiece, texts, block_size=32, max_blocks=3)) == 3


# --------------------------------------------------------------------------- the trainer with a label-making collator


def test_distillation_trainer_accepts_a_collator_that_makes_the_labels(tmp_path, corpus, wordpiece):
    """Masked-LM data has no label column: `DataCollatorForLanguageModeling` makes the labels per batch."""
    config = dict(vocab_size=len(wordpiece), num_attention_heads=2, max_position_embeddings=32)
    student = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, **config))
    teacher = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **config))
    blocks = chunk_into_blocks(wordpiece, corpus["train"][:3], block_size=32, max_blocks=16)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, alpha=0.5, report_to="none"
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=blocks,
        data_collator=DataCollatorForLanguageModeling(wordpiece, mlm_probability=0.15, seed=0),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    assert logged and torch.isfinite(torch.tensor(logged[0]["train_loss"]))


# ------------------------------------------------------------------------------------------------- the example


TINY = [
    "--max_corpus_files", "30", "--vocab_size", "400", "--block_size", "32", "--hidden_size", "32",
    "--teacher_layers", "2", "--teacher_steps", "6", "--max_steps", "4", "--max_validation_blocks", "16", "--max_test_blocks", "16",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
]  # fmt: skip


@pytest.mark.slow
def test_example_runs_end_to_end_and_reuses_its_teacher(tmp_path):
    import distill_masked_lm

    variants = "abc"
    results = distill_masked_lm.main([*TINY, "--output_dir", str(tmp_path), "--variants", variants])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    names = [row["name"] for row in saved["models"]]
    assert names == ["teacher", "(a)", "(b)", "(c)"][: 1 + len(variants)]
    for row in saved["models"]:
        assert 0.0 <= row["test_masked_accuracy"] <= 1.0 and row["test_masked_loss"] > 0
        assert row["layers"] == (2 if row["name"] == "teacher" else 1)
    students = saved["models"][1:]
    assert all(row["agreement_with_teacher"] is not None and row["learning_curve"] for row in students)
    assert saved["corpus"]["python_version"] and saved["test_masked_tokens"] > 0 and not saved["teacher_reused"]
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert (tmp_path / "teacher" / "teacher_settings.json").is_file()

    # Same settings: the saved teacher is reused and scores the same.
    again = distill_masked_lm.main([*TINY, "--output_dir", str(tmp_path), "--variants", "a"])
    assert again["teacher_reused"] and [row["name"] for row in again["models"]] == ["teacher", "(a)"]
    assert again["models"][0]["test_masked_loss"] == pytest.approx(saved["models"][0]["test_masked_loss"], rel=1e-5)
    # The students of both runs saw the same batches and masks: student (a) is reproduced.
    assert again["models"][1]["test_masked_loss"] == pytest.approx(saved["models"][1]["test_masked_loss"], rel=1e-5)


def test_example_is_not_part_of_the_package():
    assert (REPO_ROOT / "examples" / "text_corpus.py").is_file()
    assert not hasattr(hf_distill, "load_stdlib_corpus")
