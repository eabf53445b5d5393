"""Teacher caches at dataset scale: peak memory of `precompute_teacher_logits` against the number of rows, and the
bytes each counted position takes in the cache's Arrow buffers.

    .venv/bin/python benchmarks/bench_cache_scale.py                  # 10,000 and 40,000 rows; ~12 min on 2 busy CPUs
    .venv/bin/python benchmarks/bench_cache_scale.py --before_path /tmp/old   # + an older hf_distill copy; ~25 min

Every measurement runs in a fresh subprocess: imports, a tiny GPT-2 teacher (V = 4096, 1 layer × 32) and an
in-memory dataset of `rows` random rows of 64 tokens (labels = inputs, 63 counted positions per row) are built first;
then the process's resident-set high-water mark is reset (``/proc/self/clear_refs``, Linux) and
`precompute_teacher_logits(top_k=32)` runs. **Peak above start** = the high-water mark (VmHWM) after it minus the
resident set (VmRSS) just before it. Bytes per position = the sizes of the Arrow buffers of the teacher columns
(values, ids, tail, hash, list offsets; ``dataset.data``) over the counted positions. Memory-mapped cache pages that are
read count in the resident set like any other page; the benchmark only builds the cache, it does not read it back.

Prints a table and writes ``benchmarks/results/cache_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results" / "cache_scale.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name.rstrip(":")] = int(amount) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS
        return True
    except OSError:
        return False


def child(args) -> dict:
    """One measurement, in this (fresh) process."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    import hf_distill
    from hf_distill import precompute_teacher_logits

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=args.vocab_size,
            n_embd=args.hidden,
            n_layer=args.layers,
            n_head=2,
            n_positions=args.seq_len,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    ids = np.random.default_rng(0).integers(1, args.vocab_size, size=(args.rows, args.seq_len), dtype=np.int64)
    offsets = pa.array(np.arange(0, ids.size + 1, args.seq_len, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1)))
    dataset = datasets.Dataset(pa.table({"input_ids": column, "labels": column}))
    del ids, column

    kwargs = {"top_k": args.top_k, "batch_size": args.batch_size}
    if args.tail:
        kwargs["top_k_tail"] = True
    if args.dtype != "float16":
        kwargs["dtype"] = args.dtype
    if args.warmup_rows:  # one-time allocations (lazily loaded code, allocator arenas) before the baseline
        precompute_teacher_logits(teacher, dataset.select(range(args.warmup_rows)), **kwargs)
    reset = _reset_peak()
    start = _status()
    began = time.perf_counter()
    cached = precompute_teacher_logits(teacher, dataset, **kwargs)
    seconds = time.perf_counter() - began
    end = _status()
    if not reset:  # no way to reset the mark: the process's lifetime peak (imports and setup included)
        import resource

        end["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    teacher_columns = [name for name in cached.column_names if name.startswith("teacher_")]
    num_bytes = 0
    for name in teacher_columns:
        for chunk in cached.data.column(name).chunks:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            num_bytes += sum(buffer.size for buffer in storage.buffers() if buffer is not None)
    positions = args.rows * (args.seq_len - 1)
    return {
        "hf_distill": os.path.dirname(hf_distill.__file__),
        "rows": args.rows,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "top_k": args.top_k,
        "tail": args.tail,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "peak_reset": reset,
        "rss_start_mib": start["VmRSS"] / 2**20,
        "peak_above_start_mib": (end["VmHWM"] - start["VmRSS"]) / 2**20,
        "seconds": seconds,
        "counted_positions": positions,
        "cache_bytes": num_bytes,
        "bytes_per_position": num_bytes / positions,
        "columns": {name: str(cached.features[name]) for name in teacher_columns},
    }


def run_child(rows: int, args, path: str | None, **overrides) -> dict:
    command = [sys.executable, __file__, "--child", "--rows", str(rows)]
    for name in ("vocab_size", "seq_len", "top_k", "batch_size", "hidden", "layers", "dtype", "warmup_rows"):
        command += [f"--{name}", str(overrides.get(name, getattr(args, name)))]
    if overrides.get("tail", args.tail):
        command.append("--tail")
    env = {
        **os.environ,
        "PYTHONPATH": path or str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-4000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--tail", action="store_true")
    parser.add_argument("--warmup_rows", type=int, default=0, help="rows of a first, unmeasured run (default none)")
    parser.add_argument("--before_path", help="PYTHONPATH of an older hf_distill to measure the same way (labelled)")
    parser.add_argument("--storage_rows", type=int, default=2000, help="rows of the storage-variant runs")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        args.rows = args.rows[0]
        print(json.dumps(child(args)))
        return

    runs = []
    for label, path in (("before", args.before_path), ("after", None)):
        if label == "before" and path is None:
            continue
        for rows in args.rows:
            result = run_child(rows, args, path)
            result["label"] = label
            runs.append(result)
            print(
                f"{label:>6} {rows:>7} rows: peak above start {result['peak_above_start_mib']:8.1f} MiB, "
                f"{result['bytes_per_position']:6.1f} B/position, {result['seconds']:6.1f} s",
                flush=True,
            )
    # Storage variants (bytes per position does not depend on the number of rows).
    storage = []
    for variant in ({"dtype": "float16"}, {"dtype": "bfloat16"}, {"dtype": "float32"}, {"tail": True}):
        result = run_child(args.storage_rows, args, None, **variant)
        result["label"] = "storage"
        storage.append(result)
        print(f"storage {variant}: {result['bytes_per_position']:6.1f} B/position", flush=True)

    summary = {}
    for label in ("before", "after"):
        measured = {r["rows"]: r["peak_above_start_mib"] for r in runs if r["label"] == label}
        if len(measured) >= 2:
            small, large = min(measured), max(measured)
            summary[f"{label}_peak_ratio_{large}_over_{small}"] = measured[large] / measured[small]

    print()
    print("| code | rows | peak above start (MiB) | bytes / counted position | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['label']} | {r['rows']:,} | {r['peak_above_start_mib']:.0f} | {r['bytes_per_position']:.1f} "
            f"| {r['seconds']:.1f} |"
        )
    print()
    print("| storage | bytes / counted position |")
    print("|---|---:|")
    for r in storage:
        name = f"top-{r['top_k']} {r['dtype']}" + (" + tail" if r["tail"] else "")
        print(f"| {name} | {r['bytes_per_position']:.2f} |")
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")

    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    config = {
        name: getattr(args, name) for name in ("vocab_size", "seq_len", "top_k", "batch_size", "hidden", "layers")
    }
    Path(args.results).write_text(
        json.dumps({"config": config, "runs": runs, "storage": storage, "summary": summary}, indent=2) + "\n"
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
