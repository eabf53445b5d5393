# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""The `hf-distill` command line (also `python -m hf_distill`): distil a student from files or a dataset on the Hub.

    hf-distill train [CONFIG.yaml|CONFIG.json] [--flag value ...]
    hf-distill precompute [CONFIG.yaml|CONFIG.json] --teacher_model_name_or_path T --train_file F --output_dir DIR

Each subcommand parses `ModelArguments`, `DataArguments` (and, for `precompute`, `PrecomputeArguments`) and
`DistillationTrainingArguments` with `transformers.HfArgumentParser`. A config file gives values for any of their
fields; flags after it override them. Input is checked before any model is trained (`check_*` below): every error
names the argument to change. docs/cli.md describes the arguments, the task inference and the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    default_data_collator,
)
from transformers.utils import logging

from .arguments import DistillationTrainingArguments
from .models import accepted_arguments, auto_class_for_architecture, logits_of
from .student_init import init_student_from_teacher
from .teacher_cache import precompute_teacher_logits, read_cache_metadata
from .teachers import load_teacher
from .trainer import DistillationTrainer


logger = logging.get_logger(__name__)

TASKS = {
    "text-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "causal-lm": AutoModelForCausalLM,
    "image-classification": AutoModelForImageClassification,
}
CLASSIFICATION_TASKS = ("text-classification", "image-classification")
DATA_FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# Tokens per row when `--max_length` is not given (the training argument, which also bounds on-policy generation).
TOKENIZE_MAX_LENGTH = 128
CLI_METADATA_FILE = "hf_distill_cli.json"  # written next to a precomputed cache: task and label names


class BadInputError(ValueError):
    """Input the command line refuses before training; the message names the argument and the fix."""


@dataclass
class ModelArguments:
    """The student (one of three sources), the teacher(s), and the task."""

    _argument_group_name = "model arguments"

    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The student: a Hub id or a local directory saved with `save_pretrained`."}
    )
    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Instead: a config (Hub id, directory or config.json) to build a randomly initialised student."
        },
    )
    student_init_from_teacher_layers: int | None = field(
        default=None,
        metadata={
            "help": "Instead: a student made of this many of the (first) teacher's layers, evenly spread "
            "(`hf_distill.init_student_from_teacher(teacher, num_layers=N)`, DistilBERT's initialisation)."
        },
    )
    teacher_model_name_or_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "The teacher: a Hub id or local directory, or several (an ensemble, see `ensemble_reduction`). "
            "Loaded with `teacher_model_init_kwargs`. Optional with `train_dataset_path` (a precomputed cache)."
        },
    )
    student_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'Keyword arguments for the student\'s `from_pretrained` (JSON), e.g. \'{"dtype": "bfloat16", '
            '"num_labels": 3}\'. With `student_config` they update the config (`dtype` goes to `from_config`). The '
            "teacher's come only from `teacher_model_init_kwargs`."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The student's tokenizer (or image processor); default: the student's path, else its config's, "
            "else the first teacher's."
        },
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "What the student does; default: inferred from the student's (or teacher's) config `architectures`.",
            "choices": list(TASKS),
        },
    )

    def __post_init__(self):
        if isinstance(self.student_model_init_kwargs, str):
            try:
                self.student_model_init_kwargs = json.loads(self.student_model_init_kwargs)
            except json.JSONDecodeError as error:
                raise BadInputError(
                    f"`--student_model_init_kwargs` is not valid JSON ({error}): give an object, e.g. "
                    '\'{"dtype": "bfloat16"}\'.'
                ) from None
        if self.student_model_init_kwargs is not None and not isinstance(self.student_model_init_kwargs, dict):
            raise BadInputError(
                f"`--student_model_init_kwargs` must be a JSON object, got {self.student_model_init_kwargs!r}."
            )
        if isinstance(self.teacher_model_name_or_path, str):  # a single value from a config file
            self.teacher_model_name_or_path = [self.teacher_model_name_or_path]
        if self.task is not None and self.task not in TASKS:
            raise BadInputError(
                f"Unknown `--task` {self.task!r}; choose one of {list(TASKS)}, or omit it to infer it."
            )


@dataclass
class DataArguments:
    """Where the data comes from, which columns hold what, and how much of it to use."""

    _argument_group_name = "data arguments"

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (`datasets.load_dataset`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of `dataset_name`."})
    train_file: str | None = field(
        default=None, metadata={"help": "Instead of `dataset_name`: a csv, json, jsonl, parquet or txt training file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "The evaluation file (same formats)."})
    test_file: str | None = field(default=None, metadata={"help": "A test file, predicted after training."})
    train_dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "Instead of raw training data: a directory written by `hf-distill precompute` (tokenised rows with "
            "cached teacher outputs); trains with no teacher unless one is given (then it must be the cache's)."
        },
    )
    text_column: str = field(
        default="text",
        metadata={
            "help": "Column with the text (token-classification: the list of words; image-classification: the image)."
        },
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Optional second text column (sentence pairs, text-classification)."}
    )
    label_column: str = field(
        default="label",
        metadata={"help": "Column with the label (token-classification: one tag per word). Unused for causal-lm."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation (and test) rows."}
    )


@dataclass
class PrecomputeArguments:
    """How `hf-distill precompute` stores the teacher's outputs (`precompute_teacher_logits`)."""

    _argument_group_name = "precompute arguments"

    top_k: int | None = field(
        default=None, metadata={"help": "Keep the teacher's k largest log-probabilities per position (default: all)."}
    )
    top_k_tail: bool = field(default=False, metadata={"help": "With `top_k`, also store the mass outside the top k."})
    dtype: str = field(
        default="float16",
        metadata={"help": "Storage precision of the cached values.", "choices": ["float16", "bfloat16", "float32"]},
    )
    batch_size: int = field(default=64, metadata={"help": "Rows per teacher forward."})


class TrainingArguments(DistillationTrainingArguments):
    """`DistillationTrainingArguments`, shown as its own group in `--help` (HfArgumentParser's group name)."""

    _argument_group_name = "distillation and training arguments (DistillationTrainingArguments)"


SUBCOMMANDS = {
    "train": (
        "Distil a student from a teacher (or a precomputed cache), evaluate it, save it with its model card.",
        (ModelArguments, DataArguments, TrainingArguments),
    ),
    "precompute": (
        "Run the teacher once over the training data and save the rows with its outputs (`save_to_disk`).",
        (ModelArguments, DataArguments, PrecomputeArguments, TrainingArguments),
    ),
}


# ---- parsing ----


def make_parser(command: str) -> HfArgumentParser:
    """The `HfArgumentParser` of one subcommand (`train` or `precompute`), with the config file as a positional."""
    description, dataclass_types = SUBCOMMANDS[command]
    parser = HfArgumentParser(dataclass_types, prog=f"hf-distill {command}", description=description)
    parser.add_argument(
        "config", nargs="?", help="A .yaml/.yml or .json file of argument values; flags given after it override it."
    )
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """The values of a YAML or JSON config file, as a dict of field names."""
    if not os.path.isfile(path):
        raise BadInputError(f"The config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as file:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(file) or {}
        elif path.endswith(".json"):
            values = json.load(file)
        else:
            raise BadInputError(f"The config file {path!r} must end in .yaml, .yml or .json.")
    if not isinstance(values, dict):
        raise BadInputError(f"The config file {path!r} must hold a mapping of argument names to values.")
    return values


def parse_args(command: str, argv: Sequence[str]) -> tuple:
    """Parse one subcommand's arguments: the dataclasses of `SUBCOMMANDS[command]`, in order.

    A config file (the first argument, when it ends in .yaml/.yml/.json) sets the parser's defaults, so flags after it
    override it; its keys must be the parser's field names.
    """
    parser = make_parser(command)
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        values = read_config_file(argv[0])
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadInputError(
                f"The config file {argv[0]!r} has keys that are no argument of `hf-distill {command}`: {unknown}. "
                f"See `hf-distill {command} --help`."
            )
        # A JSON object in a file is already a dict: argparse passes non-string defaults through untouched.
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file satisfies a required argument
            if action.dest in values:
                action.required = False
    *parsed, _ = parser.parse_args_into_dataclasses(args=argv[1:] if argv and not argv[0].startswith("-") else argv)
    return tuple(parsed)


# ---- models, tokenizers, task ----


def _init_kwargs(kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    for key in ("dtype", "torch_dtype"):  # "bfloat16" from JSON means torch.bfloat16
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    return kwargs


def check_student_source(model_args: ModelArguments) -> None:
    sources = [
        name
        for name in ("student_model_name_or_path", "student_config", "student_init_from_teacher_layers")
        if getattr(model_args, name) is not None
    ]
    if not sources:
        raise BadInputError(
            "No student given: pass `--student_model_name_or_path` (a Hub id or local directory), `--student_config` "
            "(a config to build a randomly initialised student from) or `--student_init_from_teacher_layers N` (N of "
            "the teacher's layers)."
        )
    if len(sources) > 1:
        raise BadInputError(f"Give one student source, not {['--' + s for s in sources]}.")
    if model_args.student_init_from_teacher_layers is not None and not model_args.teacher_model_name_or_path:
        raise BadInputError("`--student_init_from_teacher_layers` needs `--teacher_model_name_or_path`.")


def student_config(model_args: ModelArguments):
    """The config the student will have (a student built from the teacher's layers: the teacher's)."""
    config_kwargs = {
        k: v for k, v in (model_args.student_model_init_kwargs or {}).items() if k not in ("dtype", "torch_dtype")
    }
    if model_args.student_model_name_or_path is not None:
        return AutoConfig.from_pretrained(model_args.student_model_name_or_path, **config_kwargs)
    if model_args.student_config is not None:
        return AutoConfig.from_pretrained(model_args.student_config, **config_kwargs)
    return AutoConfig.from_pretrained(model_args.teacher_model_name_or_path[0])


def infer_task(model_args: ModelArguments, config) -> str:
    """`--task`, else the task of the `AutoModelFor...` class that loads the config's first architecture."""
    if model_args.task is not None:
        return model_args.task
    auto_class = auto_class_for_architecture(config) if config.architectures else None
    task = next((name for name, cls in TASKS.items() if cls is auto_class), None)
    if task is None:
        raise BadInputError(
            f"Cannot infer the task from the student's config (architectures={config.architectures}): pass `--task`, "
            f"one of {list(TASKS)}."
        )
    return task


def tokenizer_path(model_args: ModelArguments) -> str:
    return (
        model_args.tokenizer_name_or_path
        or model_args.student_model_name_or_path
        or model_args.student_config
        or model_args.teacher_model_name_or_path[0]
    )


def load_processor(model_args: ModelArguments, task: str):
    path = tokenizer_path(model_args)
    try:
        if task == "image-classification":
            return AutoImageProcessor.from_pretrained(path)
        processor = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise BadInputError(
            f"Cannot load the student's {'image processor' if task == 'image-classification' else 'tokenizer'} "
            f"from {path!r} ({error}); pass `--tokenizer_name_or_path`."
        ) from None
    if task == "causal-lm" and processor.pad_token is None:
        processor.pad_token = processor.eos_token  # batches are padded; padded positions get label -100
    return processor


def check_teacher_tokenizers(model_args: ModelArguments, tokenizer, task: str) -> None:
    """Refuse a teacher whose vocabulary differs from the student tokenizer's: the teacher reads the student's ids."""
    if task == "image-classification" or not model_args.teacher_model_name_or_path:
        return
    vocab = tokenizer.get_vocab()
    for teacher in model_args.teacher_model_name_or_path:
        try:
            teacher_vocab = AutoTokenizer.from_pretrained(teacher).get_vocab()
        except (OSError, ValueError):
            logger.warning(f"The teacher {teacher!r} has no tokenizer to compare: assuming it shares the student's.")
            continue
        if teacher_vocab != vocab:
            differing = len(set(teacher_vocab.items()) ^ set(vocab.items()))
            consequence = (
                "the KD targets are distributions over the teacher's tokens, which would not be the student's"
                if task == "causal-lm"
                else "the teacher would read the student's token ids as other tokens"
                + (" and label other positions" if task == "token-classification" else "")
            )
            raise BadInputError(
                f"The teacher {teacher!r} has a different tokenizer from the student's ({tokenizer_path(model_args)!r}:"
                f" {len(teacher_vocab)} vs {len(vocab)} entries, {differing} (token, id) pairs differ): {consequence}."
                " Change `--teacher_model_name_or_path` to a teacher with the student's tokenizer, or the student "
                "(`--student_model_name_or_path` / `--tokenizer_name_or_path`) to one with the teacher's."
            )


def load_student(model_args: ModelArguments, config, task: str, teacher=None):
    """The student, from a checkpoint, from its config (random initialisation) or from the teacher's layers."""
    kwargs = _init_kwargs(model_args.student_model_init_kwargs)
    auto_class = TASKS[task]
    if model_args.student_model_name_or_path is not None:
        return auto_class.from_pretrained(model_args.student_model_name_or_path, **kwargs)
    if model_args.student_config is not None:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return auto_class.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    student = init_student_from_teacher(teacher, num_layers=model_args.student_init_from_teacher_layers)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    return student.to(dtype) if isinstance(dtype, torch.dtype) else student


# ---- data ----


def load_raw_datasets(data_args: DataArguments) -> datasets.DatasetDict:
    """The raw splits ("train", "validation", "test"; those given) with `datasets.load_dataset`."""
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw.pop("test")
        return raw
    files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path is not None
    }
    if not files:
        raise BadInputError(
            "No data given: pass `--dataset_name`, or `--train_file` (and `--validation_file`), or "
            "`--train_dataset_path` (a directory written by `hf-distill precompute`)."
        )
    builders = set()
    for split, path in files.items():
        extension = os.path.splitext(path)[1].lower()
        if extension not in DATA_FILE_TYPES:
            raise BadInputError(
                f"`--{split}_file` {path!r}: unsupported extension {extension!r}; use one of {sorted(DATA_FILE_TYPES)}."
            )
        if not os.path.isfile(path):
            raise BadInputError(f"`--{split}_file` {path!r} does not exist.")
        builders.add(DATA_FILE_TYPES[extension])
    if len(builders) > 1:
        raise BadInputError(f"The data files must share one format, got {sorted(builders)}.")
    return datasets.load_dataset(builders.pop(), data_files=files)


def check_columns(raw: datasets.DatasetDict, data_args: DataArguments, task: str) -> None:
    needed = [("--text_column", data_args.text_column)]
    if data_args.text_pair_column is not None:
        needed.append(("--text_pair_column", data_args.text_pair_column))
    if task != "causal-lm":
        needed.append(("--label_column", data_args.label_column))
    for split, dataset in raw.items():
        for argument, column in needed:
            if column not in dataset.column_names:
                raise BadInputError(
                    f"The {split} data has no column {column!r} (`{argument}`); its columns are {dataset.column_names}."
                    f" Pass `{argument}` with one of them."
                )


def label_names(raw: datasets.DatasetDict, data_args: DataArguments, task: str) -> list | None:
    """The training labels, sorted (a `ClassLabel`'s names): label i of the student is `label_names[i]`.

    Raises when an evaluation or test label is not among the training labels.
    """
    if task == "causal-lm":
        return None
    column = data_args.label_column
    feature = raw["train"].features[column]
    inner = getattr(feature, "feature", feature)  # token classification: a Sequence/List of labels
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)

    def labels_of(dataset):
        values = dataset[column]
        return set(v for row in values for v in row) if task == "token-classification" else set(values)

    names = sorted(labels_of(raw["train"]))
    for split in ("validation", "test"):
        if split in raw:
            unseen = sorted(labels_of(raw[split]) - set(names), key=str)
            if unseen:
                raise BadInputError(
                    f"The {split} data has labels {unseen} (column {column!r}, `--label_column`) that the training "
                    f"data never has (its labels: {names}): the student would have no output for them. Fix the "
                    f"`--{split}_file`, or add rows with those labels to `--train_file`."
                )
    return names


def check_num_labels(names: list | None, config, model_args: ModelArguments) -> None:
    if names is None:
        return
    if config.num_labels != len(names):
        raise BadInputError(
            f"The training data has {len(names)} labels ({names[:10]}{' ...' if len(names) > 10 else ''}) but the "
            f"student has num_labels={config.num_labels}. Pass `--student_model_init_kwargs "
            f"'{{\"num_labels\": {len(names)}}}'` (a new classification head), or fix `--label_column`/the data."
        )


def tokenize(
    raw: datasets.DatasetDict, data_args: DataArguments, task: str, processor, names, max_length: int
) -> datasets.DatasetDict:
    """The splits as model inputs: ``input_ids``/``attention_mask`` (images: ``pixel_values``) and ``labels``; rows
    truncated to `max_length` tokens."""
    to_id = {name: i for i, name in enumerate(names)} if names is not None else None
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    if task == "image-classification":

        def transform(batch):
            images = [image.convert("RGB") for image in batch[text]]
            inputs = processor(images, return_tensors="pt")
            return {"pixel_values": inputs["pixel_values"], "labels": [to_id[v] for v in batch[label]]}

        for split in raw:
            raw[split].set_transform(transform)
        return raw

    def encode(batch):
        if task == "token-classification":
            encoded = processor(batch[text], is_split_into_words=True, truncation=True, max_length=max_length)
            encoded["labels"] = []
            for row, tags in enumerate(batch[label]):
                words, previous, row_labels = encoded.word_ids(row), None, []
                for word in words:  # the first sub-token of each word carries its tag
                    row_labels.append(-100 if word is None or word == previous else to_id[tags[word]])
                    previous = word
                encoded["labels"].append(row_labels)
            return encoded
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        encoded = processor(*args, truncation=True, max_length=max_length)
        if task == "text-classification":
            encoded["labels"] = [to_id[v] for v in batch[label]]
        return encoded

    tokenized = datasets.DatasetDict()
    for split, dataset in raw.items():
        if task == "causal-lm":
            dataset = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch[text]], batched=True)
        tokenized[split] = dataset.map(
            encode, batched=True, remove_columns=dataset.column_names, desc=f"Tokenising {split}"
        )
    return tokenized


def data_collator(task: str, processor):
    if task == "image-classification":
        return default_data_collator
    if task == "token-classification":
        return DataCollatorForTokenClassification(processor)
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(processor, mlm=False)  # labels = input_ids, padding -100
    return DataCollatorWithPadding(processor)


def _select(dataset, limit: int | None):
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None and dataset is not None else dataset


def prepare(model_args: ModelArguments, data_args: DataArguments, training_args, *, needs_teacher: bool):
    """Everything checked and loaded before a model: config, task, processor, tokenised splits, label names.

    Rows are truncated to the training argument `max_length` (also the length limit of on-policy generation; one field,
    as TRL's configs carry it), `TOKENIZE_MAX_LENGTH` when it is None."""
    check_student_source(model_args)
    if needs_teacher and not model_args.teacher_model_name_or_path:
        raise BadInputError(
            "No teacher: pass `--teacher_model_name_or_path` (or train on a cache from `hf-distill precompute` with "
            "`--train_dataset_path`)."
        )
    config = student_config(model_args)
    task = infer_task(model_args, config)
    cache_info = None
    max_length = training_args.max_length if training_args.max_length is not None else TOKENIZE_MAX_LENGTH
    if data_args.train_dataset_path is not None:
        info_path = os.path.join(data_args.train_dataset_path, CLI_METADATA_FILE)
        if not os.path.isfile(info_path):
            raise BadInputError(
                f"`--train_dataset_path` {data_args.train_dataset_path!r} is not a directory written by `hf-distill "
                f"precompute` (no {CLI_METADATA_FILE})."
            )
        with open(info_path, encoding="utf-8") as file:
            cache_info = json.load(file)
        if cache_info["task"] != task:
            raise BadInputError(
                f"`--train_dataset_path` holds a {cache_info['task']} cache but the student's task is {task} (`--task`)."
            )
        data_args.train_file = None
    raw = (
        load_raw_datasets(data_args)
        if cache_info is None or data_args.validation_file or data_args.test_file
        else None
    )
    if raw is not None:
        check_columns(raw, data_args, task)
    if cache_info is not None:
        names = cache_info["label_names"]
        if raw is not None:
            raw_with_train = datasets.DatasetDict(dict(raw))
            if names is not None:
                raw_with_train["train"] = datasets.Dataset.from_dict(
                    {data_args.label_column: [[n] for n in names] if task == "token-classification" else list(names)}
                )
                label_names(raw_with_train, data_args, task)  # eval/test labels within the cache's
    else:
        if "train" not in raw:
            raise BadInputError("No training split: pass `--train_file` (or a `--dataset_name` with a train split).")
        names = label_names(raw, data_args, task)
    check_num_labels(names, config, model_args)
    processor = load_processor(model_args, task)
    check_teacher_tokenizers(model_args, processor, task)
    tokenized = (
        tokenize(raw, data_args, task, processor, names, max_length) if raw is not None else datasets.DatasetDict()
    )
    if cache_info is not None:
        tokenized["train"] = datasets.load_from_disk(data_args.train_dataset_path)
    tokenized["train"] = _select(tokenized["train"], data_args.max_train_samples)
    for split in ("validation", "test"):
        if split in tokenized:
            tokenized[split] = _select(tokenized[split], data_args.max_eval_samples)
    return config, task, processor, tokenized, names


# ---- subcommands ----


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args) -> DistillationTrainer:
    """Check the input, load the data, the student and the teacher(s), and build the `DistillationTrainer`."""
    cached = data_args.train_dataset_path is not None
    config, task, processor, tokenized, names = prepare(model_args, data_args, training_args, needs_teacher=not cached)
    teachers = model_args.teacher_model_name_or_path
    teacher = None
    if model_args.student_init_from_teacher_layers is not None:
        teacher = load_teacher(teachers[0], None, training_args.teacher_model_init_kwargs)
        teachers = [teacher, *teachers[1:]]
    student = load_student(model_args, config, task, teacher)
    if names is not None:  # the saved student names its labels
        student.config.id2label = {i: str(name) for i, name in enumerate(names)}
        student.config.label2id = {str(name): i for i, name in enumerate(names)}
    try:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=(teachers[0] if len(teachers) == 1 else teachers) if teachers else None,
            args=training_args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized.get("validation"),
            processing_class=processor,
            data_collator=data_collator(task, processor),
        )
    except ValueError as error:
        if cached and read_cache_metadata(tokenized["train"]) is not None and teachers:
            raise BadInputError(
                f"`--train_dataset_path` {data_args.train_dataset_path!r} does not fit `--teacher_model_name_or_path` "
                f"{model_args.teacher_model_name_or_path}: {error} (On the command line: omit "
                "`--teacher_model_name_or_path` to train on the cache alone, or rerun `hf-distill precompute` with "
                "this teacher.)"
            ) from error
        raise
    trainer.cli_task, trainer.cli_test_dataset = task, tokenized.get("test")
    return trainer


def fidelity_metrics(trainer: DistillationTrainer, dataset, prefix: str = "eval") -> dict[str, float]:
    """`distillation_fidelity` (teacher agreement, KL, accuracy, ECE) of the student against its teacher on `dataset`,
    keys ``{prefix}_fidelity_*``; {} without a teacher model."""
    from .metrics import load_distillation_fidelity

    teacher = trainer.teacher_model
    if teacher is None or dataset is None:
        return {}
    output = trainer.predict(dataset, metric_key_prefix=prefix)
    student_logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    accepted = accepted_arguments(teacher)
    teacher_logits = []
    device = next(teacher.parameters()).device
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(dataset):
            inputs = {
                k: v.to(device)
                for k, v in batch.items()
                if isinstance(v, torch.Tensor) and k != "labels" and (accepted is None or k in accepted)
            }
            teacher_logits.append(logits_of(teacher(**inputs)).float().cpu().numpy())
    teacher_logits = np.concatenate(teacher_logits)
    results = load_distillation_fidelity().compute(
        student_logits=student_logits.astype(np.float32), teacher_logits=teacher_logits, references=output.label_ids
    )
    return {f"{prefix}_fidelity_{name}": float(value) for name, value in results.items()}


def run_train(model_args: ModelArguments, data_args: DataArguments, training_args) -> DistillationTrainer:
    """Train, evaluate (and test), save the student, its card and the metrics in `output_dir`, push if asked."""
    trainer = build_trainer(model_args, data_args, training_args)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the student, its processor and, through `create_model_card`, the distillation card
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if trainer.cli_task in CLASSIFICATION_TASKS:
            metrics.update(fidelity_metrics(trainer, trainer.eval_dataset, "eval"))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.cli_test_dataset is not None:
        metrics = trainer.predict(trainer.cli_test_dataset, metric_key_prefix="test").metrics
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)))
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


def run_precompute(model_args, data_args, precompute_args, training_args) -> datasets.Dataset:
    """Tokenise the training data as `train` does, run the teacher(s) over it, `save_to_disk` it in `output_dir`."""
    if data_args.train_dataset_path is not None:
        raise BadInputError(
            "`--train_dataset_path` is an input of `hf-distill train`; precompute reads `--train_file`."
        )
    no_student = (model_args.student_model_name_or_path, model_args.student_config) == (None, None)
    if no_student and model_args.student_init_from_teacher_layers is None and model_args.teacher_model_name_or_path:
        model_args.student_config = model_args.teacher_model_name_or_path[0]  # tokenise and infer the task as for it
    config, task, processor, tokenized, names = prepare(model_args, data_args, training_args, needs_teacher=True)
    teachers = model_args.teacher_model_name_or_path
    cached = precompute_teacher_logits(
        teachers if len(teachers) > 1 else teachers[0],
        tokenized["train"],
        batch_size=precompute_args.batch_size,
        top_k=precompute_args.top_k,
        top_k_tail=precompute_args.top_k_tail,
        dtype=precompute_args.dtype,
        data_collator=data_collator(task, processor),
        ensemble_reduction=training_args.ensemble_reduction,
        teacher_weights=training_args.teacher_weights,
        temperature=training_args.temperature,
        teacher_model_init_kwargs=training_args.teacher_model_init_kwargs,
        device=training_args.device,
    )
    cached.save_to_disk(training_args.output_dir)
    with open(os.path.join(training_args.output_dir, CLI_METADATA_FILE), "w", encoding="utf-8") as file:
        json.dump({"task": task, "label_names": names, "tokenizer": tokenizer_path(model_args)}, file, indent=2)
    logger.warning(f"Saved {len(cached)} rows with the teacher's outputs to {training_args.output_dir}.")
    return cached


def make_top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-distill",
        description="Knowledge distillation on the Hugging Face stack. `hf-distill COMMAND --help` lists every argument "
        "of a command, grouped (model, data, distillation and training).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (description, _) in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=description, add_help=False)
    return parser


def run(argv: Sequence[str] | None = None):
    """Run `hf-distill` with `argv` (default `sys.argv[1:]`); returns the trainer (`train`) or the cache (`precompute`).

    Raises `BadInputError` for input refused before training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        make_top_level_parser().parse_args(argv or ["--help"])  # prints help or the error, and exits
    command, rest = argv[0], argv[1:]
    parsed = parse_args(command, rest)
    if command == "train":
        return run_train(*parsed)
    return run_precompute(*parsed)


def main(argv: Sequence[str] | None = None):
    """The console script: `run`, with refused input reported as ``hf-distill: error: ...`` (exit status 2)."""
    try:
        return run(argv)
    except BadInputError as error:
        print(f"hf-distill: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
