# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
Distil a GPT-2 language model into a smaller one, on CPU, offline, and measure what the teacher's soft targets add.

1. A byte-level BPE tokenizer and a GPT-2 **teacher** are trained from scratch on Python's standard-library source
   code (real text that ships with every Python; see `text_corpus.py`), on blocks of the training files.
2. A smaller GPT-2 **student** is trained twice, with the same seed, batches and number of optimizer steps:
   baseline, next-token labels only (alpha = 0); distilled, labels + the teacher's soft targets at every token
   (`DistillationTrainer`, alpha and temperature chosen on the validation files).
3. All three are scored on the held-out test files: perplexity (exp of the mean next-token cross-entropy over every
   predicted token), and, for each student against the teacher, the `distillation_fidelity` metric (top-1
   agreement, KL(teacher ‖ student) at T = 1, accuracy and ECE of both) on a fixed sample of test positions.

    python examples/distill_causal_lm.py                       # defaults: sized for under 10 min on 2 idle CPU cores
    python examples/distill_causal_lm.py --students distilled --alpha 0.5 --temperature 2   # another KD setting
    python examples/distill_causal_lm.py --max_steps 1000 --teacher_steps 3000   # longer; any Trainer flag works

Outputs in `--output_dir` (default `outputs/distill_causal_lm`): `tokenizer-bpe-*/` and `teacher/` (reused by later
runs with the same settings), `baseline/`, `distilled/`, `results.json`, `results.md`, `results.png`; the markdown
table is printed. The corpus is this interpreter's standard library, so the numbers depend on the Python version.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
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
    chunk_into_blocks,
    describe,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    tokenizer_fingerprint,
)


@dataclass
class ExampleArguments:
    """Corpus, model sizes and the teacher's training; `DistillationTrainingArguments` configure the students."""

    max_corpus_files: int | None = field(default=None, metadata={"help": "Cap on the number of source files."})
    max_corpus_chars: int | None = field(default=None, metadata={"help": "Cap on the corpus (default: all of it)."})
    vocab_size: int = field(default=4096, metadata={"help": "Byte-level BPE vocabulary trained on the train files."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training / scoring block."})
    teacher_layers: int = field(default=4)
    teacher_hidden_size: int = field(default=256, metadata={"help": "Teacher width (heads of 64)."})
    student_layers: int = field(default=2)
    student_hidden_size: int = field(default=128, metadata={"help": "Student width (heads of 64)."})
    teacher_steps: int = field(default=400, metadata={"help": "Optimizer steps of the teacher."})
    teacher_learning_rate: float = field(default=2e-3)
    max_validation_blocks: int = field(default=256, metadata={"help": "Validation blocks for the learning curves."})
    max_test_blocks: int = field(default=1024, metadata={"help": "Blocks of the test files scored at the end."})
    fidelity_positions: int = field(
        default=1024, metadata={"help": "Test positions (fixed sample) on which the fidelity metric is computed."}
    )
    students: str = field(
        default="baseline,distilled",
        metadata={"help": "Which students to train: 'baseline,distilled', or one of them (e.g. to try KD settings)."},
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: all cores)."})
    retrain_teacher: bool = field(default=False, metadata={"help": "Ignore a saved teacher with the same settings."})


def parse_arguments(argv=None) -> tuple[DistillationTrainingArguments, ExampleArguments]:
    parser = HfArgumentParser((DistillationTrainingArguments, ExampleArguments))
    parser.set_defaults(
        output_dir="outputs/distill_causal_lm",
        max_steps=300,
        learning_rate=2e-3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        # Chosen on the validation files against the saved teacher (examples/README.md): at T = 1 the soft targets are
        # the teacher's own next-token distribution, the quantity perplexity scores.
        temperature=1.0,
        alpha=0.9,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="steps",
        eval_steps=0.25,
        logging_steps=0.1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def gpt2_config(tokenizer, block_size: int, num_layers: int, hidden_size: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=block_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=max(1, hidden_size // 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout: no model sees a token more than about once here, far from overfitting.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def with_labels(blocks):
    """A causal LM's labels are its inputs (the model shifts them); every block is full, so nothing is ignored."""
    return blocks.map(lambda batch: {"labels": batch["input_ids"]}, batched=True)


def next_token_losses(logits, labels):
    """Per predicted token, the cross-entropy (the logit at t predicts token t + 1), so metrics never see logits."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")


def compute_metrics(prediction) -> dict[str, float]:
    """The mean next-token cross-entropy of the set (labels only, the same for every model and any alpha)."""
    loss = torch.as_tensor(prediction.predictions).mean().item()
    return {"lm_loss": loss, "perplexity": math.exp(loss)}


SCORING = {"compute_metrics": compute_metrics, "preprocess_logits_for_metrics": next_token_losses}


def learning_curve(log_history) -> list[tuple[int, float]]:
    return [(entry["step"], entry["eval_perplexity"]) for entry in log_history if "eval_perplexity" in entry]


def train_teacher(training_args, example_args, data):
    set_seed(training_args.seed)
    config = gpt2_config(
        data["tokenizer"], example_args.block_size, example_args.teacher_layers, example_args.teacher_hidden_size
    )
    args = dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "teacher"),
        max_steps=example_args.teacher_steps,
        learning_rate=example_args.teacher_learning_rate,
        push_to_hub=False,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        **SCORING,
    )
    trainer.train()
    return trainer.model, learning_curve(trainer.state.log_history)


def train_student(name, training_args, example_args, data, teacher) -> DistillationTrainer:
    """The baseline (alpha = 0: the teacher is never run in training) or the distilled student: same size, seed,
    batches and schedule; only the loss differs."""
    set_seed(training_args.seed)
    config = gpt2_config(
        data["tokenizer"], example_args.block_size, example_args.student_layers, example_args.student_hidden_size
    )
    overrides = {"output_dir": str(Path(training_args.output_dir) / name)}
    if name == "baseline":
        overrides["alpha"] = 0.0
    trainer = DistillationTrainer(
        model=GPT2LMHeadModel(config),
        teacher_model=teacher,
        args=dataclasses.replace(training_args, **overrides),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        **SCORING,
    )
    trainer.train()
    trainer.save_model()
    return trainer


@torch.no_grad()
def score_on_test(model, blocks, sampled_positions, batch_size: int):
    """Mean next-token cross-entropy over every predicted test token, and the logits at the sampled positions
    (flat indices into the [blocks, block_size - 1] predicted tokens) for the fidelity metric."""
    model.eval()
    input_ids = torch.tensor(blocks["input_ids"])
    total_loss, count, sampled_logits = 0.0, 0, []
    predicted_per_block = input_ids.shape[1] - 1
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        total_loss, count = total_loss + losses.sum().item(), count + losses.numel()
        offset = start * predicted_per_block
        here = sampled_positions[(sampled_positions >= offset) & (sampled_positions < offset + losses.numel())]
        sampled_logits.append(logits.reshape(-1, logits.shape[-1])[here - offset])
    return total_loss / count, torch.cat(sampled_logits)


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

    with clock("data"):  # corpus, tokenizer (cached), blocks
        corpus = load_stdlib_corpus(max_files=example_args.max_corpus_files, max_chars=example_args.max_corpus_chars)
        print(describe(corpus), flush=True)
        tokenizer, _, _ = load_or_train_tokenizer(corpus, output_dir, "bpe", example_args.vocab_size)
        data = {"tokenizer": tokenizer}
        for split in SPLITS:
            max_blocks = None if split == "train" else getattr(example_args, f"max_{split}_blocks")
            data[split] = with_labels(chunk_into_blocks(tokenizer, corpus[split], example_args.block_size, max_blocks))
        print(f"Blocks of {example_args.block_size} tokens: " + ", ".join(f"{s} {len(data[s])}" for s in SPLITS))

    teacher_config = gpt2_config(
        tokenizer, example_args.block_size, example_args.teacher_layers, example_args.teacher_hidden_size
    )
    teacher_settings = {
        "config": teacher_config.to_diff_dict(),
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        **{k: getattr(example_args, k) for k in ("block_size", "teacher_steps", "teacher_learning_rate")},
        **{k: str(getattr(training_args, k)) for k in ("per_device_train_batch_size", "warmup_steps", "seed")},
        **{k: str(getattr(training_args, k)) for k in ("lr_scheduler_type", "weight_decay", "optim")},
    }
    with clock("teacher"):
        teacher, teacher_curve, teacher_time, reused = load_or_train_teacher(
            output_dir / "teacher",
            teacher_settings,
            AutoModelForCausalLM,
            lambda: train_teacher(training_args, example_args, data),
            retrain=example_args.retrain_teacher,
        )
    trainers = {}
    for name in student_names(example_args):
        with clock(name):
            trainers[name] = train_student(name, training_args, example_args, data, teacher)
        print(f"Student {name} trained in {clock.wall_s[name]:.0f} s.", flush=True)

    # Final scores on the test blocks: every predicted token for perplexity, a fixed sample for fidelity.
    with clock("test_evaluation"):
        num_predicted = len(data["test"]) * (example_args.block_size - 1)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(num_predicted, generator=generator)[: example_args.fidelity_positions].sort().values
        references = torch.tensor(data["test"]["input_ids"])[:, 1:].reshape(-1)[sample]
        batch_size = training_args.per_device_eval_batch_size
        models = {"teacher": teacher} | {name: trainer.model for name, trainer in trainers.items()}
        scored = {name: score_on_test(model, data["test"], sample, batch_size) for name, model in models.items()}
        # Each student against the teacher; the teacher's own accuracy and ECE come with the first comparison.
        fidelity = {name: fidelity_scores(scored[name][1], scored["teacher"][1], references) for name in trainers}
        fidelity["teacher"] = next(iter(fidelity.values()))
        rows = []
        for name, model in models.items():
            loss = scored[name][0]
            is_teacher = name == "teacher"
            steps = example_args.teacher_steps if is_teacher else training_args.max_steps
            train_time = teacher_time if is_teacher else clock.wall_s[name]
            rows.append(
                {
                    "name": name,
                    "description": {
                        "teacher": "trained on the labels",
                        "baseline": "labels only (alpha=0)",
                        "distilled": f"labels + KD (alpha={training_args.alpha}, T={training_args.temperature})",
                    }[name],
                    "layers": model.config.n_layer,
                    "hidden_size": model.config.n_embd,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "test_loss": loss,
                    "test_perplexity": math.exp(loss),
                    "test_accuracy": fidelity[name]["teacher_accuracy" if is_teacher else "student_accuracy"],
                    "ece": fidelity[name]["teacher_ece" if is_teacher else "student_ece"],
                    "teacher_agreement": None if is_teacher else fidelity[name]["teacher_agreement"],
                    "kl_teacher_student": None if is_teacher else fidelity[name]["kl_teacher_student"],
                    "learning_curve": teacher_curve
                    if is_teacher
                    else learning_curve(trainers[name].state.log_history),
                    "train_loss_kd": None if is_teacher else last_logged(trainers[name], "loss_kd"),
                    "steps": steps,
                    "train_time_s": train_time,
                    "reused": reused and is_teacher,
                }
            )
    results = {
        "corpus": corpus.info | {"description": describe(corpus)},
        "blocks": {split: len(data[split]) for split in SPLITS},
        "files": corpus.files,
        "test_tokens_predicted": num_predicted,
        "fidelity_positions": len(sample),
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
        f"GPT-2 distillation on {describe(corpus).split(':')[0]} — wall time {results['wall_time_s']:.0f} s",
        [row["name"] for row in rows],
        [
            (f"Test perplexity ({num_predicted:,} tokens)", [row["test_perplexity"] for row in rows], "%.1f"),
            (
                f"KL(teacher ‖ model), T=1 ({len(sample):,} test positions)",
                [row["kl_teacher_student"] or 0.0 for row in rows],
                "%.3f",
            ),
        ],
        [(f"{row['name']} ({row['layers']}×{row['hidden_size']})", *zip(*row["learning_curve"])) for row in rows],
        "validation perplexity",
    )
    print(f"\n{table}\n")
    print(f"Wall time {results['wall_time_s']:.0f} s; per phase {clock.wall_s}; CPU {clock.cpu_s}.")
    print(f"Wrote {output_dir / 'results.json'}, results.md and results.png.")
    return results


def results_table(results: dict) -> str:
    def number(value, fmt):
        return "—" if value is None else format(value, fmt)

    header = ["model", "layers × width", "parameters", "test perplexity", "test next-token accuracy", "ECE"]
    header += ["agreement with teacher", "KL(teacher ‖ model)", "train time"]
    rows = [
        [
            f"{row['name']}: {row['description']}",
            f"{row['layers']} × {row['hidden_size']}",
            f"{row['parameters']:,}",
            f"{row['test_perplexity']:.2f}",
            f"{row['test_accuracy']:.4f}",
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
