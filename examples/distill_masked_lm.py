# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
The DistilBERT recipe (Sanh et al., 2019) in miniature, on CPU, offline: distil a masked language model into one with
half its layers, and see what each ingredient adds.

1. A small BERT masked-LM **teacher** is trained from scratch on Python's standard-library source code (real text that
   ships with every Python; see `text_corpus.py`), with BERT's dynamic masking (15 % of the tokens, fixed seed).
2. Three **students** with half the teacher's layers, each trained for the same steps on the same masked batches:
   (a) random init, masked-LM labels only (alpha = 0);
   (b) random init, labels + the teacher's soft targets on the masked tokens (alpha, T = 2);
   (c) DistilBERT: initialised from every other teacher layer (`hf_distill.init_student_from_teacher`), labels + soft
       targets + a cosine loss between student and teacher last hidden states (`intermediate_matches="distilbert"`).
3. All four are scored on the held-out test files, masked ONCE with a fixed seed so every model predicts the same
   tokens: masked-token accuracy and cross-entropy. Learning curves use the validation files, masked the same way.

    python examples/distill_masked_lm.py                  # defaults: sized for under 10 min on 2 idle CPU cores
    python examples/distill_masked_lm.py --variants ab    # students (a) and (b) only
    python examples/distill_masked_lm.py --max_steps 1000 --teacher_steps 3000   # longer; any Trainer flag works

Outputs in `--output_dir` (default `outputs/distill_masked_lm`): `tokenizer-*/` and `teacher/` (reused by later runs
with the same settings), `student_a/`, `student_b/`, `student_c/`, `results.json`, `results.png`; a markdown table is
printed. The corpus is this interpreter's standard library, so the numbers depend on the Python version (recorded).
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    default_data_collator,
    set_seed,
)

import hf_distill
from hf_distill import DistillationTrainer, DistillationTrainingArguments


if str(Path(__file__).resolve().parent) not in sys.path:  # the shared example modules sit next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import Clock, load_or_train_teacher, markdown_table, plot_bars_and_curves  # noqa: E402
from text_corpus import (  # noqa: E402
    SPLITS,
    chunk_into_blocks,
    describe,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    tokenizer_fingerprint,
)


VARIANTS = {
    "a": "random init, labels only (alpha=0)",
    "b": "random init, labels + logit KD",
    "c": "init from teacher layers, labels + logit KD + cosine hidden",
}


@dataclass
class ExampleArguments:
    """Corpus, model sizes and the teacher's training; `DistillationTrainingArguments` configure the students."""

    max_corpus_chars: int | None = field(default=None, metadata={"help": "Cap on the corpus (default: all of it)."})
    max_corpus_files: int | None = field(default=None, metadata={"help": "Cap on the number of source files."})
    vocab_size: int = field(default=4096, metadata={"help": "WordPiece vocabulary trained on the training files."})
    block_size: int = field(default=32, metadata={"help": "Tokens per example, [CLS] and [SEP] included."})
    hidden_size: int = field(default=128, metadata={"help": "Width of teacher and students (heads of 64)."})
    teacher_layers: int = field(default=4, metadata={"help": "The students get half of them."})
    teacher_steps: int = field(default=900, metadata={"help": "Optimizer steps of the teacher."})
    teacher_learning_rate: float = field(default=2e-3)
    mlm_probability: float = field(default=0.15)
    max_validation_blocks: int = field(default=512, metadata={"help": "Blocks scored for the learning curves."})
    max_test_blocks: int = field(default=2048, metadata={"help": "Blocks of the test files scored at the end."})
    variants: str = field(default="abc", metadata={"help": "Which students to train, e.g. 'ab'."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: all cores)."})
    retrain_teacher: bool = field(default=False, metadata={"help": "Ignore a saved teacher with the same settings."})


def parse_arguments(argv=None) -> tuple[DistillationTrainingArguments, ExampleArguments]:
    parser = HfArgumentParser((DistillationTrainingArguments, ExampleArguments))
    parser.set_defaults(
        output_dir="outputs/distill_masked_lm",
        max_steps=300,
        learning_rate=1e-3,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=128,
        temperature=2.0,
        alpha=0.5,
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
    training_args, example_args = parser.parse_args_into_dataclasses(args=argv)
    unknown = set(example_args.variants) - set(VARIANTS)
    if unknown or not example_args.variants:
        raise ValueError(f"--variants takes letters among {sorted(VARIANTS)}, got {example_args.variants!r}.")
    return training_args, example_args


class MaskTrainingBatches:
    """BERT's dynamic masking for training batches; batches that already carry `labels` (the evaluation sets, masked
    once) pass through unchanged, so every model is scored on the same masked tokens."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int):
        self.mask = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)

    def __call__(self, examples):
        return default_data_collator(examples) if "labels" in examples[0] else self.mask(examples)


def mask_once(dataset, tokenizer, mlm_probability: float, seed: int):
    """The dataset with `labels` and its `input_ids` masked as in training (80/10/10), by a fixed seed."""
    batch = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)(list(dataset))
    return dataset.from_dict({key: batch[key].tolist() for key in ("input_ids", "attention_mask", "labels")})


def masked_token_outputs(logits, labels):
    """Per token: the prediction and the cross-entropy (0 where unmasked), so `compute_metrics` never sees logits."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    cross_entropy = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return torch.stack([logits.argmax(-1).float(), cross_entropy], dim=-1)


def compute_metrics(prediction) -> dict[str, float]:
    """Masked-token accuracy and cross-entropy (mean over every masked token of the set), the same for all models."""
    outputs, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    masked = labels != -100
    predicted, cross_entropy = outputs[..., 0][masked].long(), outputs[..., 1][masked]
    return {
        "masked_accuracy": (predicted == labels[masked]).float().mean().item(),
        "masked_loss": cross_entropy.mean().item(),
        "masked_tokens": int(masked.sum()),
    }


SCORING = {"compute_metrics": compute_metrics, "preprocess_logits_for_metrics": masked_token_outputs}


def learning_curve(log_history) -> list[tuple[int, float, float]]:
    return [
        (entry["step"], entry["eval_masked_accuracy"], entry["eval_masked_loss"])
        for entry in log_history
        if "eval_masked_accuracy" in entry
    ]


def bert_config(example_args, tokenizer, num_layers: int) -> BertConfig:
    hidden = example_args.hidden_size
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=example_args.block_size,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: every model sees each token at most a few times here, far from overfitting (and 15 % faster).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def train_teacher(training_args, example_args, data):
    """The teacher, trained with plain `Trainer`; returns it and its learning curve."""
    set_seed(training_args.seed)
    teacher = BertForMaskedLM(bert_config(example_args, data["tokenizer"], example_args.teacher_layers))
    args = dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "teacher"),
        max_steps=example_args.teacher_steps,
        learning_rate=example_args.teacher_learning_rate,
        push_to_hub=False,
    )
    trainer = Trainer(
        model=teacher,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=MaskTrainingBatches(data["tokenizer"], example_args.mlm_probability, training_args.seed),
        **SCORING,
    )
    trainer.train()
    return trainer.model, learning_curve(trainer.state.log_history)


def train_student(variant, training_args, example_args, data, teacher) -> DistillationTrainer:
    """Student (a), (b) or (c): same size, data, masking, seed and schedule; only init and losses differ."""
    set_seed(training_args.seed)
    num_layers = example_args.teacher_layers // 2
    overrides = {"output_dir": str(Path(training_args.output_dir) / f"student_{variant}")}
    if variant == "a":
        overrides["alpha"] = 0.0  # the labels alone; the teacher only reports agreement in evaluation
    overrides["intermediate_matches"] = "distilbert" if variant == "c" else None
    if variant == "c":
        student = hf_distill.init_student_from_teacher(teacher, num_layers=num_layers)
        student.requires_grad_(True)  # the trainers of (a) and (b) froze the teacher; its copied weights must train
    else:
        student = BertForMaskedLM(bert_config(example_args, data["tokenizer"], num_layers))
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=dataclasses.replace(training_args, **overrides),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=MaskTrainingBatches(data["tokenizer"], example_args.mlm_probability, training_args.seed),
        **SCORING,
    )
    trainer.train()
    trainer.save_model()
    return trainer


def results_table(results: dict) -> str:
    header = ["model", "layers", "parameters", "test masked-token accuracy", "test masked-token loss"]
    header += ["agreement with teacher", "train time"]
    rows = [
        [
            f"{row['name']}: {row['description']}",
            row["layers"],
            f"{row['parameters']:,}",
            f"{row['test_masked_accuracy']:.4f}",
            f"{row['test_masked_loss']:.4f}",
            "—" if row["agreement_with_teacher"] is None else f"{row['agreement_with_teacher']:.4f}",
            f"{row['train_time_s']:.0f} s{' (reused)' if row.get('reused') else ''}",
        ]
        for row in results["models"]
    ]
    return markdown_table(header, rows)


def plot_results(results: dict, path: Path) -> None:
    """Test accuracy and loss per model (bars), and validation accuracy during training (curves)."""
    rows = results["models"]
    tokens = f"({results['test_masked_tokens']:,} tokens)"
    title = f"DistilBERT recipe in miniature — {results['corpus']['description']}"
    plot_bars_and_curves(
        path,
        f"{title} — wall time {results['wall_time_s']:.0f} s",
        [row["name"] for row in rows],
        [
            (f"Test masked-token accuracy {tokens}", [row["test_masked_accuracy"] for row in rows], "%.3f"),
            (f"Test masked-token loss {tokens}", [row["test_masked_loss"] for row in rows], "%.3f"),
        ],
        [
            (
                f"{row['name']} ({row['layers']} layers)",
                [s for s, _, _ in row["learning_curve"]],
                [a for _, a, _ in row["learning_curve"]],
            )
            for row in rows
        ],
        "validation masked-token accuracy",
    )


def main(argv=None) -> dict:
    training_args, example_args = parse_arguments(argv)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(example_args.num_threads or os.cpu_count() or 1)
    clock, output_dir = Clock(), Path(training_args.output_dir)

    with clock("data"):  # corpus, tokenizer (cached), blocks; the held-out sets masked once
        corpus = load_stdlib_corpus(max_files=example_args.max_corpus_files, max_chars=example_args.max_corpus_chars)
        print(describe(corpus), flush=True)
        tokenizer, _, _ = load_or_train_tokenizer(corpus, output_dir, "wordpiece", example_args.vocab_size)
        data = {
            "tokenizer": tokenizer,
            "train": chunk_into_blocks(tokenizer, corpus["train"], example_args.block_size),
        }
        for split, seed in (("validation", 1), ("test", 2)):
            max_blocks = getattr(example_args, f"max_{split}_blocks")
            blocks = chunk_into_blocks(tokenizer, corpus[split], example_args.block_size, max_blocks)
            data[split] = mask_once(blocks, tokenizer, example_args.mlm_probability, seed)
        print(
            f"Blocks of {example_args.block_size} tokens: " + ", ".join(f"{s} {len(data[s])}" for s in corpus.keys())
        )

    teacher_settings = {
        "config": bert_config(example_args, tokenizer, example_args.teacher_layers).to_diff_dict(),
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{k: getattr(example_args, k) for k in ("block_size", "mlm_probability", "teacher_steps")},
        "learning_rate": example_args.teacher_learning_rate,
        **{k: str(getattr(training_args, k)) for k in ("per_device_train_batch_size", "warmup_steps", "seed")},
        **{k: str(getattr(training_args, k)) for k in ("lr_scheduler_type", "weight_decay", "optim")},
    }
    with clock("teacher"):
        # Reuses `<output_dir>/teacher` if it was saved with the same settings.
        teacher, teacher_curve, teacher_time, reused = load_or_train_teacher(
            output_dir / "teacher",
            teacher_settings,
            AutoModelForMaskedLM,
            lambda: train_teacher(training_args, example_args, data),
            retrain=example_args.retrain_teacher,
        )
    trainers = {}
    for variant in example_args.variants:
        with clock(f"student_{variant}"):
            trainers[variant] = train_student(variant, training_args, example_args, data, teacher)
        print(f"Student ({variant}) trained in {clock.wall_s[f'student_{variant}']:.0f} s.", flush=True)

    # Final scores on the test blocks: the same metric on the same masked tokens for every model.
    with clock("test_evaluation"):
        teacher_args = dataclasses.replace(training_args, output_dir=str(output_dir / "teacher"))
        scorers = {"teacher": Trainer(model=teacher, args=teacher_args, eval_dataset=data["test"], **SCORING)}
        scorers |= {f"({variant})": trainer for variant, trainer in trainers.items()}
        rows = []
        for name, trainer in scorers.items():
            scores = trainer.evaluate(data["test"], metric_key_prefix="test")
            is_teacher = name == "teacher"
            steps = example_args.teacher_steps if is_teacher else training_args.max_steps
            train_time = teacher_time if is_teacher else clock.wall_s[f"student_{name[1]}"]
            rows.append(
                {
                    "name": name,
                    "description": f"{steps} steps" if is_teacher else VARIANTS[name[1]],
                    "layers": trainer.model.config.num_hidden_layers,
                    "parameters": sum(p.numel() for p in trainer.model.parameters()),
                    "test_masked_accuracy": scores["test_masked_accuracy"],
                    "test_masked_loss": scores["test_masked_loss"],
                    "agreement_with_teacher": scores.get("test_teacher_agreement"),
                    "learning_curve": teacher_curve if is_teacher else learning_curve(trainer.state.log_history),
                    "steps": steps,
                    "train_time_s": train_time,
                    "seconds_per_step": round(train_time / steps, 3),
                    "reused": reused and is_teacher,
                }
            )
    results = {
        "corpus": corpus.info | {"description": describe(corpus)},
        "blocks": {split: len(data[split]) for split in SPLITS},
        "test_masked_tokens": sum(label != -100 for row in data["test"]["labels"] for label in row),
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
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, output_dir / "results.png")
    print(f"\n{results_table(results)}\n")
    print(f"Wall time {results['wall_time_s']:.0f} s; per phase {clock.wall_s}; CPU {clock.cpu_s}.")
    print(f"Wrote {output_dir / 'results.json'} and {output_dir / 'results.png'}.")
    return results


if __name__ == "__main__":
    main()
