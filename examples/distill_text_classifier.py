# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
Distil a text classifier into a smaller one, on CPU, offline: which standard-library package does a code snippet
come from?

1. **Task.** K packages of Python's standard library (asyncio, email, xml, ...; `--packages`) are the classes; a
   snippet is a window of `--snippet_tokens` WordPiece tokens of one of their source files, and its label is the
   package. Files are split into train / validation / test by `text_corpus.split_of` (a hash of the path, with larger
   held-out fractions than the language-model examples so that every class has held-out files), so no file, and no
   snippet, is in two splits. Training snippets are capped per class (`--max_train_snippets_per_class`) to keep the
   classes roughly balanced; the class frequencies of every split are recorded.
2. A BERT **teacher** is trained first, on the labels (plain `Trainer`). A smaller BERT **student** is then trained
   twice, with the same seed, batches and number of optimizer steps: baseline, labels only (alpha = 0); distilled,
   labels + the teacher's soft targets (`DistillationTrainer`; alpha and temperature chosen on the validation files).
3. All three are scored on the test snippets: accuracy, macro accuracy (the mean of the per-class accuracies, since
   the test classes are not balanced) and, for each student against the teacher, the `distillation_fidelity` metric
   (top-1 agreement, KL(teacher ‖ student) at T = 1, accuracy and ECE of both).

    python examples/distill_text_classifier.py                        # defaults: under 10 min on 2 idle CPU cores
    python examples/distill_text_classifier.py --alpha 0.5 --temperature 2   # another KD setting (teacher reused)

Outputs in `--output_dir` (default `outputs/distill_text_classifier`): `tokenizer-wordpiece-*/` and `teacher/`
(reused by later runs with the same settings), `baseline/`, `distilled/`, `results.json`, `results.md`, `results.png`.
The corpus is this interpreter's standard library, so the numbers depend on the Python version.
"""

import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments


if str(Path(__file__).resolve().parent) not in sys.path:  # the shared example modules sit next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import (  # noqa: E402
    Clock,
    fidelity_scores,
    last_logged,
    load_or_train_teacher,
    markdown_table,
    plot_bars_and_curves,
    write_results,
)
from text_corpus import (  # noqa: E402
    SPLITS,
    TextCorpus,
    describe,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    tokenizer_fingerprint,
)


DEFAULT_PACKAGES = "asyncio,distutils,email,http,importlib,tkinter,unittest,xml"


@dataclass
class ExampleArguments:
    """The task, model sizes and the teacher's training; `DistillationTrainingArguments` configure the students."""

    packages: str = field(
        default=DEFAULT_PACKAGES,
        metadata={"help": "Comma-separated top-level packages of the standard library: the classes, in this order."},
    )
    held_out_fraction: float = field(
        default=0.2, metadata={"help": "Share of the files in validation, and again in test (`split_of`)."}
    )
    max_files_per_class: int | None = field(
        default=None, metadata={"help": "Cap on each class's files in each split (default: all of them)."}
    )
    vocab_size: int = field(default=4096, metadata={"help": "WordPiece vocabulary trained on the training files."})
    snippet_tokens: int = field(default=32, metadata={"help": "Tokens per snippet, [CLS] and [SEP] included."})
    max_train_snippets_per_class: int = field(default=1000)
    max_eval_snippets_per_class: int = field(
        default=200, metadata={"help": "Cap per class on validation and test snippets (a fixed sample)."}
    )
    teacher_layers: int = field(default=4)
    teacher_hidden_size: int = field(default=256, metadata={"help": "Teacher width (heads of 64)."})
    student_layers: int = field(default=1)
    student_hidden_size: int = field(default=64, metadata={"help": "Student width (heads of 64)."})
    teacher_steps: int = field(default=600, metadata={"help": "Optimizer steps of the teacher."})
    teacher_learning_rate: float = field(default=5e-4)
    students: str = field(
        default="baseline,distilled",
        metadata={"help": "Which students to train: 'baseline,distilled', or one of them (e.g. to try KD settings)."},
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: all cores)."})
    retrain_teacher: bool = field(default=False, metadata={"help": "Ignore a saved teacher with the same settings."})


def parse_arguments(argv=None) -> tuple[DistillationTrainingArguments, ExampleArguments]:
    parser = HfArgumentParser((DistillationTrainingArguments, ExampleArguments))
    parser.set_defaults(
        output_dir="outputs/distill_text_classifier",
        max_steps=400,
        learning_rate=1e-3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        temperature=1.0,
        alpha=0.9,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=0.2,
        logging_steps=0.1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def package_of(relative_path: str) -> str | None:
    """The top-level package of a standard-library file (`email/mime/text.py` -> `email`); None for modules."""
    return relative_path.split("/")[0] if "/" in relative_path else None


def task_corpus(corpus: TextCorpus, classes, max_files_per_class: int | None) -> TextCorpus:
    """The files of the classes' packages only (each split keeps at most `max_files_per_class` files per class, in
    sorted order), with a fingerprint of its own: the tokenizer is trained on the task's training files."""
    texts, files, digest = {}, {}, hashlib.sha256(corpus.fingerprint.encode())
    for split in SPLITS:
        kept, per_class = [], Counter()
        for relative, text in zip(corpus.files[split], corpus[split]):
            name = package_of(relative)
            if name in classes and (max_files_per_class is None or per_class[name] < max_files_per_class):
                kept.append((relative, text))
                per_class[name] += 1
        missing = [name for name in classes if not per_class[name]]
        if missing:
            raise ValueError(f"No {split} file of {missing}: choose other --packages or another --held_out_fraction.")
        files[split], texts[split] = [relative for relative, _ in kept], [text for _, text in kept]
        digest.update(json.dumps(files[split]).encode())
    info = corpus.info | {
        "num_files": {split: len(files[split]) for split in SPLITS},
        "num_chars": {split: sum(map(len, texts[split])) for split in SPLITS},
        "fingerprint": digest.hexdigest(),
    }
    info["settings"] = info["settings"] | {"classes": list(classes), "max_files_per_class": max_files_per_class}
    return TextCorpus(texts=texts, files=files, info=info)


def make_snippets(corpus, tokenizer, classes, example_args, seed: int) -> dict[str, datasets.Dataset]:
    """Per split, windows of `snippet_tokens` tokens (`[CLS] ... [SEP]`) of the classes' files, labelled by package,
    capped per class by a fixed-seed sample. Each snippet records its file, so tests can check the splits."""
    body = example_args.snippet_tokens - 2
    rng = np.random.default_rng(seed)
    snippets = {}
    for split in SPLITS:
        by_class = {name: [] for name in classes}
        for relative, text in zip(corpus.files[split], corpus[split]):
            name = package_of(relative)
            ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
            by_class[name] += [(ids[i : i + body], relative) for i in range(0, len(ids) - body + 1, body)]
        cap = (
            example_args.max_train_snippets_per_class if split == "train" else example_args.max_eval_snippets_per_class
        )
        rows = {"input_ids": [], "labels": [], "file": []}
        for label, name in enumerate(classes):
            windows = by_class[name]
            if not windows:
                raise ValueError(f"The {split} files of {name!r} are shorter than a snippet: use more files.")
            for index in sorted(rng.permutation(len(windows))[:cap]):
                window, relative = windows[index]
                rows["input_ids"].append([tokenizer.cls_token_id, *window, tokenizer.sep_token_id])
                rows["labels"].append(label)
                rows["file"].append(relative)
        rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
        snippets[split] = datasets.Dataset.from_dict(rows)
    return snippets


def bert_config(tokenizer, example_args, num_layers: int, hidden_size: int, classes) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        intermediate_size=4 * hidden_size,
        max_position_embeddings=example_args.snippet_tokens,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
        # BERT's dropout (0.1) is kept: unlike the language models, the classifiers see each snippet several times.
    )


def compute_metrics(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


def learning_curve(log_history) -> list[tuple[int, float]]:
    return [(entry["step"], entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]


def model_inputs(dataset):
    return dataset.remove_columns(["file"])


def train_teacher(training_args, example_args, data, classes):
    set_seed(training_args.seed)
    config = bert_config(
        data["tokenizer"], example_args, example_args.teacher_layers, example_args.teacher_hidden_size, classes
    )
    args = dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "teacher"),
        max_steps=example_args.teacher_steps,
        learning_rate=example_args.teacher_learning_rate,
        push_to_hub=False,
    )
    trainer = Trainer(
        model=BertForSequenceClassification(config),
        args=args,
        train_dataset=model_inputs(data["train"]),
        eval_dataset=model_inputs(data["validation"]),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    return trainer.model, learning_curve(trainer.state.log_history)


def train_student(name, training_args, example_args, data, classes, teacher) -> DistillationTrainer:
    """The baseline (alpha = 0: the teacher is never run in training) or the distilled student: same size, seed,
    batches and schedule; only the loss differs."""
    set_seed(training_args.seed)
    config = bert_config(
        data["tokenizer"], example_args, example_args.student_layers, example_args.student_hidden_size, classes
    )
    overrides = {"output_dir": str(Path(training_args.output_dir) / name)}
    if name == "baseline":
        overrides["alpha"] = 0.0
    trainer = DistillationTrainer(
        model=BertForSequenceClassification(config),
        teacher_model=teacher,
        args=dataclasses.replace(training_args, **overrides),
        train_dataset=model_inputs(data["train"]),
        eval_dataset=model_inputs(data["validation"]),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.save_model()
    return trainer


@torch.no_grad()
def logits_on(model, dataset, batch_size: int) -> torch.Tensor:
    model.eval()
    input_ids = torch.tensor(dataset["input_ids"])
    return torch.cat(
        [model(input_ids=input_ids[i : i + batch_size]).logits for i in range(0, len(input_ids), batch_size)]
    )


def macro_accuracy(logits, labels, num_classes: int) -> float:
    correct = logits.argmax(-1) == labels
    return float(np.mean([correct[labels == c].float().mean().item() for c in range(num_classes)]))


def student_names(example_args) -> list[str]:
    names = [name.strip() for name in example_args.students.split(",") if name.strip()]
    if not names or set(names) - {"baseline", "distilled"}:
        raise ValueError(f"--students takes 'baseline', 'distilled' or both, got {example_args.students!r}.")
    return names


def main(argv=None) -> dict:
    training_args, example_args = parse_arguments(argv)
    student_names(example_args)  # fail on a bad --students before any work
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(example_args.num_threads or os.cpu_count() or 1)
    clock, output_dir = Clock(), Path(training_args.output_dir)
    classes = [name.strip() for name in example_args.packages.split(",") if name.strip()]

    with clock("data"):  # corpus (split by file), tokenizer (cached), snippets
        fraction = example_args.held_out_fraction
        corpus = load_stdlib_corpus(validation_fraction=fraction, test_fraction=fraction)
        corpus = task_corpus(corpus, classes, example_args.max_files_per_class)
        print(describe(corpus), flush=True)
        tokenizer, _, _ = load_or_train_tokenizer(corpus, output_dir, "wordpiece", example_args.vocab_size)
        data = {"tokenizer": tokenizer} | make_snippets(corpus, tokenizer, classes, example_args, training_args.seed)
        frequencies = {split: dict(Counter(classes[i] for i in data[split]["labels"])) for split in SPLITS}
        files = {split: sorted(set(data[split]["file"])) for split in SPLITS}
        for split in SPLITS:
            print(f"{split}: {len(data[split])} snippets from {len(files[split])} files; {frequencies[split]}")

    teacher_config = bert_config(
        tokenizer, example_args, example_args.teacher_layers, example_args.teacher_hidden_size, classes
    )
    teacher_settings = {
        "config": teacher_config.to_diff_dict(),
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "snippets": {split: len(data[split]) for split in SPLITS},
        **{k: getattr(example_args, k) for k in ("snippet_tokens", "teacher_steps", "teacher_learning_rate")},
        **{k: str(getattr(training_args, k)) for k in ("per_device_train_batch_size", "warmup_steps", "seed")},
        **{k: str(getattr(training_args, k)) for k in ("lr_scheduler_type", "weight_decay", "optim")},
    }
    with clock("teacher"):
        teacher, teacher_curve, teacher_time, reused = load_or_train_teacher(
            output_dir / "teacher",
            teacher_settings,
            AutoModelForSequenceClassification,
            lambda: train_teacher(training_args, example_args, data, classes),
            retrain=example_args.retrain_teacher,
        )
    trainers = {}
    for name in student_names(example_args):
        with clock(name):
            trainers[name] = train_student(name, training_args, example_args, data, classes, teacher)
        print(f"Student {name} trained in {clock.wall_s[name]:.0f} s.", flush=True)

    with clock("test_evaluation"):
        labels = torch.tensor(data["test"]["labels"])
        models = {"teacher": teacher} | {name: trainer.model for name, trainer in trainers.items()}
        logits = {
            name: logits_on(model, data["test"], training_args.per_device_eval_batch_size)
            for name, model in models.items()
        }
        # Each student against the teacher; the teacher's own accuracy and ECE come with the first comparison.
        fidelity = {name: fidelity_scores(logits[name], logits["teacher"], labels) for name in trainers}
        fidelity["teacher"] = next(iter(fidelity.values()))
        rows = []
        for name, model in models.items():
            is_teacher = name == "teacher"
            steps = example_args.teacher_steps if is_teacher else training_args.max_steps
            rows.append(
                {
                    "name": name,
                    "description": {
                        "teacher": "trained on the labels",
                        "baseline": "labels only (alpha=0)",
                        "distilled": f"labels + KD (alpha={training_args.alpha}, T={training_args.temperature})",
                    }[name],
                    "layers": model.config.num_hidden_layers,
                    "hidden_size": model.config.hidden_size,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "test_accuracy": fidelity[name]["teacher_accuracy" if is_teacher else "student_accuracy"],
                    "test_macro_accuracy": macro_accuracy(logits[name], labels, len(classes)),
                    "ece": fidelity[name]["teacher_ece" if is_teacher else "student_ece"],
                    "teacher_agreement": None if is_teacher else fidelity[name]["teacher_agreement"],
                    "kl_teacher_student": None if is_teacher else fidelity[name]["kl_teacher_student"],
                    "learning_curve": teacher_curve
                    if is_teacher
                    else learning_curve(trainers[name].state.log_history),
                    "train_loss_kd": None if is_teacher else last_logged(trainers[name], "loss_kd"),
                    "steps": steps,
                    "train_time_s": teacher_time if is_teacher else clock.wall_s[name],
                    "reused": reused and is_teacher,
                }
            )
    results = {
        "corpus": corpus.info | {"description": describe(corpus)},
        "classes": classes,
        "class_frequencies": frequencies,
        "files": files,
        "settings": dataclasses.asdict(example_args)
        | {k: getattr(training_args, k) for k in ("max_steps", "learning_rate", "temperature", "alpha", "seed")}
        | {"per_device_train_batch_size": training_args.per_device_train_batch_size},
        "teacher_reused": reused,
        "models": rows,
        "num_threads": torch.get_num_threads(),
        "timings_s": clock.wall_s,
        "cpu_time_s": clock.cpu_s,
        "wall_time_s": clock.total(),
    }
    table = results_table(results)
    write_results(results, output_dir, table)
    plot_bars_and_curves(
        output_dir / "results.png",
        f"Which stdlib package? {len(classes)} classes, {len(data['test'])} test snippets of "
        f"{example_args.snippet_tokens} tokens — wall time {results['wall_time_s']:.0f} s",
        [row["name"] for row in rows],
        [
            ("Test accuracy", [row["test_accuracy"] for row in rows], "%.3f"),
            ("KL(teacher ‖ model), T=1", [row["kl_teacher_student"] or 0.0 for row in rows], "%.3f"),
        ],
        [(f"{row['name']} ({row['layers']}×{row['hidden_size']})", *zip(*row["learning_curve"])) for row in rows],
        "validation accuracy",
    )
    print(f"\n{table}\n")
    print(f"Wall time {results['wall_time_s']:.0f} s; per phase {clock.wall_s}; CPU {clock.cpu_s}.")
    print(f"Wrote {output_dir / 'results.json'}, results.md and results.png.")
    return results


def results_table(results: dict) -> str:
    def number(value, fmt):
        return "—" if value is None else format(value, fmt)

    header = ["model", "layers × width", "parameters", "test accuracy", "test macro accuracy", "ECE"]
    header += ["agreement with teacher", "KL(teacher ‖ model)", "train time"]
    rows = [
        [
            f"{row['name']}: {row['description']}",
            f"{row['layers']} × {row['hidden_size']}",
            f"{row['parameters']:,}",
            f"{row['test_accuracy']:.4f}",
            f"{row['test_macro_accuracy']:.4f}",
            f"{row['ece']:.4f}",
            number(row["teacher_agreement"], ".4f"),
            number(row["kl_teacher_student"], ".4f"),
            f"{row['train_time_s']:.0f} s{' (reused)' if row['reused'] else ''}",
        ]
        for row in results["models"]
    ]
    return markdown_table(header, rows)


if __name__ == "__main__":
    main()
