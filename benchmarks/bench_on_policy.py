"""On-policy distillation: hf-distill's `DistillationTrainer` (``lmbda=1``) against TRL's on-policy trainer.

TRL's on-policy path in trl 1.16 is its stable ``trl.DistillationTrainer`` (``trl/trainer/distillation_trainer.py``):
always on-policy (no ``lmbda``: the student samples every completion, with plain ``transformers`` ``generate`` unless
``use_vllm``), loss = generalized JSD with ``beta`` (default 1.0 = reverse KL(student ‖ teacher)) at ``temperature``
(default 1.0, also the sampling temperature), computed by a chunked kernel over the completion positions and divided by
the number of completion tokens. ``trl.experimental.gkd.GKDTrainer`` (lmbda=1) is the older, experimental one; this
benchmark uses the stable trainer.

Both runs: the same tiny GPT-2 teacher (4 layers × 256) and identically initialised student (2 × 128), V = 8192 (a
word-level tokenizer built in memory: token i is the word ``t{i}``), the same prompts (random ids, fixed seed, all
``prompt_length`` long, so no padding), ``max_new_tokens`` new tokens sampled by the student with do_sample=True,
temperature 1, top_k 0, top_p 1, and ``min_new_tokens = max_new_tokens`` for both (EOS cannot be sampled before the
end, so every step generates exactly batch × max_new_tokens tokens; the generated-token count per step is recorded and
checked), float32, no activation checkpointing, no dropout, AdamW lr 1e-4 constant, the same batch and steps. Loss: TRL's
default ``beta=1`` (reverse KL at T = 1) against hf-distill ``distillation_loss="reverse_kl", alpha=1, temperature=1``;
both are the mean per completion token of KL(student ‖ teacher).

Timing: each trainer run is a fresh subprocess, alternating TRL, hf-distill, hf-distill, TRL, … for ``--rounds``; time
per optimizer step from the start of Trainer's ``get_batch_samples`` to ``on_step_end``, median after
``--warmup_steps``, then median over rounds; process CPU time per step; peak RSS (``ru_maxrss``) per run. Not from
``on_step_begin``: hf-distill generates in ``get_batch_samples``, which Trainer calls *before* ``on_step_begin``, TRL in
``training_step`` after it, so ``on_step_begin`` → ``on_step_end`` (also recorded) would leave hf-distill's generation
out.
Where the time goes, in every run: wall time inside the student's ``generate``, inside the teacher's backbone forward
(``teacher.transformer``; TRL projects the teacher's hidden states inside its loss kernel, hf-distill runs the whole
teacher), inside the student's training forward (``student.transformer`` with grad enabled), and the rest of the step
(LM heads, KD loss, backward, optimizer) — via forward hooks and a wrapper around ``generate``, the same in both.

TRL is a benchmark-only dependency (``pip install -e .[bench]``). Writes ``benchmarks/results/on_policy.json`` and
``.md`` (``--results_name``).

    python benchmarks/bench_on_policy.py --num_threads 1       # 5 rounds, ~4 min on a quiet 2-core machine
    python benchmarks/bench_on_policy.py --rounds 1 --steps 3 --warmup_steps 1 --results_name on_policy_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import max_rss_bytes, tiny_gpt2, word_level_tokenizer  # noqa: E402


RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRAINERS = ("trl", "hf_distill")
PIECES = ("generate", "teacher_forward", "student_forward", "rest")


@dataclasses.dataclass
class Setup:
    vocab_size: int = 8192
    prompt_length: int = 32
    max_new_tokens: int = 64
    batch_size: int = 8
    steps: int = 8
    warmup_steps: int = 2
    learning_rate: float = 1e-4
    teacher_layers: int = 4
    teacher_width: int = 256
    student_layers: int = 2
    student_width: int = 128
    seed: int = 0
    num_threads: int = 0  # torch.set_num_threads in each run; 0: torch's default (all cores)
    kd_chunk_size: int = -1  # hf-distill's kd_chunk_size; -1: its default (None: chunked above 2**24 KD logits)

    @property
    def generation_kwargs(self) -> dict:
        return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": self.max_new_tokens}


def build_models_and_prompts(setup: Setup):
    """Teacher, student and `batch_size × steps` prompts of `prompt_length` random ids (never pad 0 or eos 1)."""
    import torch

    n_positions = setup.prompt_length + setup.max_new_tokens + 64  # room: generate may be asked for more
    teacher = tiny_gpt2(setup.vocab_size, n_positions, setup.teacher_layers, setup.teacher_width, setup.seed + 1)
    student = tiny_gpt2(setup.vocab_size, n_positions, setup.student_layers, setup.student_width, setup.seed + 2)
    teacher.eval()
    for model in (teacher, student):
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    generator = torch.Generator().manual_seed(setup.seed)
    prompts = torch.randint(
        2, setup.vocab_size, (setup.batch_size * setup.steps, setup.prompt_length), generator=generator
    )
    return teacher, student, prompts.tolist()


class PieceTimer:
    """Wall and process-CPU seconds per optimizer step inside the student's `generate`, the teacher's backbone forward
    and the student's training forward (with grad), via a `generate` wrapper and forward hooks on `.transformer`."""

    def __init__(self, teacher, student):
        self.steps: list[dict] = []
        self.cpu_steps: list[dict] = []
        self.generated_tokens: list[int] = []
        self.generate_call = None
        self.begin()
        original_generate = student.generate

        def timed_generate(*args, **kwargs):
            if self.generate_call is None:  # what each trainer asks `generate` for, recorded once
                config = kwargs.get("generation_config")
                self.generate_call = {
                    "kwargs": {k: repr(v) for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")},
                    "generation_config": config.to_diff_dict() if config is not None else None,
                }
            start, cpu_start = time.perf_counter(), time.process_time()
            output = original_generate(*args, **kwargs)
            self.current["generate"] += time.perf_counter() - start
            self.current_cpu["generate"] += time.process_time() - cpu_start
            prompt = kwargs.get("input_ids", args[0] if args else None)
            sequences = output if hasattr(output, "shape") else output.sequences
            self._generated += sequences.numel() - (prompt.numel() if prompt is not None else 0)
            return output

        student.generate = timed_generate
        self._hook(teacher.transformer, "teacher_forward", lambda: True)
        self._hook(student.transformer, "student_forward", torch_grad_enabled)

    def _hook(self, module, piece, condition):
        starts = []

        def pre(_module, _args):
            starts.append((time.perf_counter(), time.process_time()))

        def post(_module, _args, _output):
            start, cpu_start = starts.pop()
            if condition():
                self.current[piece] += time.perf_counter() - start
                self.current_cpu[piece] += time.process_time() - cpu_start

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def begin(self):
        self.current = dict.fromkeys(PIECES[:-1], 0.0)
        self.current_cpu = dict.fromkeys(PIECES[:-1], 0.0)
        self._generated = 0

    def end(self, step_seconds: float, step_cpu_seconds: float):
        for pieces, total, steps in (
            (self.current, step_seconds, self.steps),
            (self.current_cpu, step_cpu_seconds, self.cpu_steps),
        ):
            pieces = dict(pieces)
            pieces["rest"] = total - sum(pieces.values())
            steps.append(pieces)
        self.generated_tokens.append(self._generated)


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


class _Recording:
    """Records each micro-batch's loss, and starts the step clock when the step's micro-batches are fetched."""

    step_timer = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.step_timer is not None:
            self.step_timer.begin()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.recorded_losses.append((loss[0] if return_outputs else loss).item())
        return loss


def build_trainer(name: str, setup: Setup, teacher, student, prompts, output_dir: str, callbacks):
    import datasets

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
        bf16=False,  # TRL's configs default to bf16 (autocast) and gradient checkpointing; both runs are float32
    )
    if name == "trl":
        from trl import DistillationConfig, DistillationTrainer

        class RecordingTRLTrainer(_Recording, DistillationTrainer):
            pass

        args = DistillationConfig(
            **common,
            gradient_checkpointing=False,
            beta=1.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_completion_length=setup.max_new_tokens,
            generation_kwargs={"min_new_tokens": setup.max_new_tokens},
            shuffle_dataset=False,
        )
        dataset = datasets.Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in prompts]})
        trainer = RecordingTRLTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=word_level_tokenizer(setup.vocab_size),
            callbacks=callbacks,
        )
    else:
        from transformers import default_data_collator

        from hf_distill import DistillationTrainer, DistillationTrainingArguments

        class RecordingDistillationTrainer(_Recording, DistillationTrainer):
            pass

        args = DistillationTrainingArguments(
            **common,
            activation_checkpointing=False,
            distillation_loss="reverse_kl",
            alpha=1.0,
            temperature=1.0,
            lmbda=1.0,
            max_new_tokens=setup.max_new_tokens,
            generation_kwargs=setup.generation_kwargs,
            kd_chunk_size=None if setup.kd_chunk_size < 0 else setup.kd_chunk_size,
        )
        # Prompt-only rows: every label -100 (valid at lmbda=1; the student writes the completion).
        dataset = datasets.Dataset.from_dict(
            {
                "input_ids": prompts,
                "attention_mask": [[1] * len(row) for row in prompts],
                "labels": [[-100] * len(row) for row in prompts],
            }
        )
        trainer = RecordingDistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            data_collator=default_data_collator,
            callbacks=callbacks,
        )
    trainer.recorded_losses = []
    return trainer


def run_one(name: str, setup: Setup) -> dict:
    """One training run of trainer `name`, in this (fresh) process."""
    import torch
    from transformers import TrainerCallback

    if setup.num_threads > 0:
        torch.set_num_threads(setup.num_threads)
    rss_start = max_rss_bytes()
    teacher, student, prompts = build_models_and_prompts(setup)
    pieces = PieceTimer(teacher, student)

    class StepTimer(TrainerCallback):
        """A step starts when Trainer fetches its micro-batches (`get_batch_samples`, where hf-distill generates;
        `begin` is called from there) and ends at `on_step_end`. `on_step_begin` → `on_step_end` is kept too."""

        def __init__(self):
            self.seconds, self.cpu_seconds, self.callback_seconds = [], [], []

        def begin(self):
            pieces.begin()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_begin(self, args, state, control, **kwargs):
            self._callback_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)
            self.callback_seconds.append(time.perf_counter() - self._callback_start)
            pieces.end(self.seconds[-1], self.cpu_seconds[-1])

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(name, setup, teacher, student, prompts, output_dir, [timer])
        trainer.step_timer = timer
        checkpointing = bool(getattr(trainer.model, "is_activation_checkpointing", False))
        rss_before_train = max_rss_bytes()
        trainer.train()
    counted = slice(setup.warmup_steps, None)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "trainer": name,
        "median_step_seconds": statistics.median(timer.seconds[counted]),
        "step_seconds": timer.seconds,
        "median_step_cpu_seconds": statistics.median(timer.cpu_seconds[counted]),
        "median_on_step_begin_to_end_seconds": statistics.median(timer.callback_seconds[counted]),
        "step_cpu_seconds": timer.cpu_seconds,
        "median_piece_seconds": {
            piece: statistics.median(step[piece] for step in pieces.steps[counted]) for piece in PIECES
        },
        "median_piece_cpu_seconds": {
            piece: statistics.median(step[piece] for step in pieces.cpu_steps[counted]) for piece in PIECES
        },
        "piece_seconds": pieces.steps,
        "piece_cpu_seconds": pieces.cpu_steps,
        "generated_tokens_per_step": pieces.generated_tokens,
        "generate_call": pieces.generate_call,
        "peak_rss_bytes": max_rss_bytes(),
        "train_peak_rss_delta_bytes": max_rss_bytes() - rss_before_train,
        "rss_at_start_bytes": rss_start,
        "gradient_checkpointing": checkpointing,
        "reported_losses": trainer.recorded_losses,
        "log_history": logs,
        "num_threads": torch.get_num_threads(),
    }


def _versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "trl": trl.__version__,
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"TRL: `trl.DistillationTrainer` {results['versions']['trl']} (stable, on-policy, beta=1 = reverse KL, HF "
        "generate); hf-distill: `DistillationTrainer(lmbda=1, distillation_loss='reverse_kl', alpha=1)`. "
        f"Batch {setup['batch_size']} prompts × {setup['prompt_length']} tokens, {setup['max_new_tokens']} new tokens "
        f"each, V = {setup['vocab_size']}, {results['rounds']} rounds × {setup['steps']} steps "
        f"({setup['warmup_steps']} warm-up), {results['num_threads']} torch thread(s) per run. {results['note']}",
        "",
        "Cells are wall / process-CPU seconds per optimizer step (medians); the pieces are timed inside the step.",
        "",
        "| trainer | step | generate | teacher backbone fwd | student backbone fwd "
        "| rest: LM heads, KD loss, backward, optimizer | generated tokens / step | peak RSS (MiB) | step-1 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TRAINERS:
        s = results["summary"][name]
        wall, cpu = s["median_piece_seconds"], s["median_piece_cpu_seconds"]
        pieces = " | ".join(f"{wall[piece]:.3f} / {cpu[piece]:.3f}" for piece in PIECES)
        lines.append(
            f"| {s['label']} | {s['median_step_seconds']:.3f} / {s['median_step_cpu_seconds']:.3f} | {pieces} | "
            f"{s['generated_tokens_per_step']} | {s['peak_rss_bytes'] / 2**20:.0f} | {s['step1_loss']:.6f} |"
        )
    ratio = results["speedup"]
    lines += [
        "",
        f"**hf-distill / TRL: {ratio['wall']:.2f}× faster per step in wall time, {ratio['cpu']:.2f}× in CPU time "
        f"(target ≥ 1.2×: {'met' if ratio['wall'] >= 1.2 else 'not met'} in wall time, "
        f"{'met' if ratio['cpu'] >= 1.2 else 'not met'} in CPU time); "
        f"{results['memory_ratio']:.3f}× the peak RSS (no more memory: "
        f"{'met' if results['memory_ratio'] <= 1.0 else 'not met'}).**",
    ]
    return "\n".join(lines)


def summarise(runs: list[dict], setup: Setup, rounds: int) -> dict:
    chunk = "" if setup.kd_chunk_size < 0 else f", kd_chunk_size={setup.kd_chunk_size}"
    labels = {
        "trl": "TRL DistillationTrainer (beta=1)",
        "hf_distill": f"hf-distill DistillationTrainer (lmbda=1{chunk})",
    }
    summary = {}
    for name in TRAINERS:
        mine = [run for run in runs if run["trainer"] == name]
        tokens = sorted({t for run in mine for t in run["generated_tokens_per_step"]})
        summary[name] = {
            "label": labels[name],
            "median_step_seconds": statistics.median(run["median_step_seconds"] for run in mine),
            "median_step_cpu_seconds": statistics.median(run["median_step_cpu_seconds"] for run in mine),
            "median_piece_seconds": {
                piece: statistics.median(run["median_piece_seconds"][piece] for run in mine) for piece in PIECES
            },
            "median_piece_cpu_seconds": {
                piece: statistics.median(run["median_piece_cpu_seconds"][piece] for run in mine) for piece in PIECES
            },
            "generated_tokens_per_step": tokens[0] if len(tokens) == 1 else f"{tokens[0]}–{tokens[-1]}",
            "peak_rss_bytes": statistics.median(run["peak_rss_bytes"] for run in mine),
            "step1_loss": mine[0]["reported_losses"][0] if mine[0]["reported_losses"] else float("nan"),
        }
    trl, ours = summary["trl"], summary["hf_distill"]
    return {
        "summary": summary,
        "speedup": {
            "wall": trl["median_step_seconds"] / ours["median_step_seconds"],
            "cpu": trl["median_step_cpu_seconds"] / ours["median_step_cpu_seconds"],
        },
        "memory_ratio": ours["peak_rss_bytes"] / trl["peak_rss_bytes"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Setup):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument(
        "--rounds", type=int, default=5, help="Each round: one run of each trainer (order alternates)."
    )
    parser.add_argument("--results_name", default="on_policy")
    parser.add_argument(
        "--note", default="Busy machine, idle re-run pending.", help="A line about the machine's load."
    )
    parser.add_argument("--run_one", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = Setup(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Setup)})

    if args.run_one:  # child process
        Path(args.out).write_text(json.dumps(run_one(args.run_one, setup)))
        return {}

    runs = []
    order = [TRAINERS if r % 2 == 0 else TRAINERS[::-1] for r in range(args.rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        for r, names in enumerate(order):
            for name in names:
                out = Path(tmp) / f"{r}_{name}.json"
                command = [sys.executable, __file__, "--run_one", name, "--out", str(out)]
                command += [f"--{f.name}={getattr(setup, f.name)}" for f in dataclasses.fields(Setup)]
                print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                subprocess.run(command, check=True)
                runs.append(json.loads(out.read_text()))
                print(f"  {runs[-1]['median_step_seconds']:.3f} s/step", file=sys.stderr, flush=True)

    results = {
        "setup": dataclasses.asdict(setup),
        "generation_kwargs": setup.generation_kwargs,
        "rounds": args.rounds,
        "versions": _versions(),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "note": args.note,
        "num_threads": runs[0]["num_threads"],
        "trl_trainer": "trl.DistillationTrainer (trl/trainer/distillation_trainer.py), stable, on-policy",
        **summarise(runs, setup, args.rounds),
        "runs": runs,
    }
    table = markdown(results)
    print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.results_name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS_DIR / f"{args.results_name}.md").write_text(f"# On-policy distillation: hf-distill vs TRL\n\n{table}\n")
    return results


if __name__ == "__main__":
    main()
