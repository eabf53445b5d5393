# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
Real text that needs no download, and a tokenizer trained on it, for the text examples of hf-distill.

The text is the Python standard library's own source code: every `*.py` file under `sysconfig.get_paths()["stdlib"]`
except tests, bundled third-party packages and generated tables (`EXCLUDED_DIRECTORIES`, `EXCLUDED_FILE_PREFIXES`).
It ships with every Python installation, so the examples run offline. It is *that installation's* standard library:
the files, and so every number measured on them, differ between Python versions (and slightly between platforms);
[`load_stdlib_corpus`] records the version, the file counts and a fingerprint of the text it read.

Everything is deterministic, except for ties in tokenizer training (below):

* each file's split (train / validation / test) is a hash of its path relative to the standard library, so a file
  never changes split when the caps change or files are added, and no file is in two splits;
* the caps (`max_files`, `max_chars`) are shared among the splits by their fractions and keep each split's files in a
  fixed pseudo-random order (another hash of the path), so a capped corpus is a sample of the whole library rather
  than its alphabetically first packages, and every split has at least one file;
* the tokenizer is trained on the training split only and cached on disk, keyed by its settings and the corpus
  fingerprint ([`load_or_train_tokenizer`]), so a run reuses the vocabulary of the previous one. Retraining gives the
  same byte-level BPE every time, and the same WordPiece vocabulary (ids in sorted order) unless merges tie at the
  vocabulary size: `tokenizers` breaks such ties in an order that varies between runs (seen on 40 files with 600
  tokens: one token swapped for another; the whole library at 4,096 tokens gave one vocabulary in 5 trainings).
  [`tokenizer_fingerprint`] identifies a vocabulary, for keys of anything trained with it.

Tokenizers ([`train_tokenizer`]): `"wordpiece"` (BERT style: [PAD] [UNK] [CLS] [SEP] [MASK], case kept, inputs
wrapped as `[CLS] ... [SEP]`) for masked LMs; `"bpe"` (GPT-2-style byte-level BPE with `<|endoftext|>`, which
round-trips any text exactly) for causal LMs. Both are returned as `transformers.PreTrainedTokenizerFast`.

[`chunk_into_blocks`] turns texts into a `datasets.Dataset` of equal-length blocks (`input_ids`, `attention_mask`).

This module belongs to the examples, not to the `hf_distill` library; the scripts import it as a sibling module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# Any path component equal to one of these leaves the file out: tests (they are largely data, and would dominate),
# IDLE and the turtle demos (applications), bundled or installed third-party code, 2to3 (its fixers are mostly
# tests and grammar tables), generated codec tables and pydoc's topic dump (not code).
EXCLUDED_DIRECTORIES = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "ensurepip",
        "encodings",
        "pydoc_data",
        "lib-dynload",
        "__pycache__",
    }
)
# Directory names starting with `config-` (the build's Makefile and scripts) and generated files.
EXCLUDED_DIRECTORY_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)

WORDPIECE_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
BPE_SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}


@dataclass
class TextCorpus:
    """Texts per split (`corpus["train"]` is a list of file contents), their files, and where they came from."""

    texts: dict[str, list[str]]
    files: dict[str, list[str]]
    info: dict = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[str]:
        return self.texts[split]

    def keys(self):
        return self.texts.keys()

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]


def _unit_hash(text: str) -> float:
    """A number in [0, 1) from a string, the same on every machine and Python version (unlike `hash`)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def split_of(relative_path: str, validation_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """The split of a file, from its path relative to the standard library (with `/` separators) alone."""
    u = _unit_hash(f"split:{relative_path}")
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def stdlib_source_files(stdlib_dir: str | Path | None = None) -> list[str]:
    """Sorted relative paths (`/`-separated) of the standard library's `*.py` files that the corpus uses."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    selected = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        directories = relative.parts[:-1]
        if any(part in EXCLUDED_DIRECTORIES or part.startswith(EXCLUDED_DIRECTORY_PREFIXES) for part in directories):
            continue
        if relative.name.startswith(EXCLUDED_FILE_PREFIXES) or not path.is_file():
            continue
        selected.append(relative.as_posix())
    return sorted(selected)


def load_stdlib_corpus(
    max_files: int | None = None,
    max_chars: int | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    stdlib_dir: str | Path | None = None,
) -> TextCorpus:
    """
    The standard library's source files as texts, split by file into train / validation / test.

    Args:
        max_files: keep at most this many files in all (None: all). Each split gets its share of them (at least one
            file per split), taken in a fixed pseudo-random order of its files.
        max_chars: likewise for characters: each split keeps files, in that order, while its total stays within its
            share; a file that would overshoot is skipped and the next ones are tried (None: no limit).
        validation_fraction, test_fraction: the share of the files in each held-out split (and of the caps). A file's
            split depends on its path only, so it is the same whatever the caps.
        stdlib_dir: the folder to read (default: this interpreter's standard library).

    Returns a [`TextCorpus`]: `corpus[split]` is a list of texts (one per file, in sorted path order),
    `corpus.files[split]` the relative paths, `corpus.info` the Python version, the folder, file and character
    counts per split, the settings and a fingerprint of the texts (for cache keys). Raises if a split is left empty.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    shares = {"train": 1.0 - validation_fraction - test_fraction, "validation": validation_fraction}
    shares["test"] = test_fraction
    candidates: dict[str, list[str]] = {split: [] for split in SPLITS}
    for relative in sorted(stdlib_source_files(root), key=lambda relative: _unit_hash(f"order:{relative}")):
        candidates[split_of(relative, validation_fraction, test_fraction)].append(relative)

    texts: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    digest = hashlib.sha256()
    for split in SPLITS:
        file_budget = None if max_files is None else max(1, round(max_files * shares[split]))
        char_budget = None if max_chars is None else max_chars * shares[split]
        chosen, total = [], 0
        for relative in candidates[split]:
            if file_budget is not None and len(chosen) >= file_budget:
                break
            text = (root / relative).read_text(encoding="utf-8", errors="replace")
            if not text.strip() or (char_budget is not None and total + len(text) > char_budget):
                continue
            chosen.append((relative, text))
            total += len(text)
        if not chosen:
            raise ValueError(
                f"The {split} split of {root} is empty with max_files={max_files}, max_chars={max_chars}: raise them."
            )
        chosen.sort()
        files[split], texts[split] = [relative for relative, _ in chosen], [text for _, text in chosen]
        for relative, text in chosen:
            digest.update(f"{split}\0{relative}\0{len(text)}\0".encode())
            digest.update(text.encode("utf-8", errors="replace"))
    info = {
        "source": "Python standard library source (*.py)",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_dir": str(root),
        "num_files": {split: len(files[split]) for split in SPLITS},
        "num_chars": {split: sum(map(len, texts[split])) for split in SPLITS},
        "settings": {
            "max_files": max_files,
            "max_chars": max_chars,
            "validation_fraction": validation_fraction,
            "test_fraction": test_fraction,
        },
        "fingerprint": digest.hexdigest(),
        "note": "The corpus is this interpreter's standard library, so it (and any result on it) differs across "
        "Python versions.",
    }
    return TextCorpus(texts=texts, files=files, info=info)


def describe(corpus: TextCorpus) -> str:
    """One line for logs: where the text came from and how much of it there is."""
    info = corpus.info
    counts = ", ".join(
        f"{split} {info['num_files'][split]} files / {info['num_chars'][split]:,} chars" for split in SPLITS
    )
    return f"{info['source']} of {info['python_implementation']} {info['python_version']}: {counts}"


def _batches(texts: Sequence[str], size: int = 64) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield list(texts[start : start + size])


def train_tokenizer(
    texts: Sequence[str], kind: str = "wordpiece", vocab_size: int = 8192, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """
    Train a tokenizer on `texts`, offline, with the `tokenizers` library.

    `kind="wordpiece"`: BERT's WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4), case kept (code is
    case-sensitive), single texts encoded as `[CLS] ... [SEP]`. Decoding joins words with spaces, so it gives the
    text back up to whitespace (and [UNK] for characters never seen).
    `kind="bpe"`: byte-level BPE as GPT-2's, with `<|endoftext|>` (bos = eos) and `<|pad|>`; no special tokens are
    added when encoding, and decoding gives back exactly the text encoded.
    """
    if kind == "wordpiece":
        special = WORDPIECE_SPECIAL_TOKENS
        tokenizer = Tokenizer(models.WordPiece(unk_token=special["unk_token"], max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special.values()),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
        # The trainer numbers some tokens (the "##" alphabet) in hash order, which differs between runs: renumber all
        # in sorted order after the special tokens, so the same tokens always get the same ids.
        learned = sorted(set(tokenizer.get_vocab()) - set(special.values()))
        vocab = {token: i for i, token in enumerate([*special.values(), *learned])}
        tokenizer.model = models.WordPiece(vocab, unk_token=special["unk_token"], max_input_chars_per_word=100)
        cls_id, sep_id = tokenizer.token_to_id(special["cls_token"]), tokenizer.token_to_id(special["sep_token"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    elif kind == "bpe":
        special = BPE_SPECIAL_TOKENS
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(dict.fromkeys(special.values())),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    else:
        raise ValueError(f"Unknown tokenizer kind {kind!r}; choose 'wordpiece' (masked LMs) or 'bpe' (causal LMs).")
    # Blocks are cut by `chunk_into_blocks`, never by the tokenizer; a large limit keeps long files warning-free.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=sys.maxsize, **special)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of the vocabulary (tokens and ids): equal for tokenizers that encode alike."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def load_or_train_tokenizer(
    corpus: TextCorpus,
    cache_dir: str | Path,
    kind: str = "wordpiece",
    vocab_size: int = 8192,
    min_frequency: int = 2,
) -> tuple[PreTrainedTokenizerFast, Path, bool]:
    """
    The tokenizer trained on `corpus["train"]`, loaded from `cache_dir` if one with the same settings and corpus was
    saved there, else trained and saved. Returns it, its folder, and whether it was loaded from the cache.
    """
    settings = {
        "kind": kind,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "corpus_fingerprint": corpus.fingerprint,
        "tokenizers_version": tokenizers.__version__,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(cache_dir) / f"tokenizer-{kind}-{vocab_size}-{key}"
    settings_file = directory / "corpus_tokenizer_settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) == settings:
        return PreTrainedTokenizerFast.from_pretrained(directory), directory, True
    tokenizer = train_tokenizer(corpus["train"], kind=kind, vocab_size=vocab_size, min_frequency=min_frequency)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    settings_file.write_text(json.dumps(settings, indent=2))  # written last: a half-saved folder is never reused
    return tokenizer, directory, False


def chunk_into_blocks(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], block_size: int, max_blocks: int | None = None
) -> datasets.Dataset:
    """
    Tokenize `texts`, concatenate them and cut the stream into blocks of exactly `block_size` tokens (the remainder
    is dropped), as `run_mlm.py` / `run_clm.py` do. Texts are separated by the tokenizer's [SEP] (WordPiece) or
    `<|endoftext|>` (BPE). With a [CLS]/[SEP] tokenizer every block is `[CLS] + (block_size - 2) tokens + [SEP]`, as
    BERT sees its inputs. `max_blocks` keeps the first blocks only. Columns: `input_ids`, `attention_mask` (all 1).
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    wrap = cls_id is not None and sep_id is not None
    separator = sep_id if wrap else tokenizer.eos_token_id
    body = block_size - 2 if wrap else block_size
    if body < 1:
        raise ValueError(f"block_size={block_size} leaves no room for text between [CLS] and [SEP].")

    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    stream: list[int] = []
    for encoding in encodings:
        stream.extend(encoding.ids)
        if separator is not None:
            stream.append(separator)
    num_blocks = len(stream) // body
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    blocks = [stream[i * body : (i + 1) * body] for i in range(num_blocks)]
    if wrap:
        blocks = [[cls_id, *block, sep_id] for block in blocks]
    return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]})
