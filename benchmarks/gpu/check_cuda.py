"""Check `DistillationTrainer` on CUDA: fp32 / bf16 / fp16, the naive, chunked and fused KD paths, float64 at high T,
caches.

One command, a few minutes on one GPU (most of it imports and CUDA start-up; the runs themselves take seconds):

    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu/check_cuda.py --output $OUT/cuda_check.json

Models are built from configs (random weights, dropout 0, eager attention), data is random token ids built in memory
with `datasets.Dataset.from_dict` (rows right-padded to random lengths, padding labelled -100):

* causal LM: GPT-2 teacher 4 layers × 256, student 2 × 128, vocabulary 8192, 64 tokens per row;
* sequence classification: BERT teacher 4 layers × 256, student 2 × 128, vocabulary 8192, 4 labels.

Every run: same seeds, same data order, batch 16, AdamW lr 5e-4, `logging_steps=1` (every step's `loss`, `loss_kd`,
`loss_ce` is logged), T = 2, alpha = 0.9, KL, unless its name says otherwise. A GPT-2 step has 16 × 63 × 8192 ≈ 8.3M
student logits, above `FUSED_LM_HEAD_THRESHOLD` (6 * 2**20), where `kd_fuse_lm_head=None` (the default) would take the
fused lm_head path (`hf_distill.fused`). So every run sets `kd_fuse_lm_head` explicitly: False, except the GPT-2
"fused" runs (True, one per precision). What each run records:

* the logged losses (all finite?);
* the output dtypes of one teacher `nn.Linear` (a forward hook): under autocast they are bf16/fp16;
* the dtype the KD divergence is computed in (the tensors the registered divergence receives, its closed form's
  workspace on the chunked and fused paths, and the returned KD sum): float32, float64 above T = 20;
* the fused path: how often the trainer called `fused_linear_distillation_loss` (once per step in the fused runs,
  never in the others), whether the trainer's first-batch head check passed for student and teacher
  (`trainer._fused_heads_checked`), and the dtypes of the logits the fused loss forms per chunk
  (`hf_distill.fused._head`) and hands to the divergence (`divergence_and_student_gradient` as `hf_distill.fused`
  imports it): float32 in every precision;
* time per optimizer step, CUDA-synchronised at `on_step_begin` / `on_step_end`, median after the first 5 steps.

Checks (thresholds in the JSON): bf16/fp16 first-step and final loss against fp32 (naive); the naive
(`kd_chunk_size=0`) and chunked (`kd_chunk_size=64`) paths give the same logged losses (rtol 1e-5) in fp32 at T = 2 and
at T = 50 (float64); the fused path (`kd_fuse_lm_head=True`, default chunk size: 256 rows at V = 8192) gives the naive
path's logged losses (rtol 1e-5) in fp32, ran on every step, and formed float32 logits in every precision;
`precompute_teacher_logits(..., dtype="float32")` on the GPU, then training from the cache without a teacher, logs the
same losses as online KD (rtol 1e-5). fp32 runs use `torch.use_deterministic_algorithms(True, warn_only=True)` so that
two runs differ only by what they are meant to.

`--device cpu --steps 3` is a smoke mode for machines without a GPU (fp16 skipped, bf16 as CPU autocast).
The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time


os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS; before CUDA starts

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    TrainerCallback,
)

import hf_distill  # noqa: E402
from hf_distill import DistillationTrainer, DistillationTrainingArguments, precompute_teacher_logits  # noqa: E402
from hf_distill import chunked as hf_chunked  # noqa: E402
from hf_distill import divergences as hf_divergences  # noqa: E402
from hf_distill import fused as hf_fused  # noqa: E402
from hf_distill import losses as hf_losses  # noqa: E402
from hf_distill import trainer as hf_trainer  # noqa: E402


VOCAB = 8192
SEQ_LEN = 64
NUM_LABELS = 4
BATCH = 16
LOSS_KEYS = ("loss", "loss_kd", "loss_ce")

# ---- what the hooks saw during the current run ----

SEEN: dict[str, set] = {}
CALLS = {"fused_loss": 0}


def reset_seen():
    SEEN.clear()
    SEEN.update(
        teacher_linear=set(),
        compute_dtype=set(),
        divergence_input=set(),
        closed_form_workspace=set(),
        kd_sum=set(),
        student_logits=set(),
        fused_logits=set(),
        fused_divergence_input=set(),
    )
    CALLS["fused_loss"] = 0


def note(key, value):
    SEEN[key].add(str(value).replace("torch.", ""))


def install_dtype_probes():
    """Record the KD compute dtype: `compute_dtype`'s answer, what the divergence's value/closed form receive."""
    original_compute_dtype = hf_divergences.compute_dtype

    def compute_dtype(temperature, device):
        dtype = original_compute_dtype(temperature, device)
        note("compute_dtype", dtype)
        return dtype

    hf_losses.compute_dtype = compute_dtype
    hf_chunked.compute_dtype = compute_dtype

    kl = hf_divergences.DISTILLATION_LOSSES["kl"]

    @functools.wraps(kl.value)
    def value(student_logits, teacher_logits, temperature, **options):
        note("divergence_input", student_logits.dtype)
        note("divergence_input", teacher_logits.dtype)
        return kl.value(student_logits, teacher_logits, temperature, **options)

    closed_form = kl.value_and_gradient
    if closed_form is not None:

        @functools.wraps(closed_form)
        def value_and_gradient(student_logits, teacher_logits, temperature, workspace, gradient_out, **options):
            note("closed_form_workspace", workspace[0].dtype)
            return closed_form(student_logits, teacher_logits, temperature, workspace, gradient_out, **options)

    else:
        value_and_gradient = None
    hf_divergences.DISTILLATION_LOSSES["kl"] = dataclasses.replace(
        kl, value=value, value_and_gradient=value_and_gradient
    )


def install_fused_probes():
    """Count the trainer's calls of the fused loss; record the dtypes of the logits it forms and compares."""
    original_loss = hf_trainer.fused_linear_distillation_loss
    original_head = hf_fused._head
    original_divergence = hf_fused.divergence_and_student_gradient

    @functools.wraps(original_loss)
    def fused_linear_distillation_loss(*args, **kwargs):
        CALLS["fused_loss"] += 1
        return original_loss(*args, **kwargs)

    @functools.wraps(original_head)
    def head(*args, **kwargs):
        logits, derivative = original_head(*args, **kwargs)
        note("fused_logits", logits.dtype)
        return logits, derivative

    @functools.wraps(original_divergence)
    def divergence_and_student_gradient(student_logits, teacher_logits, **kwargs):
        note("fused_divergence_input", student_logits.dtype)
        note("fused_divergence_input", teacher_logits.dtype)
        return original_divergence(student_logits, teacher_logits, **kwargs)

    hf_trainer.fused_linear_distillation_loss = fused_linear_distillation_loss
    hf_fused._head = head
    hf_fused.divergence_and_student_gradient = divergence_and_student_gradient


class StepTimer(TrainerCallback):
    def __init__(self, device):
        self.device = device
        self.times: list[float] = []
        self._start = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


# ---- models and data ----


def seeded(factory, seed):
    torch.manual_seed(seed)
    return factory()


def gpt2(layers, width, heads):
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    return model


def bert(layers, width, heads):
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=SEQ_LEN,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    model.set_attn_implementation("eager")
    return model


TASKS = {
    # name: (student factory, teacher factory, one teacher nn.Linear to hook)
    "gpt2": (lambda: gpt2(2, 128, 2), lambda: gpt2(4, 256, 4), lambda t: t.lm_head),
    "bert": (lambda: bert(2, 128, 2), lambda: bert(4, 256, 4), lambda t: t.bert.encoder.layer[0].attention.self.query),
}


def token_rows(n, seed, task):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    attention = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attention == 0, 0)
    columns = {"input_ids": ids.tolist(), "attention_mask": attention.tolist()}
    if task == "gpt2":
        columns["labels"] = ids.masked_fill(attention == 0, -100).tolist()
    else:
        columns["labels"] = torch.randint(0, NUM_LABELS, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict(columns)


# ---- one training run ----


def run(name, task, dataset, device, steps, precision="fp32", teacher=True, kd_fuse_lm_head=False, **overrides):
    student_factory, teacher_factory, linear_of = TASKS[task]
    overrides = {"kd_fuse_lm_head": kd_fuse_lm_head, **overrides}
    reset_seen()
    student = seeded(student_factory, 0)
    teacher_model = seeded(teacher_factory, 1) if teacher else None
    handle = None
    if teacher_model is not None:
        handle = linear_of(teacher_model).register_forward_hook(
            lambda module, inputs, output: note("teacher_linear", output.dtype)
        )
    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=5e-4,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            data_seed=0,
            use_cpu=device.type == "cpu",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            dataloader_num_workers=0,
            **{"temperature": 2.0, "alpha": 0.9, **overrides},
        )
        timer = StepTimer(device)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher_model, args=args, train_dataset=dataset, callbacks=[timer]
        )
        original_kd_sum = trainer._kd_sum

        def kd_sum(student_logits, teacher_logits, mask, temperature):
            note("student_logits", student_logits.dtype)
            result = original_kd_sum(student_logits, teacher_logits, mask, temperature)
            note("kd_sum", result.dtype)
            return result

        trainer._kd_sum = kd_sum
        trainer.remove_callback(PrinterCallback)  # the table at the end says it all
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    if handle is not None:
        handle.remove()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    losses = {key: [entry[key] for entry in logs] for key in LOSS_KEYS}
    timed = timer.times[5:] if len(timer.times) > 6 else timer.times
    result = {
        "name": name,
        "task": task,
        "precision": precision,
        "steps": len(logs),
        "settings": {k: v for k, v in overrides.items()},
        "teacher": "online" if teacher else "cached (no teacher model)",
        "losses": losses,
        "first_loss": losses["loss"][0],
        "final_loss": losses["loss"][-1],
        "all_finite": all(math.isfinite(v) for values in losses.values() for v in values),
        "dtypes": {key: sorted(values) for key, values in SEEN.items()},
        "step_ms_median": 1000 * statistics.median(timed),
        "step_ms_min": 1000 * min(timed),
        "wall_s": wall,
        "device_of_student": str(next(trainer.model.parameters()).device),
        "device_of_teacher": str(next(trainer.teacher_model.parameters()).device) if teacher else None,
        "fused_loss_calls": CALLS["fused_loss"],
        "fused_heads_checked": dict(trainer._fused_heads_checked),
    }
    print(
        f"  {name:<28} loss {result['first_loss']:.5f} -> {result['final_loss']:.5f}  "
        f"{result['step_ms_median']:.1f} ms/step  teacher linear {result['dtypes']['teacher_linear']}  "
        f"KD computed in {result['dtypes']['compute_dtype']}  fused loss calls {result['fused_loss_calls']}",
        flush=True,
    )
    return result


# ---- checks ----

CHECKS: list[dict] = []


def check(name, passed, **details):
    CHECKS.append({"check": name, "passed": bool(passed), **details})


def max_rel_diff(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def check_same_losses(name, run_a, run_b, rtol):
    worst = {key: max_rel_diff(run_a["losses"][key], run_b["losses"][key]) for key in LOSS_KEYS}
    same_length = all(len(run_a["losses"][k]) == len(run_b["losses"][k]) > 0 for k in LOSS_KEYS)
    check(
        name,
        same_length and all(v <= rtol for v in worst.values()),
        rtol=rtol,
        max_rel_diff=worst,
        steps=len(run_a["losses"]["loss"]),
        compared=[run_a["name"], run_b["name"]],
    )


def check_close_to_fp32(run_low, run_fp32, first_rtol, final_rtol):
    first = abs(run_low["first_loss"] - run_fp32["first_loss"]) / abs(run_fp32["first_loss"])
    final = abs(run_low["final_loss"] - run_fp32["final_loss"]) / abs(run_fp32["final_loss"])
    check(f"{run_low['name']}: first-step loss vs fp32", first <= first_rtol, rel_diff=first, rtol=first_rtol)
    check(f"{run_low['name']}: final loss vs fp32", final <= final_rtol, rel_diff=final, rtol=final_rtol)


def check_dtypes(run_result, teacher_dtype, kd_dtype):
    d = run_result["dtypes"]
    if teacher_dtype is not None:
        check(
            f"{run_result['name']}: teacher Linear output is {teacher_dtype}",
            d["teacher_linear"] == [teacher_dtype],
            seen=d["teacher_linear"],
        )
    computed = d["divergence_input"] + d["closed_form_workspace"]
    check(
        f"{run_result['name']}: KD computed in {kd_dtype}",
        d["compute_dtype"] == [kd_dtype]
        and bool(computed)
        and set(computed) <= {kd_dtype, "float32"}
        and (kd_dtype != "float64" or kd_dtype in computed),
        compute_dtype=d["compute_dtype"],
        divergence_input=d["divergence_input"],
        closed_form_workspace=d["closed_form_workspace"],
        kd_sum=d["kd_sum"],
        student_logits=d["student_logits"],
    )


def check_fused_path(run_result):
    """The fused run took the fused path on every step, and its logits were float32 whatever the precision."""
    d = run_result["dtypes"]
    check(
        f"{run_result['name']}: fused path on every step (student and teacher heads checked)",
        run_result["fused_loss_calls"] == run_result["steps"] > 0
        and run_result["fused_heads_checked"] == {"student": True, "teacher": True},
        fused_loss_calls=run_result["fused_loss_calls"],
        steps=run_result["steps"],
        fused_heads_checked=run_result["fused_heads_checked"],
    )
    check(
        f"{run_result['name']}: fused logits and divergence inputs are float32",
        d["fused_logits"] == ["float32"] and d["fused_divergence_input"] == ["float32"],
        fused_logits=d["fused_logits"],
        fused_divergence_input=d["fused_divergence_input"],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache_rows_lm", type=int, default=96, help="rows of the GPT-2 cache check (full logits)")
    default_output = os.path.join(os.environ["OUT"], "cuda_check.json") if os.environ.get("OUT") else "cuda_check.json"
    parser.add_argument("--output", default=default_output)
    options = parser.parse_args()
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu for the smoke mode)")
    started = time.perf_counter()
    torch.use_deterministic_algorithms(True, warn_only=True)
    install_dtype_probes()
    install_fused_probes()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    steps = options.steps
    low_precisions = ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]
    low_dtype = {"bf16": "bfloat16", "fp16": "float16"}
    meta = {
        "device": options.device,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "gpu_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": __import__("accelerate").__version__,
        "hf_distill": hf_distill.__version__,
        "python": platform.python_version(),
        "steps": steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "vocab": VOCAB,
        "fused_lm_head_threshold": hf_trainer.FUSED_LM_HEAD_THRESHOLD,
        "deterministic_algorithms": "torch.use_deterministic_algorithms(True, warn_only=True)",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    print(json.dumps(meta), flush=True)
    runs: dict[str, dict] = {}
    n_rows = BATCH * steps

    # Causal LM: GPT-2 pair.
    print("GPT-2 causal LM (teacher 4x256, student 2x128, V=8192):", flush=True)
    lm_data = token_rows(n_rows, 0, "gpt2")
    runs["gpt2_fp32_naive"] = run("gpt2_fp32_naive", "gpt2", lm_data, device, steps, kd_chunk_size=0)
    runs["gpt2_fp32_chunked"] = run("gpt2_fp32_chunked", "gpt2", lm_data, device, steps, kd_chunk_size=64)
    runs["gpt2_fp32_fused"] = run("gpt2_fp32_fused", "gpt2", lm_data, device, steps, kd_fuse_lm_head=True)
    for precision in low_precisions:
        runs[f"gpt2_{precision}"] = run(
            f"gpt2_{precision}", "gpt2", lm_data, device, steps, precision, kd_chunk_size=0
        )
        runs[f"gpt2_{precision}_chunked"] = run(
            f"gpt2_{precision}_chunked", "gpt2", lm_data, device, steps, precision, kd_chunk_size=64
        )
        runs[f"gpt2_{precision}_fused"] = run(
            f"gpt2_{precision}_fused", "gpt2", lm_data, device, steps, precision, kd_fuse_lm_head=True
        )
    runs["gpt2_fp32_T50_naive"] = run(
        "gpt2_fp32_T50_naive", "gpt2", lm_data, device, steps, kd_chunk_size=0, temperature=50.0
    )
    runs["gpt2_fp32_T50_chunked"] = run(
        "gpt2_fp32_T50_chunked", "gpt2", lm_data, device, steps, kd_chunk_size=64, temperature=50.0
    )
    cache_rows = min(options.cache_rows_lm, n_rows)
    cache_steps = cache_rows // BATCH
    lm_small = lm_data.select(range(cache_rows))
    runs["gpt2_fp32_online_small"] = run(
        "gpt2_fp32_online_small", "gpt2", lm_small, device, cache_steps, kd_chunk_size=0
    )
    t0 = time.perf_counter()
    lm_cache = precompute_teacher_logits(
        seeded(TASKS["gpt2"][1], 1), lm_small, batch_size=BATCH, dtype="float32", device=device
    )
    precompute_lm_s = time.perf_counter() - t0
    runs["gpt2_fp32_cached_small"] = run(
        "gpt2_fp32_cached_small", "gpt2", lm_cache, device, cache_steps, teacher=False, kd_chunk_size=0
    )
    runs["gpt2_fp32_cached_small"]["precompute_s"] = precompute_lm_s

    # Sequence classification: BERT pair.
    print("BERT sequence classification (teacher 4x256, student 2x128, 4 labels):", flush=True)
    cls_data = token_rows(n_rows, 1, "bert")
    runs["bert_fp32"] = run("bert_fp32", "bert", cls_data, device, steps)
    for precision in low_precisions:
        runs[f"bert_{precision}"] = run(f"bert_{precision}", "bert", cls_data, device, steps, precision)
    t0 = time.perf_counter()
    cls_cache = precompute_teacher_logits(
        seeded(TASKS["bert"][1], 1), cls_data, batch_size=BATCH, dtype="float32", device=device
    )
    precompute_cls_s = time.perf_counter() - t0
    runs["bert_fp32_cached"] = run("bert_fp32_cached", "bert", cls_cache, device, steps, teacher=False)
    runs["bert_fp32_cached"]["precompute_s"] = precompute_cls_s

    # ---- checks ----
    for result in runs.values():
        check(f"{result['name']}: all logged losses finite", result["all_finite"], steps=result["steps"])
        check(
            f"{result['name']}: student on {device.type}",
            result["device_of_student"].startswith(device.type),
            device=result["device_of_student"],
        )
        if not result["settings"]["kd_fuse_lm_head"]:
            check(
                f"{result['name']}: kd_fuse_lm_head=False, fused path not taken",
                result["fused_loss_calls"] == 0 and result["fused_heads_checked"] == {},
                fused_loss_calls=result["fused_loss_calls"],
                fused_heads_checked=result["fused_heads_checked"],
            )
    for task in ("gpt2", "bert"):
        fp32 = runs[f"{task}_fp32_naive" if task == "gpt2" else "bert_fp32"]
        check_dtypes(fp32, "float32", "float32")
        for precision in low_precisions:
            names = [f"{task}_{precision}"]
            if task == "gpt2":
                names += [f"{task}_{precision}_chunked", f"{task}_{precision}_fused"]
            for name in names:
                check_dtypes(runs[name], low_dtype[precision], "float32")
                check_close_to_fp32(runs[name], fp32, first_rtol=1e-2, final_rtol=5e-2)
    check_dtypes(runs["gpt2_fp32_chunked"], "float32", "float32")
    check_dtypes(runs["gpt2_fp32_fused"], "float32", "float32")
    for name in ["gpt2_fp32_fused"] + [f"gpt2_{precision}_fused" for precision in low_precisions]:
        check_fused_path(runs[name])
    check_same_losses(
        "gpt2 fp32: naive vs fused lm_head (kd_fuse_lm_head False vs True)",
        runs["gpt2_fp32_fused"],
        runs["gpt2_fp32_naive"],
        rtol=1e-5,
    )
    check_same_losses(
        "gpt2 fp32: naive vs chunked KD (kd_chunk_size 0 vs 64)",
        runs["gpt2_fp32_chunked"],
        runs["gpt2_fp32_naive"],
        rtol=1e-5,
    )
    for name in ("gpt2_fp32_T50_naive", "gpt2_fp32_T50_chunked"):
        check_dtypes(runs[name], "float32", "float64")
    check_same_losses(
        "gpt2 fp32 T=50 (float64 path): naive vs chunked",
        runs["gpt2_fp32_T50_chunked"],
        runs["gpt2_fp32_T50_naive"],
        rtol=1e-5,
    )
    check_same_losses(
        "gpt2 fp32: cached teacher logits (precomputed on device) vs online",
        runs["gpt2_fp32_cached_small"],
        runs["gpt2_fp32_online_small"],
        rtol=1e-5,
    )
    check_same_losses(
        "bert fp32: cached teacher logits (precomputed on device) vs online",
        runs["bert_fp32_cached"],
        runs["bert_fp32"],
        rtol=1e-5,
    )
    naive, chunk = runs["gpt2_fp32_naive"]["step_ms_median"], runs["gpt2_fp32_chunked"]["step_ms_median"]
    fused = runs["gpt2_fp32_fused"]["step_ms_median"]

    # ---- report ----
    print()
    print(
        "| run | precision | KD path | first loss | final loss | rel. diff first / final vs fp32 | teacher Linear out | "
        "KD computed in | ms/step (median) |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|")
    for result in runs.values():
        base = runs["gpt2_fp32_naive" if result["task"] == "gpt2" else "bert_fp32"]
        rel = (
            f"{abs(result['first_loss'] - base['first_loss']) / abs(base['first_loss']):.1e} / "
            f"{abs(result['final_loss'] - base['final_loss']) / abs(base['final_loss']):.1e}"
            if result["precision"] != "fp32"
            else "—"
        )
        if result["settings"]["kd_fuse_lm_head"]:
            path = "fused lm_head"
        else:
            path = {0: "naive", 64: "chunked 64", None: "auto"}.get(result["settings"].get("kd_chunk_size"), "?")
        if result["settings"].get("temperature"):
            path += f", T={result['settings']['temperature']:g}"
        if result["teacher"] != "online":
            path += ", cached teacher"
        print(
            f"| {result['name']} | {result['precision']} | {path} | {result['first_loss']:.5f} | "
            f"{result['final_loss']:.5f} | {rel} | {', '.join(result['dtypes']['teacher_linear']) or '—'} | "
            f"{', '.join(result['dtypes']['compute_dtype'])} | {result['step_ms_median']:.1f} |"
        )
    print()
    print("| check | passed | detail |")
    print("|---|---|---|")
    for item in CHECKS:
        detail = {k: v for k, v in item.items() if k not in ("check", "passed")}
        print(f"| {item['check']} | {'yes' if item['passed'] else '**NO**'} | {json.dumps(detail)} |")
    failed = [c["check"] for c in CHECKS if not c["passed"]]
    print(
        f"\n{len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed; chunked/naive step time (fp32) "
        f"{chunk / naive:.2f}, fused/naive {fused / naive:.2f}; total {time.perf_counter() - started:.1f} s"
    )
    report = {
        "meta": meta,
        "runs": runs,
        "checks": CHECKS,
        "failed": failed,
        "chunked_over_naive_step_time_fp32": chunk / naive,
        "fused_over_naive_step_time_fp32": fused / naive,
        "total_s": time.perf_counter() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    with open(options.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {options.output}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
