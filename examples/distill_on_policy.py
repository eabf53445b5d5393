# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
On-policy distillation (GKD, Agarwal et al. 2024) in miniature, on CPU, offline: does a student trained on its own
samples generate what the teacher would, better than one trained on the dataset's completions?

1. A small GPT-2 **teacher** is trained from scratch on Python's standard-library source code (`text_corpus.py`:
   real text shipped with every Python), on blocks of ``prompt_length + completion_length`` byte-level BPE tokens.
2. Two **students** (half the teacher's layers, identical initial weights, the same seed, steps, batch and lr) are
   distilled from it on the same rows: a prompt (the first P tokens of a block, labels -100) and a completion (the
   next C tokens):
   (a) **off-policy**: forward KL(teacher ‖ student) on the dataset's completions (``lmbda=0``), classic token-level KD;
   (b) **on-policy**: reverse KL(student ‖ teacher) on completions the student samples itself (``lmbda=1``,
       ``max_new_tokens=C``), GKD's on-policy setting.
3. Scored on held-out prompts (the test files; the validation files were used to choose the settings): each model
   samples C tokens per prompt (temperature 1, fixed seed) and the **teacher's per-token NLL of those samples** is
   measured (lower = the student writes what the teacher finds likely). References: the teacher's NLL of its own
   samples, of the untrained student's samples, and of the real completions. Also each model's perplexity on the test
   blocks (teacher-forced, the off-policy objective's home ground).

    python examples/distill_on_policy.py                     # defaults: ~10 min on 2 idle CPU cores, teacher included
    python examples/distill_on_policy.py --max_steps 400     # longer students; any Trainer flag works

Outputs in `--output_dir` (default `outputs/distill_on_policy`): `tokenizer-*/` and `teacher/` (reused by later runs
with the same settings; `--retrain_teacher` ignores it), `student_off_policy/`, `student_on_policy/`, `results.json`,
`results.png`; a markdown table is printed.
"""

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    default_data_collator,
    set_seed,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments


if str(Path(__file__).resolve().parent) not in sys.path:  # the shared example modules sit next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import Clock, markdown_table  # noqa: E402
from text_corpus import (  # noqa: E402
    SPLITS,
    chunk_into_blocks,
    describe,
    load_or_train_tokenizer,
    load_stdlib_corpus,
    tokenizer_fingerprint,
)


FIELDS = {f.name for f in dataclasses.fields(DistillationTrainingArguments)}
STUDENTS = {
    "off_policy": "forward KL on dataset completions (lmbda=0)",
    "on_policy": "reverse KL on its own samples (lmbda=1)",
}


@dataclass
class ExampleArguments:
    """Corpus, model sizes, the teacher's training and the evaluation; `DistillationTrainingArguments` configure the
    students."""

    max_corpus_chars: int | None = field(default=None, metadata={"help": "Cap on the corpus (default: all of it)."})
    max_corpus_files: int | None = field(default=None, metadata={"help": "Cap on the number of source files."})
    vocab_size: int = field(default=4096, metadata={"help": "Byte-level BPE vocabulary trained on the train files."})
    prompt_length: int = field(default=32, metadata={"help": "P: prompt tokens per row (labels -100)."})
    completion_length: int = field(default=32, metadata={"help": "C: completion tokens per row = max_new_tokens."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the teacher and students (heads of 32)."})
    teacher_layers: int = field(default=4, metadata={"help": "The students get half of them."})
    teacher_steps: int = field(default=800, metadata={"help": "Optimizer steps of the teacher."})
    teacher_learning_rate: float = field(default=2e-3)
    teacher_batch_size: int = field(default=32)
    max_train_blocks: int | None = field(default=None, metadata={"help": "Cap on the training rows."})
    eval_prompts: int = field(default=256, metadata={"help": "Held-out prompts sampled from per split."})
    max_eval_blocks: int = field(default=1024, metadata={"help": "Held-out blocks for perplexity, per split."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (training and scoring)."})
    students: str = field(default="off_policy,on_policy", metadata={"help": "Comma-separated students to train."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: all cores)."})
    student_init_steps: int = field(
        default=200,
        metadata={
            "help": "Plain LM steps (teacher_learning_rate) that give both students their common starting point; 0: "
            "random weights."
        },
    )
    retrain_teacher: bool = field(
        default=False, metadata={"help": "Ignore a saved teacher (and initial student) with the same settings."}
    )


def parse_arguments(argv=None) -> tuple[DistillationTrainingArguments, ExampleArguments]:
    parser = HfArgumentParser((DistillationTrainingArguments, ExampleArguments))
    parser.set_defaults(
        output_dir="outputs/distill_on_policy",
        max_steps=200,
        learning_rate=1e-3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        temperature=1.0,
        alpha=1.0,
        lr_scheduler_type="linear",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    training_args, example_args = parser.parse_args_into_dataclasses(args=argv)
    unknown = set(example_args.students.split(",")) - set(STUDENTS)
    if unknown:
        raise ValueError(f"--students takes names among {sorted(STUDENTS)}, got {example_args.students!r}.")
    return training_args, example_args


def gpt2_config(example_args, tokenizer, num_layers: int) -> GPT2Config:
    hidden = example_args.hidden_size
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=example_args.prompt_length + example_args.completion_length,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=max(1, hidden // 32),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def prompt_completion_rows(blocks, prompt_length: int):
    """Each block as a prompt (labels -100) and a completion (labels = its tokens)."""

    def add_labels(row):
        return {"labels": [-100] * prompt_length + row["input_ids"][prompt_length:]}

    return blocks.map(add_labels)


def train_or_load_lm(name, num_layers, steps, learning_rate, training_args, example_args, data, settings):
    """A GPT-2 with `num_layers` trained from scratch with plain `Trainer` (causal-LM loss on whole blocks, AdamW,
    cosine), saved in `<output_dir>/<name>`, or the one saved there with the same settings. Returns the model (eval
    mode), its training time and whether it was reused."""
    directory = Path(training_args.output_dir) / name
    settings_file = directory / "lm_settings.json"
    if not example_args.retrain_teacher and settings_file.exists():
        saved = json.loads(settings_file.read_text())
        if saved["settings"] == settings:
            print(f"Reusing the {name} in {directory} (same settings).", flush=True)
            return AutoModelForCausalLM.from_pretrained(directory).eval(), saved["train_time_s"], True
    set_seed(training_args.seed)
    model = GPT2LMHeadModel(gpt2_config(example_args, data["tokenizer"], num_layers))
    args = transformers.TrainingArguments(
        output_dir=str(directory),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=example_args.teacher_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=training_args.seed,
        use_cpu=training_args.use_cpu,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
    )
    blocks = data["train_blocks"].map(lambda row: {"labels": row["input_ids"]})
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    start = time.time()
    trainer.train()
    train_time = round(time.time() - start, 1)
    trainer.save_model()
    settings_file.write_text(json.dumps({"settings": settings, "train_time_s": train_time}, indent=2))
    return model.eval(), train_time, False


def student_overrides(name: str, example_args) -> dict:
    if name == "off_policy":  # lmbda=0 (the default): the dataset's completions, never generation
        return {"distillation_loss": "kl"} | ({"lmbda": 0.0} if "lmbda" in FIELDS else {})
    return {
        "distillation_loss": "reverse_kl",
        "lmbda": 1.0,
        "max_new_tokens": example_args.completion_length,
        "generation_kwargs": {
            "do_sample": True,
            "temperature": example_args.sample_temperature,
            "top_k": 0,
            "top_p": 1.0,
        },
    }


def student_layers(example_args) -> int:
    return max(1, example_args.teacher_layers // 2)


def new_student(example_args, tokenizer, seed: int) -> GPT2LMHeadModel:
    set_seed(seed)
    return GPT2LMHeadModel(gpt2_config(example_args, tokenizer, student_layers(example_args)))


def train_student(name, training_args, example_args, data, teacher, initial_student) -> DistillationTrainer:
    student = copy.deepcopy(initial_student).train()  # both students start from the same weights
    student.requires_grad_(True)
    overrides = student_overrides(name, example_args)
    overrides["output_dir"] = str(Path(training_args.output_dir) / f"student_{name}")
    set_seed(training_args.seed)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=dataclasses.replace(training_args, **overrides),
        train_dataset=data["train"],
        data_collator=default_data_collator,
    )
    trainer.train()
    trainer.save_model()
    return trainer


@torch.no_grad()
def sample_completions(model, prompts: torch.Tensor, example_args, seed: int, batch_size: int) -> torch.Tensor:
    """C sampled tokens per prompt (temperature `sample_temperature`, no top-k/top-p), pad after an EOS."""
    model.eval()
    torch.manual_seed(seed)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generated = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            do_sample=True,
            temperature=example_args.sample_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=example_args.completion_length,
            pad_token_id=model.config.pad_token_id,
            eos_token_id=model.config.eos_token_id,
        )[:, batch.shape[1] :]
        if generated.shape[1] < example_args.completion_length:  # every row stopped early
            pad = example_args.completion_length - generated.shape[1]
            generated = F.pad(generated, (0, pad), value=model.config.pad_token_id)
        outputs.append(generated)
    return torch.cat(outputs)


def completion_mask(completions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS (what was generated), 0 after it."""
    is_eos = (completions == eos_token_id).int()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


@torch.no_grad()
def teacher_nll(teacher, prompts, completions, mask, batch_size: int) -> float:
    """The teacher's mean per-token negative log-likelihood of `completions` given `prompts` (nats)."""
    total, count = 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        p, c, m = (t[start : start + batch_size] for t in (prompts, completions, mask))
        logits = teacher(input_ids=torch.cat([p, c], 1)).logits[:, p.shape[1] - 1 : -1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), c, reduction="none")
        total += (nll * m).sum().item()
        count += m.sum().item()
    return total / count


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every position of the held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def distinct_fraction(samples: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean over samples of (distinct tokens / tokens), counting each sample's tokens up to its EOS."""
    fractions = [len(set(row[m.bool()].tolist())) / max(int(m.sum()), 1) for row, m in zip(samples, mask)]
    return sum(fractions) / len(fractions)


def score(models: dict, teacher, tokenizer, data, example_args, batch_size: int, seed: int) -> dict:
    """Per split (validation, test): each model's samples scored by the teacher, and each model's perplexity."""
    scores = {}
    for split in ("validation", "test"):
        blocks = torch.tensor(data[f"{split}_blocks"]["input_ids"])
        prompts = blocks[: example_args.eval_prompts, : example_args.prompt_length]
        real = blocks[: example_args.eval_prompts, example_args.prompt_length :]
        eos = teacher.config.eos_token_id
        full = torch.ones_like(real, dtype=torch.float)
        split_scores = {
            "real completions": {
                "teacher_nll_of_samples": teacher_nll(teacher, prompts, real, full, batch_size),
                "distinct_token_fraction": distinct_fraction(real, full),
            }
        }
        for name, model in models.items():
            samples = sample_completions(model, prompts, example_args, seed, batch_size)
            mask = completion_mask(samples, eos)
            split_scores[name] = {
                "teacher_nll_of_samples": teacher_nll(teacher, prompts, samples, mask, batch_size),
                "sampled_tokens": int(mask.sum()),
                # Mode collapse check: the mean fraction of distinct tokens in a sample (repetition lowers it).
                "distinct_token_fraction": distinct_fraction(samples, mask),
                "perplexity": perplexity(model, blocks[: example_args.max_eval_blocks], batch_size),
            }
            if split == "test":
                split_scores[name]["examples"] = [
                    {
                        "prompt": tokenizer.decode(prompts[i]),
                        "completion": tokenizer.decode(samples[i][mask[i].bool()]),
                    }
                    for i in range(min(3, len(prompts)))
                ]
        scores[split] = split_scores
    return scores


def results_table(results: dict) -> str:
    header = ["model", "layers", "teacher NLL of the model's samples, test (nats/token)", "same, validation"]
    header += ["distinct tokens per sample, test", "test perplexity", "train time"]
    rows = []
    for row in results["models"]:
        test, validation = results["scores"]["test"][row["name"]], results["scores"]["validation"][row["name"]]
        time_s = "—" if row.get("train_time_s") is None else f"{row['train_time_s']:.0f} s"
        rows.append(
            [
                f"{row['name']}: {row['description']}",
                row.get("layers", "—"),
                f"{test['teacher_nll_of_samples']:.3f}",
                f"{validation['teacher_nll_of_samples']:.3f}",
                f"{test['distinct_token_fraction']:.2f}",
                f"{test['perplexity']:.2f}" if "perplexity" in test else "—",
                time_s + (" (reused)" if row.get("reused") else ""),
            ]
        )
    return markdown_table(header, rows)


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    names = [row["name"] for row in rows]
    test = results["scores"]["test"]
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    bars = axes[0].bar(names, [test[n]["teacher_nll_of_samples"] for n in names], color="#4c72b0")
    axes[0].bar_label(bars, fmt="%.2f", padding=2)
    axes[0].set_title("Teacher's NLL of each model's samples, test (lower: closer)")
    axes[0].tick_params(axis="x", rotation=20)
    with_ppl = [n for n in names if "perplexity" in test[n]]
    bars = axes[1].bar(with_ppl, [test[n]["perplexity"] for n in with_ppl], color="#dd8452")
    axes[1].bar_label(bars, fmt="%.1f", padding=2)
    axes[1].set_title("Perplexity on test blocks (teacher-forced)")
    axes[1].set_yscale("log")
    axes[1].tick_params(axis="x", rotation=20)
    for row in rows:
        curve = row.get("loss_curve")
        if curve:
            steps, losses = zip(*curve)
            axes[2].plot(steps, losses, marker=".", label=row["name"])
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("training KD loss (its own divergence)")
    axes[2].set_title("Student training losses")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    figure.suptitle(
        f"On-policy vs off-policy distillation — {results['corpus']['description']} — wall {results['wall_time_s']:.0f} s",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> dict:
    training_args, example_args = parse_arguments(argv)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(example_args.num_threads or os.cpu_count() or 1)
    clock, output_dir = Clock(), Path(training_args.output_dir)
    block = example_args.prompt_length + example_args.completion_length
    batch_size = training_args.per_device_eval_batch_size

    with clock("data"):
        corpus = load_stdlib_corpus(max_files=example_args.max_corpus_files, max_chars=example_args.max_corpus_chars)
        print(describe(corpus), flush=True)
        tokenizer, _, _ = load_or_train_tokenizer(corpus, output_dir, "bpe", example_args.vocab_size)
        data = {"tokenizer": tokenizer}
        data["train_blocks"] = chunk_into_blocks(tokenizer, corpus["train"], block, example_args.max_train_blocks)
        data["train"] = prompt_completion_rows(data["train_blocks"], example_args.prompt_length)
        for split in ("validation", "test"):
            blocks = chunk_into_blocks(tokenizer, corpus[split], block)
            # A fixed pseudo-random sample of the held-out blocks (not the first files' alone).
            data[f"{split}_blocks"] = blocks.shuffle(seed=len(split)).select(
                range(min(len(blocks), max(example_args.max_eval_blocks, example_args.eval_prompts)))
            )
        print(f"Blocks of {block} tokens: " + ", ".join(f"{s} {len(data[f'{s}_blocks'])}" for s in SPLITS), flush=True)

    teacher_settings = {
        "config": gpt2_config(example_args, tokenizer, example_args.teacher_layers).to_diff_dict(),
        "corpus": corpus.fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_train_blocks": example_args.max_train_blocks,
        "steps": example_args.teacher_steps,
        "learning_rate": example_args.teacher_learning_rate,
        "batch_size": example_args.teacher_batch_size,
        "seed": training_args.seed,
    }
    with clock("teacher"):
        teacher, teacher_time, reused = train_or_load_lm(
            "teacher",
            example_args.teacher_layers,
            example_args.teacher_steps,
            example_args.teacher_learning_rate,
            training_args,
            example_args,
            data,
            json.loads(json.dumps(teacher_settings)),
        )
    teacher.requires_grad_(False)
    # The students' common starting point: random weights, or (as in the GKD paper, whose students are supervised
    # fine-tuned first) a student trained with the plain LM loss for `student_init_steps`.
    initial_student, init_time, init_reused = new_student(example_args, tokenizer, training_args.seed), 0.0, False
    if example_args.student_init_steps > 0:
        init_settings = teacher_settings | {
            "config": gpt2_config(example_args, tokenizer, student_layers(example_args)).to_diff_dict(),
            "steps": example_args.student_init_steps,
        }
        with clock("initial_student"):
            initial_student, init_time, init_reused = train_or_load_lm(
                "student_init",
                student_layers(example_args),
                example_args.student_init_steps,
                example_args.teacher_learning_rate,
                training_args,
                example_args,
                data,
                json.loads(json.dumps(init_settings)),
            )

    trainers = {}
    for name in example_args.students.split(","):
        with clock(f"student_{name}"):
            trainers[name] = train_student(name, training_args, example_args, data, teacher, initial_student)
        print(f"Student ({name}) trained in {clock.wall_s[f'student_{name}']:.0f} s.", flush=True)

    with clock("evaluation"):
        models = {"teacher": teacher, "untrained student": new_student(example_args, tokenizer, training_args.seed)}
        if example_args.student_init_steps > 0:
            models["initial student"] = initial_student
        models |= {name: trainer.model for name, trainer in trainers.items()}
        scores = score(models, teacher, tokenizer, data, example_args, batch_size, seed=training_args.seed + 1)

    rows = [
        {
            "name": "teacher",
            "description": f"{example_args.teacher_steps} steps on the blocks",
            "layers": teacher.config.n_layer,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "train_time_s": teacher_time,
            "reused": reused,
        },
        {
            "name": "untrained student",
            "description": "random weights" + ("" if example_args.student_init_steps else ", the students' start"),
            "layers": models["untrained student"].config.n_layer,
        },
    ]
    if example_args.student_init_steps > 0:
        rows.append(
            {
                "name": "initial student",
                "description": f"{example_args.student_init_steps} LM steps, the students' start",
                "layers": initial_student.config.n_layer,
                "train_time_s": init_time,
                "reused": init_reused,
            }
        )
    for name, trainer in trainers.items():
        logs = trainer.state.log_history
        on_policy_logs = [e for e in logs if "on_policy_fraction" in e]
        rows.append(
            {
                "name": name,
                "description": STUDENTS[name],
                "layers": trainer.model.config.n_layer,
                "parameters": sum(p.numel() for p in trainer.model.parameters()),
                "train_time_s": clock.wall_s[f"student_{name}"],
                "steps": trainer.state.global_step,
                "loss_curve": [
                    (e["step"], e["loss_kd"] if "loss_kd" in e else e["loss"]) for e in logs if "loss" in e
                ],
                "on_policy_fraction": (
                    sum(e["on_policy_fraction"] for e in on_policy_logs) / len(on_policy_logs)
                    if on_policy_logs
                    else 0.0
                ),
                "generated_tokens": sum(e.get("generated_tokens", 0) for e in logs),
                "training_settings": {k: v for k, v in student_overrides(name, example_args).items()},
            }
        )
    rows.append({"name": "real completions", "description": "the test files' own next C tokens"})
    test = scores["test"]
    verdict = None
    if {"off_policy", "on_policy"} <= set(trainers):
        gap = test["off_policy"]["teacher_nll_of_samples"] - test["on_policy"]["teacher_nll_of_samples"]
        verdict = {
            "on_policy_wins_teacher_nll": gap > 0,
            "teacher_nll_gap_off_minus_on": gap,
            "perplexity_off_policy": test["off_policy"]["perplexity"],
            "perplexity_on_policy": test["on_policy"]["perplexity"],
        }
    results = {
        "corpus": corpus.info | {"description": describe(corpus)},
        "blocks": {split: len(data[f"{split}_blocks"]) for split in SPLITS},
        "settings": dataclasses.asdict(example_args)
        | {k: getattr(training_args, k) for k in ("max_steps", "learning_rate", "temperature", "alpha", "seed")}
        | {"per_device_train_batch_size": training_args.per_device_train_batch_size},
        "selection": "settings chosen on the validation prompts; test reported once",
        "teacher_reused": reused,
        "models": rows,
        "scores": scores,
        "verdict": verdict,
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
