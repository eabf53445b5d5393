"""What distillation costs per step beyond the student's own training.

1. cached ratio = step time of KD from cached teacher logits / step time of plain `Trainer` (same student, data,
   batch): the price of the KD term alone, the teacher never runs. Target ≤ 1.05 (MNIST), ≤ 1.10 (causal LMs).
2. online ratio = step time of online KD / (plain `Trainer` step time + teacher forward time on the same batch):
   anything above 1 is overhead beyond the teacher's own forward. Target ≤ 1.05.

For the paper's MNIST MLPs (teacher 2×1200, student 2×800, batch 128) and a small causal LM pair (GPT-2 configs,
vocabulary 8,192, sequence 128, batch 8; cached in float16, full logits). Runs alternate (plain, cached, online,
plain, ...) for `--rounds` rounds; each figure is the median over rounds of the mean step time of `--steps` steps after
`--warmup` steps, measured between `on_step_end` callbacks (so data loading and collation are included). Teacher forward
time is measured on the same batches under `torch.no_grad`.

    python benchmarks/bench_teacher_overhead.py          # prints a table, writes benchmarks/results/teacher_overhead.json
    python benchmarks/bench_teacher_overhead.py --pairs gpt2_realistic --results_name teacher_overhead_realistic
    python benchmarks/bench_teacher_overhead.py --pairs gpt2,gpt2_realistic --breakdown_only --results_name teacher_overhead_breakdown

`--breakdown` (or `--breakdown_only`, which skips the step timings) also times, for the causal-LM pairs, what a KD step
adds to the loss itself, outside the trainer: on random hidden states of the pair's shape (``N = 8 × 127`` counted
positions), forward + backward, alternating, median of 7 after 2 warm-ups, of (a) the student head + label
cross-entropy, which the plain step computes too; (b) the teacher head alone (in the teacher's forward); (c) the fused
KD + label loss the trainer runs (alpha 0.5, T 2, forward KL) from the online teacher's hidden states, and (d) from a
float16 cache, and (e) reading one batch of such a cache through `datasets` (an ``Array2D`` float16 column of
``[127, V]`` rows, as `precompute_teacher_logits` writes it, torch format, then concatenated as the trainer's collator
does). (c) − (a) − (b) and (d) − (a) are the KD term's own cost in each mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    MLPConfig,
    MLPForImageClassification,
    precompute_teacher_logits,
)
from hf_distill.fused import fused_linear_distillation_loss


RESULTS_DIR = Path(__file__).parent / "results"
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"


class StepClock(TrainerCallback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def mean_step_seconds(trainer_factory, warmup: int) -> float:
    clock = StepClock()
    trainer = trainer_factory()
    trainer.add_callback(clock)
    trainer.train()
    stamps = clock.stamps[warmup:]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def teacher_forward_seconds(teacher, dataset, batch_size: int, steps: int, warmup: int) -> float:
    rows = dataset.remove_columns([c for c in dataset.column_names if c == "labels"])
    batches = [
        default_data_collator([rows[i] for i in range(b * batch_size, (b + 1) * batch_size)])
        for b in range(warmup + steps)
    ]
    times = []
    with torch.no_grad():
        for batch in batches:
            start = time.perf_counter()
            teacher(**batch)
            times.append(time.perf_counter() - start)
    return statistics.mean(times[warmup:])


def mnist_pair():
    torch.manual_seed(0)
    teacher = MLPForImageClassification(MLPConfig(hidden_sizes=[1200, 1200], input_dropout=0.2, hidden_dropout=0.5))
    student = MLPForImageClassification(MLPConfig(hidden_sizes=[800, 800]))
    if (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the example's data loader
        from mnist_data import load_mnist_idx

        images, labels = load_mnist_idx(MNIST_DIR)["train"]
        images, labels = images[:8192].float().div(255).unsqueeze(1), labels[:8192]
    else:
        images, labels = torch.rand(8192, 1, 28, 28), torch.randint(0, 10, (8192,))
    dataset = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels.numpy()})
    return teacher, student, dataset, 128


def gpt2_pair(vocab_size: int, teacher_shape: tuple[int, int], student_shape: tuple[int, int], rows: int):
    """GPT-2 teacher and student of (layers, width), heads of 64 wide, on `rows` random sequences of 128 tokens."""
    torch.manual_seed(0)
    config = dict(vocab_size=vocab_size, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (teacher_layers, teacher_width), (student_layers, student_width) = teacher_shape, student_shape
    teacher = GPT2LMHeadModel(
        GPT2Config(n_embd=teacher_width, n_layer=teacher_layers, n_head=teacher_width // 64, **config)
    )
    student = GPT2LMHeadModel(
        GPT2Config(n_embd=student_width, n_layer=student_layers, n_head=student_width // 64, **config)
    )
    ids = torch.randint(0, vocab_size, (rows, 128), generator=torch.Generator().manual_seed(0))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "labels": ids.numpy()})
    return teacher, student, dataset, 8


def causal_lm_pair():
    return gpt2_pair(8192, (4, 256), (2, 128), rows=512)


def realistic_causal_lm_pair():
    # 280 rows: the 5 + 30 steps of batch 8 a default run takes (a float16 cache of 128 × 32000 logits is 8 MB per row).
    return gpt2_pair(32000, (8, 512), (4, 512), rows=280)


def measure(name, pair, rounds: int, steps: int, warmup: int) -> dict:
    teacher, student, dataset, batch_size = pair()
    initial_student = {k: v.clone() for k, v in student.state_dict().items()}
    cached = precompute_teacher_logits(teacher, dataset, batch_size=batch_size, dtype="float16").with_format("torch")
    dataset = dataset.with_format("torch")

    with tempfile.TemporaryDirectory() as scratch:
        common = dict(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            max_steps=warmup + steps,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )

        def fresh_student():
            student.load_state_dict(initial_student)
            return student

        def plain():
            return Trainer(model=fresh_student(), args=TrainingArguments(**common), train_dataset=dataset)

        def distill(teacher_model, train_dataset):
            args = DistillationTrainingArguments(**common, temperature=2.0, alpha=0.5)
            return lambda: DistillationTrainer(
                model=fresh_student(), teacher_model=teacher_model, args=args, train_dataset=train_dataset
            )

        times = {"plain": [], "cached": [], "online": [], "teacher_forward": []}
        for _ in range(rounds):  # alternating, so drift on a shared machine hits every variant alike
            times["plain"].append(mean_step_seconds(plain, warmup))
            times["cached"].append(mean_step_seconds(distill(None, cached), warmup))
            times["online"].append(mean_step_seconds(distill(teacher, dataset), warmup))
            times["teacher_forward"].append(teacher_forward_seconds(teacher, dataset, batch_size, steps, warmup))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "name": name,
        "batch_size": batch_size,
        "median_step_seconds": median,
        "all_step_seconds": times,
        "cached_ratio": median["cached"] / median["plain"],
        "online_ratio": median["online"] / (median["plain"] + median["teacher_forward"]),
    }


def loss_breakdown(name, pair, repeats: int = 7, warmup: int = 2) -> dict:
    """Forward + backward times (ms) of the loss pieces of one KD step at the pair's shape (see the module docstring)."""
    teacher, student, _, batch_size = pair()
    if not isinstance(student, GPT2LMHeadModel):
        return {}
    generator = torch.Generator().manual_seed(0)
    rows = batch_size * 127
    weight = student.lm_head.weight.detach().clone().requires_grad_()
    teacher_weight = teacher.lm_head.weight.detach()
    hidden = torch.randn(rows, weight.shape[1], generator=generator).requires_grad_()
    teacher_hidden = torch.randn(rows, teacher_weight.shape[1], generator=generator)
    labels = torch.randint(0, weight.shape[0], (rows,), generator=generator)
    cache = (teacher_hidden @ teacher_weight.t()).half()
    settings = dict(labels=labels, kd_weight=0.5, ce_weight=0.5, temperature=2.0)

    def student_head():
        F.cross_entropy(hidden @ weight.t(), labels).backward()

    def teacher_head():
        with torch.no_grad():
            teacher_hidden @ teacher_weight.t()

    def fused_online():
        fused_linear_distillation_loss(
            hidden, weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, **settings
        ).loss.backward()

    def fused_cached():
        fused_linear_distillation_loss(hidden, weight, teacher_logits=cache, **settings).loss.backward()

    vocab = weight.shape[0]
    stored = datasets.Dataset.from_dict(
        {"teacher_logits": [cache[i * 127 : (i + 1) * 127].numpy() for i in range(batch_size)]},
        features=datasets.Features({"teacher_logits": datasets.Array2D((None, vocab), "float16")}),
    ).with_format("torch")

    def cache_read():
        torch.cat([row["teacher_logits"] for row in stored.__getitems__(list(range(batch_size)))])

    pieces = {"student_head_ce": student_head, "teacher_head": teacher_head}
    pieces.update(fused_online=fused_online, fused_cached=fused_cached, cache_read=cache_read)
    times = {key: [] for key in pieces}
    for index in range(warmup + repeats):  # alternating, so drift hits every piece alike
        for key, piece in pieces.items():
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            piece()
            if index >= warmup:
                times[key].append(1e3 * (time.perf_counter() - start))
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "name": name,
        "rows": rows,
        "median_ms": median,
        "kd_cost_online_ms": median["fused_online"] - median["student_head_ce"] - median["teacher_head"],
        "kd_cost_cached_ms": median["fused_cached"] - median["student_head_ce"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--results_name", default="teacher_overhead", help="results/<name>.json")
    parser.add_argument(
        "--pairs", default="mnist,gpt2", help="Comma-separated: mnist, gpt2 (4x256 -> 2x128, V=8192), gpt2_realistic."
    )
    parser.add_argument("--breakdown", action="store_true", help="also time the loss pieces (see the docstring)")
    parser.add_argument("--breakdown_only", action="store_true", help="only the loss pieces, no step timings")
    options = parser.parse_args()
    pairs = {
        "mnist": ("MNIST MLP 2x1200 -> 2x800", mnist_pair),
        "gpt2": ("GPT-2 4L/256 -> 2L/128, V=8192", causal_lm_pair),
        "gpt2_realistic": ("GPT-2 8L/512 -> 4L/512, V=32000", realistic_causal_lm_pair),
    }
    keys = options.pairs.split(",")
    breakdown = []
    if options.breakdown or options.breakdown_only:
        breakdown = [piece for piece in (loss_breakdown(*pairs[key]) for key in keys) if piece]
        print(
            "| pair | (a) student head + CE | (b) teacher head | (c) fused, online | (d) fused, cached | "
            "(e) cache read | KD cost online (c − a − b) | KD cost cached (d − a) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for piece in breakdown:
            m = piece["median_ms"]
            print(
                f"| {piece['name']} | {m['student_head_ce']:.1f} | {m['teacher_head']:.1f} | {m['fused_online']:.1f} | "
                f"{m['fused_cached']:.1f} | {m['cache_read']:.1f} | {piece['kd_cost_online_ms']:.1f} | "
                f"{piece['kd_cost_cached_ms']:.1f} |"
            )
    results = (
        []
        if options.breakdown_only
        else [measure(*pairs[key], options.rounds, options.steps, options.warmup) for key in keys]
    )
    if results:
        print(
            "| pair | plain step (ms) | cached KD step (ms) | online KD step (ms) | teacher fwd (ms) | "
            "cached / plain | online / (plain + teacher fwd) |"
        )
        print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_step_seconds"]
        print(
            f"| {r['name']} | {1e3 * m['plain']:.1f} | {1e3 * m['cached']:.1f} | {1e3 * m['online']:.1f} | "
            f"{1e3 * m['teacher_forward']:.1f} | {r['cached_ratio']:.3f} | {r['online_ratio']:.3f} |"
        )
    results_file = RESULTS_DIR / f"{options.results_name}.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    results_file.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
                "options": vars(options),
                "results": results,
                "breakdown": breakdown,
            },
            indent=2,
        )
    )
    print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
