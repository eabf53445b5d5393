"""Peak GPU memory and time of the KD + label loss alone (forward + backward): naive, chunked and fused.

The shape is that of Liger-Kernel's published fused-linear distillation benchmark: BT = 8192 rows, H = 4096,
V = 128256. Liger reports 11.1 GB (fused) vs 68.9 GB (naive) and 60.7 vs 213.2 ms on an H100. Those are their figures,
for their code and setup, not a measurement of this library.

    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu/bench_fused_memory.py --output $OUT/fused_memory.json
    .venv/bin/python benchmarks/gpu/bench_fused_memory.py --device cpu --output /tmp/f.json   # CPU smoke mode

Inputs, the same in every method (a seeded generator on the device): student hidden states ``h [N, H]`` and head
``W [V, H]`` (both require grad), teacher hidden states ``[N, H]`` and head ``[V, H]`` (constants), labels ``[N]``.
Logits have standard deviation 1 (student) and 2 (teacher). Each dtype in ``--dtypes`` gives all four in that dtype, as
a model in that dtype would hand them over: the heads' matmuls run in that dtype (in every method, as the model's own
head would), everything after them in float32. The loss is
``0.5 · Σ T² · KL(q ‖ p) + 0.5 · Σ CE`` at T = 2 over all N rows, then ``backward()``:

* ``naive``: student logits ``h Wᵀ`` in full, teacher logits in full under ``no_grad``, then
  ``losses.masked_sum(losses.distillation_divergence(...))`` + ``F.cross_entropy(logits.float(), labels,
  reduction="sum")`` (float32 like transformers' causal-LM loss), autograd backward;
* ``chunked``: the same full logits, the KD term by ``chunked_distillation_loss``, the label term as naive;
* ``fused``: ``fused_linear_distillation_loss`` from the hidden states and heads (``teacher_hidden``/
  ``teacher_weight``, ``labels``, kd_weight 0.5, ce_weight 0.5), no ``[N, V]`` tensor.

Each (dtype, method) runs in a fresh subprocess, so one method's peak never includes another's. Reported:

* peak memory above the inputs: ``torch.cuda.max_memory_allocated()`` over all passes minus the memory allocated once
  the inputs are built. It includes the gradients of ``h`` and ``W`` (what any method must produce). Also given in
  units of one float32 ``[N, V]`` tensor (4.2 GB at the default shape). GB = 10^9 bytes. n/a on CPU;
* time per forward + backward: CUDA events (wall clock on CPU), 2 warm-up passes, median of 5;
* the loss (and its KD and label sums) and the norms of the two gradients; chunked and fused must give naive's loss
  within a relative 1e-4 in float32 and 1e-2 in bfloat16/float16. The gradient norms' differences are reported, not
  checked.

Expected on one H200, not measured yet: about 1.5 minutes in all (six subprocesses of a few seconds' start-up each; a
float32 forward + backward at this shape is several hundred ms; the fused path's default chunk on a GPU is 1046 rows at
this V). ``--child_timeout`` (300 s) bounds each subprocess.
The exit status is 1 when a measurement fails or the losses disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


METHODS = ("naive", "chunked", "fused")
LIGER_REFERENCE = {
    "source": "Liger-Kernel's published fused-linear distillation benchmark (their figures, different code and setup)",
    "shape": {"rows": 8192, "hidden": 4096, "vocab": 128256},
    "gpu": "H100",
    "memory_gb": {"fused": 11.1, "naive": 68.9},
    "time_ms": {"fused": 60.7, "naive": 213.2},
}
# Relative loss difference allowed between the methods, per input dtype.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
GB = 1e9


def measure(options) -> dict:
    """One (dtype, method) measurement, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from hf_distill import losses
    from hf_distill.chunked import chunked_distillation_loss, default_chunk_size
    from hf_distill.fused import default_fused_chunk_size, fused_linear_distillation_loss

    started = time.perf_counter()
    method, dtype_name = options.worker
    device = torch.device(options.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, dtype_name)
    rows, hidden_size, vocab = options.rows, options.hidden, options.vocab
    temperature = options.temperature

    generator = torch.Generator(device=device).manual_seed(0)

    def normal(shape, std):
        return torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator).to(dtype)

    if cuda:
        torch.cuda.init()
        for warm_dtype in {dtype, torch.float32}:  # cuBLAS workspaces count as allocated memory: before the baseline
            probe = torch.ones(64, 64, dtype=warm_dtype, device=device)
            (probe @ probe).sum().item()
        del probe
        torch.cuda.synchronize()
        before_inputs = torch.cuda.memory_allocated()
    student_hidden = normal((rows, hidden_size), 1.0).requires_grad_(True)
    student_weight = normal((vocab, hidden_size), hidden_size**-0.5).requires_grad_(True)
    teacher_hidden = normal((rows, hidden_size), 1.0)
    teacher_weight = normal((vocab, hidden_size), 2.0 * hidden_size**-0.5)
    labels = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    mask = torch.ones(rows, dtype=torch.bool, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        inputs_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def forward_backward():
        if method == "fused":
            result = fused_linear_distillation_loss(
                student_hidden,
                student_weight,
                None,
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight,
                labels=labels,
                kd_weight=0.5,
                ce_weight=0.5,
                temperature=temperature,
                loss_type="kl",
                chunk_size=options.fused_chunk_size,
            )
            loss, kd_sum, ce_sum = result.loss, result.kd_sum, result.ce_sum
        else:
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            if method == "naive":
                values = losses.distillation_divergence(
                    student_logits, teacher_logits, temperature=temperature, loss_type="kl"
                )
                kd_sum = losses.masked_sum(values, mask)
                del values
            else:
                kd_sum = chunked_distillation_loss(
                    student_logits, teacher_logits, mask, temperature=temperature, loss_type="kl"
                )
            del teacher_logits
            ce_sum = F.cross_entropy(student_logits.float(), labels, reduction="sum")
            del student_logits
            loss = 0.5 * kd_sum + 0.5 * ce_sum
        loss.backward()
        return loss.detach(), kd_sum.detach(), ce_sum.detach()

    times_ms = []
    for index in range(options.warmup + options.repeats):
        student_hidden.grad = None
        student_weight.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            values = forward_backward()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            wall = time.perf_counter()
            values = forward_backward()
            elapsed = 1000 * (time.perf_counter() - wall)
        if index >= options.warmup:
            times_ms.append(elapsed)
    peak_above_inputs = torch.cuda.max_memory_allocated() - inputs_bytes if cuda else None
    peak_reserved = torch.cuda.max_memory_reserved() if cuda else None
    loss, kd_sum, ce_sum = (value.item() for value in values)
    grad_norms = {
        "hidden": student_hidden.grad.float().norm().item(),
        "weight": student_weight.grad.float().norm().item(),
    }
    nv_float32_bytes = rows * vocab * 4
    if method == "fused":
        chunk_size = options.fused_chunk_size or default_fused_chunk_size(vocab, device)
    elif method == "chunked":
        chunk_size = default_chunk_size(vocab)
    else:
        chunk_size = None
    return {
        "method": method,
        "dtype": dtype_name,
        "rows": rows,
        "hidden": hidden_size,
        "vocab": vocab,
        "chunk_rows": chunk_size,
        "inputs_bytes": inputs_bytes - before_inputs if cuda else None,
        "peak_above_inputs_bytes": peak_above_inputs,
        "peak_above_inputs_in_nv_float32": None if peak_above_inputs is None else peak_above_inputs / nv_float32_bytes,
        "peak_reserved_bytes": peak_reserved,
        "ms_median": statistics.median(times_ms),
        "ms": times_ms,
        "loss": loss,
        "kd_sum": kd_sum,
        "ce_sum": ce_sum,
        "grad_norms": grad_norms,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "child_s": time.perf_counter() - started,
    }


def child_command(options, method, dtype_name) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, dtype_name]
    for name in ("device", "rows", "hidden", "vocab", "temperature", "warmup", "repeats", "fused_chunk_size"):
        value = getattr(options, name)
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


def rel_diff(value, reference):
    return abs(value - reference) / max(abs(reference), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rows", type=int, default=None, help="N (default 8192; CPU smoke mode 256)")
    parser.add_argument("--hidden", type=int, default=None, help="H (default 4096; CPU smoke mode 64)")
    parser.add_argument("--vocab", type=int, default=None, help="V (default 128256; CPU smoke mode 1024)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="input dtypes, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from naive,chunked,fused")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fused_chunk_size", type=int, default=None, help="rows per fused chunk (library default)")
    parser.add_argument("--child_timeout", type=float, default=300.0, help="seconds allowed per subprocess")
    default_output = (
        os.path.join(os.environ["OUT"], "fused_memory.json") if os.environ.get("OUT") else "fused_memory.json"
    )
    parser.add_argument("--output", default=default_output)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    smoke = options.device == "cpu"
    for name, full, tiny in (("rows", 8192, 256), ("hidden", 4096, 64), ("vocab", 128256, 1024)):
        if getattr(options, name) is None:
            setattr(options, name, tiny if smoke else full)
    if options.worker:
        print(json.dumps(measure(options)), flush=True)
        return

    started = time.perf_counter()
    dtypes = [d.strip() for d in options.dtypes.split(",") if d.strip()]
    methods = [m.strip() for m in options.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS] + [d for d in dtypes if d not in LOSS_RTOL]
    if unknown:
        sys.exit(f"unknown method or dtype: {unknown}")
    nv_float32_bytes = options.rows * options.vocab * 4
    print(
        f"N = {options.rows}, H = {options.hidden}, V = {options.vocab} on {options.device}; one float32 [N, V] "
        f"tensor = {nv_float32_bytes / GB:.2f} GB",
        flush=True,
    )
    rows = []
    for dtype_name in dtypes:
        for method in methods:
            wall = time.perf_counter()
            try:
                completed = subprocess.run(
                    child_command(options, method, dtype_name),
                    capture_output=True,
                    text=True,
                    timeout=options.child_timeout,
                )
                if completed.returncode != 0:
                    raise RuntimeError(f"exit status {completed.returncode}: {completed.stderr[-3000:]}")
                row = json.loads(completed.stdout.strip().splitlines()[-1])
            except Exception as error:  # a failed or timed-out child is reported, the others still run
                row = {"method": method, "dtype": dtype_name, "error": f"{type(error).__name__}: {error}"[-3000:]}
            row["process_s"] = time.perf_counter() - wall
            rows.append(row)
            if "error" in row:
                print(f"  {dtype_name} {method}: FAILED ({row['process_s']:.1f} s)\n{row['error']}", flush=True)
            else:
                peak = row["peak_above_inputs_bytes"]
                print(
                    f"  {dtype_name} {method}: peak above inputs "
                    f"{'n/a' if peak is None else f'{peak / GB:.2f} GB'}, {row['ms_median']:.1f} ms, "
                    f"loss {row['loss']:.8g} ({row['process_s']:.1f} s)",
                    flush=True,
                )

    # ---- checks ----
    checks = []
    for row in rows:
        checks.append(
            {
                "check": f"{row['dtype']} {row['method']}: measured, loss finite",
                "passed": "error" not in row and row["loss"] == row["loss"] and abs(row["loss"]) != float("inf"),
                **({"error": row["error"]} if "error" in row else {}),
            }
        )
    for dtype_name in dtypes:
        by_method = {row["method"]: row for row in rows if row["dtype"] == dtype_name and "error" not in row}
        naive = by_method.get("naive")
        for method in ("chunked", "fused"):
            row = by_method.get(method)
            if naive is None or row is None:
                continue
            row["loss_rel_diff_vs_naive"] = rel_diff(row["loss"], naive["loss"])
            row["kd_sum_rel_diff_vs_naive"] = rel_diff(row["kd_sum"], naive["kd_sum"])
            row["ce_sum_rel_diff_vs_naive"] = rel_diff(row["ce_sum"], naive["ce_sum"])
            row["grad_norm_rel_diff_vs_naive"] = {
                key: rel_diff(row["grad_norms"][key], naive["grad_norms"][key]) for key in ("hidden", "weight")
            }
            checks.append(
                {
                    "check": f"{dtype_name}: {method} loss vs naive",
                    "passed": row["loss_rel_diff_vs_naive"] <= LOSS_RTOL[dtype_name],
                    "rel_diff": row["loss_rel_diff_vs_naive"],
                    "rtol": LOSS_RTOL[dtype_name],
                }
            )

    # ---- report ----
    print()
    print(
        f"Loss alone, forward + backward, N = {options.rows}, H = {options.hidden}, V = {options.vocab}, T = "
        f"{options.temperature:g}, forward KL + label CE (weights 0.5 / 0.5), on {options.device}. Peak: memory "
        f"allocated above the inputs; one float32 [N, V] tensor = {nv_float32_bytes / GB:.2f} GB."
    )
    print()
    print(
        "| inputs | method | peak above inputs (GB) | × float32 [N, V] | ms per fwd+bwd (median) | loss / row "
        "| loss rel. diff vs naive | grad-norm rel. diff vs naive (h / W) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['dtype']} | {row['method']} | failed | | | | | |")
            continue
        peak = row["peak_above_inputs_bytes"]
        memory = (
            ("n/a", "n/a") if peak is None else (f"{peak / GB:.2f}", f"{row['peak_above_inputs_in_nv_float32']:.2f}")
        )
        if "loss_rel_diff_vs_naive" in row:
            loss_diff = f"{row['loss_rel_diff_vs_naive']:.1e}"
            grads = row["grad_norm_rel_diff_vs_naive"]
            grad_diff = f"{grads['hidden']:.1e} / {grads['weight']:.1e}"
        else:
            loss_diff = grad_diff = "—"
        print(
            f"| {row['dtype']} | {row['method']} | {memory[0]} | {memory[1]} | {row['ms_median']:.1f} | "
            f"{row['loss'] / row['rows']:.6f} | {loss_diff} | {grad_diff} |"
        )
    print()
    print("| check | passed | detail |")
    print("|---|---|---|")
    for item in checks:
        detail = {k: v for k, v in item.items() if k not in ("check", "passed")}
        print(f"| {item['check']} | {'yes' if item['passed'] else '**NO**'} | {json.dumps(detail)[:300]} |")
    failed = [item["check"] for item in checks if not item["passed"]]
    total = time.perf_counter() - started
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; total {total:.1f} s")

    measured = next((row for row in rows if "error" not in row), {})
    report = {
        "meta": {
            "device": options.device,
            "gpu": measured.get("gpu"),
            "torch": measured.get("torch"),
            "cuda": measured.get("cuda"),
            "tf32_matmul": measured.get("tf32_matmul"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "args": {k: v for k, v in vars(options).items() if k != "worker"},
            "nv_float32_bytes": nv_float32_bytes,
            "liger_reference": LIGER_REFERENCE,
        },
        "rows": rows,
        "checks": checks,
        "failed": failed,
        "total_s": total,
    }
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    with open(options.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {options.output}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
