"""Where the closed-form paths start to pay: time of the KD loss, forward + backward, over a grid of sizes.

Two comparisons, float32 on CPU, each variant timed alternately with the others (``--repeats`` rounds, median):

* ``chunked / naive``: the KD loss from ``[N, V]`` logits, :func:`hf_distill.chunked.chunked_distillation_loss` against
  ``losses.masked_sum(losses.distillation_divergence(...))`` + autograd; this sets ``CHUNKED_KD_THRESHOLD``
  (`hf_distill.trainer`), the size from which ``kd_chunk_size=None`` chunks;
* ``fused / logits``: the KD + label loss from hidden states ``[N, H]`` and a head ``[V, H]``,
  :func:`hf_distill.fused.fused_linear_distillation_loss` against forming the student's and teacher's logits with
  ``F.linear`` and taking the same two terms on them (naive or chunked KD, as the trainer would) + autograd; this sets
  ``FUSED_LM_HEAD_THRESHOLD``, the size from which ``kd_fuse_lm_head=None`` fuses.

Absolute times drift between runs (and a lot on a shared, busy machine); ratios within one round much less. One
torch thread by default (two threads contending with other jobs made single timings swing by 2×).

    python benchmarks/bench_kd_crossover.py --repeats 7 --memory   # ~6 min idle; results/kd_crossover.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_distill import losses
from hf_distill.chunked import chunked_distillation_loss
from hf_distill.fused import fused_linear_distillation_loss
from hf_distill.trainer import CHUNKED_KD_THRESHOLD


RESULTS_DIR = Path(__file__).resolve().parent / "results"
# (N, V): classifier sizes (128 × 10), small and large vocabularies, and the 1016 × 8192 of the causal-LM benchmarks.
CHUNKED_GRID = [(128, 10), (1024, 10), (128, 1000), (1024, 1000), (2048, 1000), (4096, 1000), (8192, 1000)]
CHUNKED_GRID += [(128, 8192), (512, 4096), (512, 8192), (768, 8192), (1016, 8192), (4096, 8192)]
CHUNKED_GRID += [(128, 32000), (256, 32000), (512, 32000), (2048, 32000)]
FUSED_GRID = [(128, 1000), (1024, 1000), (128, 8192), (512, 4096), (512, 8192), (768, 8192), (1016, 8192)]
FUSED_GRID += [(4096, 8192), (256, 32000), (512, 32000), (2048, 32000)]
HIDDEN = 256


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _filled(rows: int, columns: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Normal values written in place: building the inputs leaves no freed temporary under the memory high-water mark."""
    return torch.empty(rows, columns).normal_(std=std, generator=generator)


def chunked_variants(num_tokens: int, vocab_size: int, loss_type: str):
    generator = torch.Generator().manual_seed(0)
    student = _filled(num_tokens, vocab_size, 3.0, generator).requires_grad_()
    teacher = _filled(num_tokens, vocab_size, 3.0, generator)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    kwargs = dict(temperature=2.0, loss_type=loss_type)

    def naive():
        student.grad = None
        losses.masked_sum(losses.distillation_divergence(student, teacher, **kwargs), mask).backward()

    def chunked():
        student.grad = None
        chunked_distillation_loss(student, teacher, mask, **kwargs).backward()

    return {"naive": naive, "chunked": chunked}


def fused_variants(num_tokens: int, vocab_size: int, loss_type: str):
    generator = torch.Generator().manual_seed(0)
    hidden = _filled(num_tokens, HIDDEN, 1.0, generator).requires_grad_()
    weight = _filled(vocab_size, HIDDEN, HIDDEN**-0.5, generator).requires_grad_()
    teacher_hidden = _filled(num_tokens, HIDDEN, 1.0, generator)
    teacher_weight = _filled(vocab_size, HIDDEN, HIDDEN**-0.5, generator)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    mask = torch.ones(num_tokens, dtype=torch.bool)
    alpha, temperature = 0.9, 2.0
    chunk = num_tokens * vocab_size > CHUNKED_KD_THRESHOLD

    def logits():
        hidden.grad = weight.grad = None
        student = F.linear(hidden, weight)
        with torch.no_grad():
            teacher = F.linear(teacher_hidden, teacher_weight)
        kwargs = dict(temperature=temperature, loss_type=loss_type)
        if chunk:
            kd = chunked_distillation_loss(student, teacher, mask, **kwargs)
        else:
            kd = losses.masked_sum(losses.distillation_divergence(student, teacher, **kwargs), mask)
        ce = F.cross_entropy(student, labels, reduction="sum")
        (alpha * kd + (1 - alpha) * ce).backward()

    def fused():
        hidden.grad = weight.grad = None
        fused_linear_distillation_loss(
            hidden,
            weight,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            labels=labels,
            kd_weight=alpha,
            ce_weight=1 - alpha,
            temperature=temperature,
            loss_type=loss_type,
        ).loss.backward()

    return {"logits": logits, "fused": fused}


def peak_memory(comparison: str, variant: str, num_tokens: int, vocab_size: int, loss_type: str) -> int:
    """Bytes one forward + backward of `variant` adds to the resident-set high-water mark above its inputs, measured
    in a fresh subprocess (as `bench_kd_memory.py` does)."""
    code = (
        "import resource, sys; sys.path[:0] = [{path!r}]; import bench_kd_crossover as b; "
        "v = b.{make}({n}, {v}, {loss!r}); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "v[{variant!r}](); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    ).format(
        path=str(Path(__file__).resolve().parent),
        make="chunked_variants" if comparison.startswith("chunked") else "fused_variants",
        n=num_tokens,
        v=vocab_size,
        loss=loss_type,
        variant=variant,
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(output.split()[-1]) * 1024  # Linux reports KiB


def measure(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds per variant; variants alternate within each round, after one warm-up call each."""
    for function in variants.values():
        function()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            times[name].append(_timed(function))
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loss_type", default="kl")
    parser.add_argument(
        "--memory", action="store_true", help="also each variant's peak memory above its inputs (fresh processes)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine 2 threads contend and swamp ratios)",
    )
    parser.add_argument("--output", default=str(RESULTS_DIR / "kd_crossover.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    comparisons = (
        ("chunked / naive", CHUNKED_GRID, chunked_variants, "naive", "chunked"),
        ("fused / logits", FUSED_GRID, fused_variants, "logits", "fused"),
    )
    # Memory first, while this process is small: a child's `ru_maxrss` starts from its parent's resident set.
    peaks = {}
    if args.memory:
        for comparison, grid, _, baseline, variant in comparisons:
            for num_tokens, vocab_size in grid:
                peaks[comparison, num_tokens, vocab_size] = {
                    f"{name}_peak_mib": peak_memory(comparison, name, num_tokens, vocab_size, args.loss_type) / 2**20
                    for name in (baseline, variant)
                }
    rows = []
    memory_columns = " baseline peak (MiB) | variant peak (MiB) |" if args.memory else ""
    print("| comparison | N | V | N·V | baseline (ms) | variant (ms) | variant / baseline |" + memory_columns)
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.memory else ""), flush=True)
    for comparison, grid, make, baseline, variant in comparisons:
        for num_tokens, vocab_size in grid:
            medians = measure(make(num_tokens, vocab_size, args.loss_type), args.repeats)
            ratio = medians[variant] / medians[baseline]
            memory = peaks.get((comparison, num_tokens, vocab_size), {})
            rows.append(
                dict(
                    comparison=comparison,
                    N=num_tokens,
                    V=vocab_size,
                    elements=num_tokens * vocab_size,
                    baseline_ms=1e3 * medians[baseline],
                    variant_ms=1e3 * medians[variant],
                    ratio=ratio,
                    **memory,
                )
            )
            mib = " | ".join(f"{value:.0f}" for value in memory.values())
            print(
                f"| {comparison} | {num_tokens} | {vocab_size} | {num_tokens * vocab_size:,} | "
                f"{1e3 * medians[baseline]:.2f} | {1e3 * medians[variant]:.2f} | {ratio:.2f} |"
                + (f" {mib} |" if mib else ""),
                flush=True,
            )
    result = dict(
        machine=dict(
            platform=platform.platform(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            note="ratios only: absolute times drift between runs",
        ),
        loss_type=args.loss_type,
        repeats=args.repeats,
        hidden=HIDDEN,
        rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
