# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""Tiny local models and data for the recipes in this folder, built offline in a few seconds.

    python examples/recipes/make_tiny_assets.py        # writes examples/recipes/assets/

Writes a word-level tokenizer over the docstrings of a few standard library modules; BERT teacher and student
classifiers (3 labels) and a GPT-2 teacher and student config that share it; `train.csv` / `validation.csv`
(columns `sentence`, `label`) and `train.txt` / `validation.txt` (one line of text each). The models are random: the
recipes show the commands, not a result. For real runs, point the recipes at Hub ids and a real dataset instead.
"""

import argparse
import csv
import json
import re
import textwrap
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)


LABELS = ["negative", "neutral", "positive"]


def stdlib_words() -> list[str]:
    """The words of these standard library modules' docstrings, lower-cased, in order."""
    return re.findall(r"[a-z]+", " ".join(m.__doc__ for m in (argparse, csv, json, textwrap)).lower())


def main(out: Path) -> None:
    words = stdlib_words()
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    bert = dict(vocab_size=len(tokenizer), num_attention_heads=2, max_position_embeddings=128, num_labels=3)
    gpt2 = dict(vocab_size=len(tokenizer), n_head=2, n_positions=128, bos_token_id=3, eos_token_id=3, pad_token_id=0)
    for name, model in (
        ("bert_teacher", BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=4, **bert))),
        ("bert_student", BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, **bert))),
        ("gpt2_teacher", GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, **gpt2))),
    ):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    GPT2Config(n_embd=32, n_layer=2, architectures=["GPT2LMHeadModel"], **gpt2).save_pretrained(out / "gpt2_student")
    tokenizer.save_pretrained(out / "gpt2_student")

    sentences = [" ".join(words[i : i + 12]) for i in range(0, len(words) - 12, 12)]
    split = int(0.8 * len(sentences))
    for name, rows in (("train", sentences[:split]), ("validation", sentences[split:])):
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["sentence", "label"])
            writer.writerows((s, LABELS[i % 3]) for i, s in enumerate(rows))
        (out / f"{name}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(tokenizer)} tokens, {split} training rows")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "assets")
    main(parser.parse_args().output_dir)
