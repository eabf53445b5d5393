"""Peak memory and time of the token-level KD loss, forward + backward: chunked vs naive, float32 on CPU.

Each measurement runs in a fresh subprocess, so one method's freed memory never hides another's peak. Memory is the
process's resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which sees every torch CPU
allocation once it is touched), read three times in the child:

* after imports (``rss_imports``), after building the inputs (``rss_inputs``) and after forward + backward
  (``rss_peak``);
* "loss peak" = ``rss_peak − rss_inputs``: what the loss adds on top of its inputs (the student's and teacher's
  ``[N, V]`` logits), *including* the ``[N, V]`` gradient it hands to the student's logits;
* "with inputs" = ``rss_peak − rss_imports``.

The inputs are filled in place (``normal_``), so building them leaves no freed temporaries below the high-water mark.
Time is the median of ``--repeats`` forward + backward passes after the measured one.

    python benchmarks/bench_kd_memory.py            # N = 8192, V = 32000, and N = 2048, V = 128256 (same N·V)

Writes ``benchmarks/results/kd_memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (counted tokens N, vocabulary V). 8192 × 128256 would need ~8.4 GB for the inputs alone, over this shared
# machine's ~8 GB per-process allowance; 2048 × 128256 (a Llama-3-sized vocabulary) has the same N·V as 8192 × 32000.
SHAPES = ((8192, 32000), (2048, 128256))
METHODS = ("naive", "chunked")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(method: str, num_tokens: int, vocab_size: int, loss_type: str, temperature: float, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from hf_distill import losses
    from hf_distill.chunked import chunked_distillation_loss

    rss_imports = _max_rss_bytes()
    generator = torch.Generator().manual_seed(0)
    student = torch.empty(num_tokens, vocab_size).normal_(std=3.0, generator=generator).requires_grad_()
    teacher = torch.empty(num_tokens, vocab_size).normal_(std=3.0, generator=generator)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    rss_inputs = _max_rss_bytes()

    def forward_backward():
        student.grad = None
        if method == "naive":
            per_position = losses.distillation_divergence(
                student, teacher, temperature=temperature, loss_type=loss_type
            )
            loss = losses.masked_sum(per_position, mask)
        else:
            loss = chunked_distillation_loss(student, teacher, mask, temperature=temperature, loss_type=loss_type)
        (loss / num_tokens).backward()
        return loss.item()

    start = time.perf_counter()
    loss_value = forward_backward()
    first_seconds = time.perf_counter() - start
    rss_peak = _max_rss_bytes()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward()
        seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "num_tokens": num_tokens,
        "vocab_size": vocab_size,
        "loss_type": loss_type,
        "temperature": temperature,
        "loss": loss_value,
        "loss_peak_bytes": rss_peak - rss_inputs,
        "with_inputs_peak_bytes": rss_peak - rss_imports,
        "inputs_bytes": rss_inputs - rss_imports,
        "first_pass_seconds": first_seconds,
        "median_seconds": statistics.median(seconds) if seconds else first_seconds,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss_type", default="kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "N", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, num_tokens, vocab_size = args.child
        print(
            json.dumps(
                measure(method, int(num_tokens), int(vocab_size), args.loss_type, args.temperature, args.repeats)
            )
        )
        return

    rows = []
    for num_tokens, vocab_size in SHAPES:
        for method in METHODS:
            command = [
                sys.executable,
                __file__,
                "--child",
                method,
                str(num_tokens),
                str(vocab_size),
                "--loss_type",
                args.loss_type,
                "--temperature",
                str(args.temperature),
                "--repeats",
                str(args.repeats),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(f"measured {method} N={num_tokens} V={vocab_size}", file=sys.stderr)

    gib = 2**30
    lines = [
        f"KD loss forward + backward, {args.loss_type}, T = {args.temperature:g}, float32, CPU "
        f"({platform.processor() or platform.machine()}, torch threads = default). Memory: RSS high-water deltas in a "
        "fresh process per row.",
        "",
        "| N × V | method | loss peak (GiB) | with inputs (GiB) | chunked / naive peak | time / pass (s) "
        "| chunked / naive time | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["num_tokens"], row["vocab_size"]), {})[row["method"]] = row
    for (num_tokens, vocab_size), pair in by_shape.items():
        naive = pair["naive"]
        for method in METHODS:
            row = pair[method]
            memory_ratio = row["loss_peak_bytes"] / naive["loss_peak_bytes"]
            time_ratio = row["median_seconds"] / naive["median_seconds"]
            row["peak_ratio_vs_naive"], row["time_ratio_vs_naive"] = memory_ratio, time_ratio
            lines.append(
                f"| {num_tokens} × {vocab_size} | {method} | {row['loss_peak_bytes'] / gib:.2f} | "
                f"{row['with_inputs_peak_bytes'] / gib:.2f} | {memory_ratio:.2f} | {row['median_seconds']:.2f} | "
                f"{time_ratio:.2f} | {row['loss']:.6g} |"
            )
    print("\n".join(lines))
    RESULTS_DIR.mkdir(exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()}
    (RESULTS_DIR / "kd_memory.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
