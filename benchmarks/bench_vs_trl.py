"""hf-distill's `DistillationTrainer` against TRL's `GKDTrainer` on the same off-policy token-level KD run.

Both trainers distil the same tiny GPT-2 teacher into the same (identically initialised) GPT-2 student, on the same
random token ids (fixed seed, a quarter of the rows right-padded with label -100), with the same batch, sequence length,
optimizer, learning rate and number of steps, in float32 without activation checkpointing, using forward
KL(teacher ‖ student) at T = 1:

* TRL: ``trl.experimental.gkd.GKDTrainer`` with ``GKDConfig(lmbda=0, seq_kd=False, beta=0, temperature=1)`` — no
  on-policy generation, ``beta=0`` is ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``, i.e.
  KL(teacher ‖ student) per token, with no T² factor (irrelevant at T = 1);
* hf-distill: ``DistillationTrainer`` with ``distillation_loss="kl", alpha=1, temperature=1``.

Normalisation: TRL 1.16's `GKDTrainer.generalized_jsd_loss` sums the per-token KL over the positions with
``labels[:, 1:] != -100`` and divides by ``num_items_in_batch`` (or, without it, by ``mask.sum()``: its "batchmean" is
per token, not per sequence). ``num_items_in_batch`` is Trainer's label count, which counts ``labels[:, 1:]`` only when
the model's ``loss_type`` maps to ``ForCausalLMLoss``; for `GPT2LMHeadModel` it does not (its ``loss_type`` is unset
when Trainer checks), so GKD divides by the *unshifted* count ``(labels != -100).sum()`` — one more position per row
than it sums over. hf-distill divides by the shifted count. The script records both counts per step and compares
``gkd_loss · unshifted_count / shifted_count`` with hf-distill's loss (the mean KL per counted token).

Speed, load-robust: both trainers in one process, alternating optimizer step by optimizer step on the same batches
(``--interleaved_steps``; see `interleaved_steps`), median of the per-step time ratios. Memory and whole `train()` runs:
each trainer run is a fresh subprocess (runs alternate: TRL, hf-distill, hf-distill, TRL, … for ``--rounds``), so peak
RSS (``ru_maxrss``) is per run and neither inherits the other's allocator state. Time per step is measured from
`on_step_begin` to `on_step_end` (forward, backward, optimizer step), median over the steps after ``--warmup_steps``,
then median over rounds. On a shared machine wall time swings with other jobs (a run here took 1.1 s/step and the next
3.1 s/step on the same code), so the process's CPU time per step (all threads, `time.process_time`) is reported too: it
counts the work done rather than the time waited for a core. The per-step losses are recorded in `compute_loss` (before Trainer rounds them for logging).

TRL is a benchmark-only dependency: ``pip install -e .[bench]``. Writes ``benchmarks/results/vs_trl.json``
(``--results_name``).

    python benchmarks/bench_vs_trl.py
    python benchmarks/bench_vs_trl.py --profile hf_distill   # top ops of a few steps under torch.profiler
    python benchmarks/bench_vs_trl.py --vocab_size 32000 --rounds 1 --interleaved_steps 12 --skip_breakdown \
        --results_name vs_trl_v32000                         # logits large enough for the trainer to chunk the KD
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRAINERS = ("trl", "hf_distill")


@dataclasses.dataclass
class Setup:
    vocab_size: int = 8192
    sequence_length: int = 128
    batch_size: int = 8
    steps: int = 10
    warmup_steps: int = 2
    learning_rate: float = 1e-3
    teacher_layers: int = 4
    teacher_width: int = 256
    student_layers: int = 2
    student_width: int = 128
    seed: int = 0


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tiny_gpt2(vocab_size: int, n_positions: int, layers: int, width: int, seed: int):
    """A config-built GPT-2 (4 heads, no dropout) with weights drawn under `torch.manual_seed(seed)`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def build_models_and_data(setup: Setup):
    import datasets
    import torch

    teacher = tiny_gpt2(
        setup.vocab_size, setup.sequence_length, setup.teacher_layers, setup.teacher_width, setup.seed + 1
    )
    teacher.eval()
    student = tiny_gpt2(
        setup.vocab_size, setup.sequence_length, setup.student_layers, setup.student_width, setup.seed + 2
    )

    num_rows = setup.batch_size * setup.steps
    generator = torch.Generator().manual_seed(setup.seed)
    input_ids = torch.randint(1, setup.vocab_size, (num_rows, setup.sequence_length), generator=generator)
    lengths = torch.full((num_rows,), setup.sequence_length)
    padded = torch.rand(num_rows, generator=generator) < 0.25
    lengths[padded] = torch.randint(
        setup.sequence_length // 2, setup.sequence_length, (int(padded.sum()),), generator=generator
    )
    attention_mask = (torch.arange(setup.sequence_length)[None, :] < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )
    return teacher, student, dataset


def word_level_tokenizer(vocab_size: int):
    """An in-memory tokenizer: `GKDTrainer` (an `SFTTrainer`) needs a `processing_class` with a pad token.

    Token i is the word ``t{i}`` (``t0`` pad/unk, ``t1`` eos); texts are split on whitespace, so
    ``" ".join(f"t{i}" for i in ids)`` encodes to ``ids`` (TRL's on-policy `DistillationTrainer` takes text prompts).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1")


def build_trainer(name: str, setup: Setup, teacher, student, dataset, output_dir: str, callbacks):
    from transformers import default_data_collator

    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch_size,
        max_steps=setup.steps,
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=setup.seed,
        data_seed=setup.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
        # TRL's SFTConfig (GKDConfig's base) defaults to bf16=True and activation (gradient) checkpointing; both runs
        # are float32 without checkpointing, hf-distill's (Trainer's) defaults. With TRL's defaults GKD took ~19 s/step
        # here against ~5 s: bf16 autocast on a CPU without native bf16 matmuls, and a recomputed student forward.
        bf16=False,
        activation_checkpointing=False,
    )

    if name == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class RecordingGKDTrainer(GKDTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                # To the mean per counted (shifted) position; see the module docstring.
                divisor = num_items_in_batch if num_items_in_batch is not None else inputs["labels"].ne(-100).sum()
                shifted_count = inputs["labels"][:, 1:].ne(-100).sum()
                self.recorded_losses.append((loss[0] if return_outputs else loss).item())
                self.per_token_losses.append(self.recorded_losses[-1] * float(divisor) / float(shifted_count))
                return loss

        args = GKDConfig(
            **common, lmbda=0.0, seq_kd=False, beta=0.0, temperature=1.0, max_length=setup.sequence_length
        )
        trainer = RecordingGKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            data_collator=default_data_collator,
            processing_class=word_level_tokenizer(setup.vocab_size),
            callbacks=callbacks,
        )
    else:
        from hf_distill import DistillationTrainer, DistillationTrainingArguments

        class RecordingDistillationTrainer(DistillationTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                self.recorded_losses.append((loss[0] if return_outputs else loss).item())
                self.per_token_losses.append(self.recorded_losses[-1])  # already the mean per counted position
                return loss

        args = DistillationTrainingArguments(**common, distillation_loss="kl", alpha=1.0, temperature=1.0)
        trainer = RecordingDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            data_collator=default_data_collator,
            callbacks=callbacks,
        )
    trainer.recorded_losses, trainer.per_token_losses = [], []
    return trainer


def run_one(name: str, setup: Setup, profile: bool = False) -> dict:
    """One training run of trainer `name`, in this (fresh) process."""
    import torch
    from transformers import TrainerCallback

    rss_start = max_rss_bytes()
    teacher, student, dataset = build_models_and_data(setup)

    class StepTimer(TrainerCallback):
        """Wall time and this process's CPU time (all threads) of each optimizer step."""

        def __init__(self):
            self.seconds, self.cpu_seconds = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(name, setup, teacher, student, dataset, output_dir, [timer])
        rss_before_train = max_rss_bytes()
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                trainer.train()
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
        else:
            trainer.train()
    step_seconds = timer.seconds[setup.warmup_steps :]
    return {
        "trainer": name,
        "median_step_seconds": statistics.median(step_seconds),
        "step_seconds": timer.seconds,
        "median_step_cpu_seconds": statistics.median(timer.cpu_seconds[setup.warmup_steps :]),
        "step_cpu_seconds": timer.cpu_seconds,
        "peak_rss_bytes": max_rss_bytes(),
        "train_peak_rss_delta_bytes": max_rss_bytes() - rss_before_train,
        "rss_before_train_bytes": rss_before_train,
        "rss_at_start_bytes": rss_start,
        # Set once `DistillationTrainer` can use `chunked_distillation_loss` (a `kd_chunk_size` argument).
        "kd_chunk_size": getattr(trainer.args, "kd_chunk_size", None) if name == "hf_distill" else None,
        "reported_losses": trainer.recorded_losses,
        "per_token_losses": trainer.per_token_losses,
    }


def interleaved_steps(setup: Setup) -> dict:
    """Both trainers in one process, stepping alternately on the same batches: the load-robust speed comparison.

    Other jobs on a shared machine change the speed of the whole machine from one minute to the next, which separate
    runs cannot cancel. Here each optimizer step of one trainer is followed by the same step of the other (who goes
    first alternates), so both see the same load, and the per-step ratio is taken. A step is what `Trainer.train` runs
    per optimizer step, called directly: its own `get_batch_samples` count, `training_step` (forward, loss, backward),
    gradient clipping, `optimizer.step`, `lr_scheduler.step`, `zero_grad`; the loop around it is the same for both.
    """
    import copy

    import torch
    from transformers import default_data_collator

    teacher, student, dataset = build_models_and_data(setup)
    trainers = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in TRAINERS:
            trainers[name] = build_trainer(
                name,
                setup,
                copy.deepcopy(teacher),
                copy.deepcopy(student),
                dataset,
                os.path.join(output_dir, name),
                [],
            )
            trainers[name].create_optimizer_and_scheduler(num_training_steps=setup.steps)
    batches = [
        default_data_collator([dataset[row] for row in range(step * setup.batch_size, (step + 1) * setup.batch_size)])
        for step in range(setup.steps)
    ]

    def optimizer_step(trainer, batch) -> float:
        start = time.perf_counter()
        batch_samples, num_items_in_batch = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
        trainer.training_step(trainer.model, batch_samples[0], num_items_in_batch)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    seconds = {name: [] for name in TRAINERS}
    for step, batch in enumerate(batches):
        for name in TRAINERS if step % 2 == 0 else TRAINERS[::-1]:
            seconds[name].append(optimizer_step(trainers[name], batch))
    counted = slice(setup.warmup_steps, None)
    ratios = [trl / ours for trl, ours in zip(seconds["trl"][counted], seconds["hf_distill"][counted])]
    return {
        "step_seconds": seconds,
        "median_step_seconds": {name: statistics.median(values[counted]) for name, values in seconds.items()},
        "speedup_per_step": ratios,
        "median_speedup": statistics.median(ratios),
        "per_token_losses": {name: trainer.per_token_losses for name, trainer in trainers.items()},
    }


def time_loss_components(setup: Setup, repeats: int = 9) -> dict[str, dict[str, float]]:
    """Median and minimum seconds of each piece of the KD path at this run's logits shape, interleaved, in this process.

    On a shared machine the minimum is the better estimate of a piece's own cost; the median shows the spread.

    The pieces a `compute_loss` runs on top of the two models' forwards: the KD loss forward + backward as TRL, as
    hf-distill now (naive) and chunked, and hf-distill's extras per training step (the student's own label loss, which
    GPT-2 computes whenever it is given ``labels``, even at ``alpha=1``; the argmax agreement count; the teacher's
    NaN/inf check), plus a teacher forward with and without the KV cache GPT-2 builds by default.
    """
    import torch
    import torch.nn.functional as F
    from trl.experimental.gkd import GKDTrainer

    from hf_distill import losses
    from hf_distill.chunked import chunked_distillation_loss

    teacher, student, dataset = build_models_and_data(setup)
    batch = {key: torch.tensor(dataset[: setup.batch_size][key]) for key in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_leaf = student_logits.detach().requires_grad_()
    shifted_labels = batch["labels"][:, 1:]
    mask = shifted_labels.ne(-100)
    count = mask.sum()

    def trl_kd():
        student_leaf.grad = None
        GKDTrainer.generalized_jsd_loss(
            student_leaf[:, :-1], teacher_logits[:, :-1], labels=shifted_labels, beta=0.0, num_items_in_batch=count
        ).backward()

    def hf_distill_naive_kd():
        student_leaf.grad = None
        per_position = losses.distillation_divergence(student_leaf[:, :-1], teacher_logits[:, :-1], temperature=1.0)
        (losses.masked_sum(per_position, mask) / count).backward()

    def hf_distill_chunked_kd():
        student_leaf.grad = None
        loss = chunked_distillation_loss(student_leaf[:, :-1], teacher_logits[:, :-1], mask, temperature=1.0)
        (loss / count).backward()

    def student_label_loss():  # what GPT2LMHeadModel adds when `labels` reach it (forward only: unused at alpha=1)
        with torch.no_grad():
            F.cross_entropy(student_logits.detach()[:, :-1].float().flatten(0, 1), shifted_labels.flatten())

    def agreement_and_finite_check():
        (student_leaf.detach()[:, :-1].argmax(-1).eq(teacher_logits[:, :-1].argmax(-1)) & mask).sum()
        torch.isfinite(teacher_logits[:, :-1]).all()

    def teacher_forward(use_cache):
        def forward():
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=use_cache)

        return forward

    pieces = {
        "KD loss fwd+bwd, TRL generalized_jsd_loss(beta=0)": trl_kd,
        "KD loss fwd+bwd, hf-distill naive (now)": hf_distill_naive_kd,
        "KD loss fwd+bwd, hf-distill chunked_distillation_loss": hf_distill_chunked_kd,
        "hf-distill extra: student's own label loss at alpha=1": student_label_loss,
        "hf-distill extra: agreement argmax + teacher isfinite": agreement_and_finite_check,
        "teacher forward, use_cache=True (default)": teacher_forward(True),
        "teacher forward, use_cache=False": teacher_forward(False),
    }
    seconds = {name: [] for name in pieces}
    for piece in pieces.values():
        piece()  # warm-up
    for _ in range(repeats):
        for name, piece in pieces.items():
            start = time.perf_counter()
            piece()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(values), "min": min(values)} for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one run per trainer, order alternating")
    parser.add_argument(
        "--interleaved_steps",
        type=int,
        default=24,
        help="steps of the one-process, step-alternating speed comparison (0 to skip)",
    )
    for field in dataclasses.fields(Setup):
        parser.add_argument(
            f"--{field.name}", type=field.type if callable(field.type) else eval(field.type), default=field.default
        )
    parser.add_argument("--child", choices=(*TRAINERS, "breakdown", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=TRAINERS, help="profile one run of this trainer instead")
    parser.add_argument("--skip_breakdown", action="store_true", help="skip timing the KD path's pieces")
    parser.add_argument("--results_name", default="vs_trl", help="writes benchmarks/results/<results_name>.json")
    args = parser.parse_args()
    setup = Setup(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Setup)})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    if args.child == "interleaved":
        print(json.dumps(interleaved_steps(setup)))
        return
    if args.child == "breakdown":
        print(json.dumps(time_loss_components(setup)))
        return
    if args.child or args.profile:
        print(json.dumps(run_one(args.child or args.profile, setup, profile=bool(args.profile))))
        return

    setup_flags = [f"--{field.name}={getattr(setup, field.name)}" for field in dataclasses.fields(Setup)]
    runs = []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        order = TRAINERS if round_index % 2 == 0 else TRAINERS[::-1]
        for name in order:
            completed = subprocess.run(
                [sys.executable, __file__, "--child", name, *setup_flags], capture_output=True, text=True
            )
            if completed.returncode != 0:
                sys.exit(f"{name} run failed:\n{completed.stderr[-5000:]}")
            runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(f"round {round_index}: {name} {runs[-1]['median_step_seconds']:.3f} s/step", file=sys.stderr)
    interleaved = {}
    if args.interleaved_steps:
        interleaved_flags = [flag for flag in setup_flags if not flag.startswith("--steps=")]
        completed = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "interleaved",
                *interleaved_flags,
                f"--steps={args.interleaved_steps}",
            ],
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            sys.exit(f"interleaved run failed:\n{completed.stderr[-5000:]}")
        interleaved = json.loads(completed.stdout.strip().splitlines()[-1])
    total_seconds = time.perf_counter() - started

    summary = {}
    for name in TRAINERS:
        mine = [run for run in runs if run["trainer"] == name]
        summary[name] = {
            "median_step_seconds": statistics.median(run["median_step_seconds"] for run in mine),
            "min_step_seconds": min(run["median_step_seconds"] for run in mine),
            "median_step_cpu_seconds": statistics.median(run["median_step_cpu_seconds"] for run in mine),
            "peak_rss_bytes": statistics.median(run["peak_rss_bytes"] for run in mine),
            "train_peak_rss_delta_bytes": statistics.median(run["train_peak_rss_delta_bytes"] for run in mine),
            "reported_losses": mine[0]["reported_losses"],
            "per_token_losses": mine[0]["per_token_losses"],
        }
    trl_losses, ours_losses = summary["trl"]["per_token_losses"], summary["hf_distill"]["per_token_losses"]
    relative_differences = [abs(a - b) / abs(a) for a, b in zip(trl_losses, ours_losses)]
    reported_first_step_difference = abs(summary["trl"]["reported_losses"][0] - ours_losses[0]) / ours_losses[0]
    speedup = summary["trl"]["median_step_seconds"] / summary["hf_distill"]["median_step_seconds"]
    cpu_speedup = summary["trl"]["median_step_cpu_seconds"] / summary["hf_distill"]["median_step_cpu_seconds"]
    memory_ratio = summary["hf_distill"]["peak_rss_bytes"] / summary["trl"]["peak_rss_bytes"]

    mib = 2**20
    tokens = setup.batch_size * (setup.sequence_length - 1)
    lines = [
        f"GPT-2 teacher {setup.teacher_layers}×{setup.teacher_width} → student {setup.student_layers}×"
        f"{setup.student_width}, V = {setup.vocab_size}, batch {setup.batch_size} × {setup.sequence_length} tokens "
        f"(≤ {tokens} counted per step), {setup.steps} steps (median over steps {setup.warmup_steps + 1}–"
        f"{setup.steps}), "
        f"forward KL, T = 1, float32, CPU; {args.rounds} alternating rounds, medians over rounds; whole run "
        f"{total_seconds:.0f} s.",
        "",
        "| trainer | time / step (s), median | fastest run | CPU time / step (s) | peak RSS (MiB) | RSS growth in train()"
        " (MiB) | step-1 loss as reported | step-1 loss per counted token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("trl", "TRL GKDTrainer (lmbda=0, beta=0)"), ("hf_distill", "hf-distill DistillationTrainer")):
        row = summary[name]
        lines.append(
            f"| {label} | {row['median_step_seconds']:.3f} | {row['min_step_seconds']:.3f} | "
            f"{row['median_step_cpu_seconds']:.3f} | {row['peak_rss_bytes'] / mib:.0f} | "
            f"{row['train_peak_rss_delta_bytes'] / mib:.0f} | {row['reported_losses'][0]:.7f} | "
            f"{row['per_token_losses'][0]:.7f} |"
        )
    lines += [
        "",
        f"Separate runs: hf-distill speed-up over TRL {speedup:.2f}× in wall time, {cpu_speedup:.2f}× in CPU time; "
        f"peak RSS hf-distill / TRL: {memory_ratio:.3f}.",
        f"Losses on the same normalisation (mean KL per counted token): step 1 (identical weights and batch) relative "
        f"difference {relative_differences[0]:.1e}; max over all {len(relative_differences)} steps "
        f"{max(relative_differences):.1e} (GKD's gradients carry its per-row-larger divisor, so later steps drift "
        f"slightly). As reported, step 1 differs by {reported_first_step_difference:.1e} (GKD's unshifted count).",
    ]
    if interleaved:
        step_times = interleaved["median_step_seconds"]
        lines += [
            "",
            f"**Interleaved in one process** ({args.interleaved_steps} steps alternating between the trainers on the "
            f"same batches, first {setup.warmup_steps} not counted): median step TRL {step_times['trl']:.3f} s, "
            f"hf-distill {step_times['hf_distill']:.3f} s; median per-step speed-up of hf-distill over TRL "
            f"**{interleaved['median_speedup']:.2f}×** (target ≥ 1.2×).",
        ]
    breakdown = {}
    if not args.skip_breakdown:
        completed = subprocess.run(
            [sys.executable, __file__, "--child", "breakdown", *setup_flags], capture_output=True, text=True
        )
        if completed.returncode != 0:
            sys.exit(f"breakdown failed:\n{completed.stderr[-5000:]}")
        breakdown = json.loads(completed.stdout.strip().splitlines()[-1])
        lines += [
            "",
            "Where the time goes: pieces of the KD path at this logits shape (one process, interleaved, 9 repeats):",
            "",
            "| piece | min ms | median ms |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {1000 * value['min']:.1f} | {1000 * value['median']:.1f} |"
            for name, value in breakdown.items()
        ]
    print("\n".join(lines))
    RESULTS_DIR.mkdir(exist_ok=True)
    import torch
    import transformers
    import trl

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    (RESULTS_DIR / f"{args.results_name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "setup": dataclasses.asdict(setup),
                "rounds": args.rounds,
                "total_seconds": total_seconds,
                "speedup": speedup,
                "cpu_time_speedup": cpu_speedup,
                "peak_rss_ratio": memory_ratio,
                "first_step_relative_loss_difference": relative_differences[0],
                "max_relative_loss_difference": max(relative_differences),
                "interleaved": interleaved,
                "summary": summary,
                "breakdown_seconds": breakdown,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
