"""Check a sharded teacher on one CUDA GPU: FSDP2 (accelerate's plugin, unmodified) and DeepSpeed ZeRO-3 with offload.

One command, expected to take about 3 minutes on one GPU (six short training runs, each in its own process; not run
on a GPU yet):

    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu/check_sharded.py --output $OUT/sharded_check.json

What the CPU test suite (tests/test_sharded_teacher.py) could not run as users run it, and this does:

* FSDP2 through `fsdp=True, fsdp_config={"version": 2}` with accelerate's own gate (on CPU accelerate never enables
  FSDP: the suite relabels its state), on CUDA/NCCL, in fp32 and bf16 (accelerate's FSDP2 mixed-precision policy);
* DeepSpeed ZeRO-3 as `TrainingArguments(deepspeed=...)` sets it up on a GPU (on CPU the suite builds accelerate's
  state itself), bf16 and fp32, with `offload_param` to the CPU. Skipped, and reported, when deepspeed is missing.

Each run trains a GPT-2 student (2 layers × 128) from a GPT-2 teacher (4 × 256, vocabulary 8192) on random token
rows (ragged, padding labelled -100), 10 optimizer steps of 16 rows, AdamW, T = 2, alpha = 0.9, saving a checkpoint
at the last step, under `torchrun --standalone --nproc_per_node 1`. Checks (one process: "sharded" means the teacher
is held as FSDP2 shards or ZeRO-3 partitions, not that it is split in halves; halves are checked on CPU):

* FSDP2: student and teacher are FSDP2 modules; every teacher parameter is a DTensor after training (resharded after
  each forward, the root too); the optimizer holds the student's parameters only (state for as many tensors as the
  student has); the checkpoint's weights and optimizer name the student's parameters only;
* ZeRO-3: the teacher is a DeepSpeed engine whose "optimizer" is DeepSpeed's parameter manager (no fp32 copy, no
  optimizer state); its partitions (`ds_tensor`) live on the CPU (offload) and its GPU parameters are released after
  training; the student's fp32 partitions add up to the student; the checkpoint names the student's parameters only;
* losses: each logged `loss` equals the plain run's (no FSDP/DeepSpeed, same precision) to rtol 1e-5 in fp32 and 1e-3
  in bf16 (FSDP2 in bf16: 1e-2, see `RTOL_FSDP2_BF16`).

`--device cpu` is a smoke mode (gloo, with the CPU suite's two workarounds): it catches typos before a GPU run and
verifies nothing new. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


STEPS = 10
BATCH = 16
SEQ_LEN = 64
VOCAB = 8192
RUNS = [  # (name, worker, precision)
    ("plain_fp32", "plain", "fp32"),
    ("fsdp2_fp32", "fsdp2", "fp32"),
    ("zero3_fp32", "zero3", "fp32"),
    ("plain_bf16", "plain", "bf16"),
    ("fsdp2_bf16", "fsdp2", "bf16"),
    ("zero3_bf16", "zero3", "bf16"),
]
# bf16: ZeRO-3 and plain runs both use autocast over fp32 weights (1e-3). FSDP2's mixed-precision policy instead casts
# the student's weights to bf16 for its whole forward: other arithmetic, so a looser 1e-2 (the CPU smoke run: 5.2e-3).
RTOL = {"fp32": 1e-5, "bf16": 1e-3}
RTOL_FSDP2_BF16 = 1e-2


# ---- the worker: one training run, in its own process ----


def worker(kind: str, precision: str, device: str, output_dir: str) -> None:
    import torch
    import transformers
    from accelerate import PartialState
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    transformers.logging.set_verbosity_error()
    extra = {"use_cpu": device == "cpu"}
    if kind == "fsdp2":
        extra.update(fsdp=True, fsdp_config={"version": 2})
        if device == "cpu":  # smoke mode only: accelerate enables FSDP for GPU-type states alone
            from accelerate.utils import DistributedType

            PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
            extra["accelerator_config"] = {"use_configured_state": True}
    elif kind == "zero3":
        extra["deepspeed"] = {
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
        }
        if device == "cpu":  # smoke mode only: give DeepSpeed's accelerate state a backend (see the CPU suite)
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            PartialState(backend="gloo")
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
            extra.update(use_cpu=False, accelerator_config={"use_configured_state": True})

    def gpt2(layers, width, heads, seed):
        torch.manual_seed(seed)
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

    import datasets

    g = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    attention = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    data = datasets.Dataset.from_dict(
        {
            "input_ids": ids.masked_fill(attention == 0, 0).tolist(),
            "attention_mask": attention.tolist(),
            "labels": ids.masked_fill(attention == 0, -100).tolist(),
        }
    )
    student, teacher = gpt2(2, 128, 2, 0), gpt2(4, 256, 4, 1)
    student_shapes = {name: list(t.shape) for name, t in student.state_dict().items()}
    student_numel = sum(p.numel() for p in student.parameters())
    student_tensors = len(list(student.parameters()))
    teacher_numel = sum(p.numel() for p in teacher.parameters())
    args = DistillationTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        learning_rate=5e-4,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        temperature=2.0,
        alpha=0.9,
        bf16=precision == "bf16",
        kd_fuse_lm_head=False,  # FSDP/DeepSpeed runs cannot fuse the head: the plain runs compare like with like
        **extra,
    )
    seen_dtypes = set()  # the dtype of the teacher's logits layer output: autocast reached it, or not
    teacher.lm_head.register_forward_hook(lambda module, inputs, output: seen_dtypes.add(str(output.dtype)))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()

    placed = trainer.teacher_model
    module = getattr(placed, "module", placed)
    record = {
        "kind": kind,
        "precision": precision,
        "world_size": trainer.args.world_size,
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "deepspeed_enabled": trainer.is_deepspeed_enabled,
        "student_wrapped": type(trainer.model_wrapped).__name__,
        "teacher_type": type(placed).__name__,
        "teacher_numel": teacher_numel,
        "student_numel": student_numel,
        "student_tensors": student_tensors,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "teacher_lm_head_output_dtypes": sorted(seen_dtypes),
    }
    teacher_ids = {id(p) for p in module.parameters()}
    optimizer_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    record["teacher_in_optimizer"] = any(id(p) in teacher_ids for p in optimizer_params)
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        record["student_is_fsdp2"] = isinstance(trainer.model_wrapped, FSDPModule)
        record["teacher_fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in module.modules())
        record["teacher_all_dtensor"] = all(isinstance(p, DTensor) for p in module.parameters())
        record["teacher_local_numel"] = sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters()
        )
        record["optimizer_state_tensors"] = len(trainer.optimizer.state)
    elif kind == "zero3":
        record["teacher_engine_optimizer"] = type(getattr(placed, "optimizer", None)).__name__
        record["teacher_partition_numel"] = sum(p.ds_tensor.numel() for p in module.parameters())
        record["teacher_partition_devices"] = sorted({str(p.ds_tensor.device.type) for p in module.parameters()})
        record["teacher_partition_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in module.parameters()})
        record["teacher_resident_numel"] = sum(p.numel() for p in module.parameters())
        record["student_fp32_partition_numel"] = sum(
            t.numel() for t in trainer.model_wrapped.optimizer.fp32_partitioned_groups_flat
        )

    # The checkpoint: every parameter name and shape it stores must be the student's.
    checkpoint = Path(output_dir) / f"checkpoint-{STEPS}"
    record["checkpoint_files"] = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    foreign = []
    for path in checkpoint.rglob("*"):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            names = {name: list(t.shape) for name, t in load_file(path).items()}
        elif path.name.startswith("pytorch_model_fsdp") and path.suffix == ".bin":
            names = {name: list(t.shape) for name, t in torch.load(path, weights_only=True).items()}
        elif path.name.endswith("model_states.pt"):
            states = torch.load(path, weights_only=False)
            names = {name: list(shape) for group in states["param_shapes"] for name, shape in group.items()}
        elif path.name.startswith("optimizer") and path.suffix == ".bin":
            saved = torch.load(path, weights_only=True)
            names = {name: None for group in saved["param_groups"] for name in group["params"]}
        elif path.name.endswith("optim_states.pt"):  # ZeRO: flat fp32 partitions, no names
            flat = torch.load(path, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
            record["checkpoint_fp32_numel"] = sum(t.numel() for t in flat)
            continue
        else:
            continue
        for name, shape in names.items():
            if name not in student_shapes or (shape is not None and shape != student_shapes[name]):
                foreign.append(f"{path.name}:{name}")
    record["checkpoint_foreign_entries"] = foreign
    Path(output_dir, "record.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- the driver: runs the workers, then checks ----


def launch(name, kind, precision, device, scratch):
    output_dir = os.path.join(scratch, name)
    command = [sys.executable]
    if kind != "plain":
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += [os.path.abspath(__file__), "--worker", kind, "--precision", precision, "--device", device]
    command += ["--worker_output", output_dir]
    env = dict(os.environ)
    if device == "cpu":
        env.update(ACCELERATE_USE_CPU="1" if kind != "zero3" else "0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # the launcher and its workers, so that none keeps the GPU
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0] + "\n[timed out after 150 s]"
    seconds = round(time.perf_counter() - started, 1)
    record_path = Path(output_dir, "record.json")
    if not record_path.exists():
        return {"error": output[-3000:], "seconds": seconds}
    # The record is written after all the work; an exit code other than 0 after it is recorded, not checked.
    return {**json.loads(record_path.read_text()), "seconds": seconds, "exit_code": process.returncode}


def max_rel_diff(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def checks_for(name, record, plain):
    checks = []

    def check(what, ok, detail=""):
        checks.append({"run": name, "check": what, "passed": bool(ok), "detail": detail})

    if "error" in record:
        check("ran", False, record["error"])
        return checks
    kind, precision = record["kind"], record["precision"]
    if plain is not None and "losses" in plain:
        same_length = len(record["losses"]) == len(plain["losses"]) == STEPS
        diff = max_rel_diff(record["losses"], plain["losses"]) if same_length else float("inf")
        rtol = RTOL_FSDP2_BF16 if (kind, precision) == ("fsdp2", "bf16") else RTOL[precision]
        check(f"losses equal the plain {precision} run (rtol {rtol:g})", diff <= rtol, f"{diff:.2e}")
    check("teacher not in the optimizer's parameters", not record["teacher_in_optimizer"])
    foreign = record["checkpoint_foreign_entries"]
    check("checkpoint holds the student's parameters only", not foreign, ", ".join(foreign[:5]))
    if kind == "fsdp2":
        check(
            "accelerate enabled FSDP, student is an FSDP2 module",
            record["fsdp_enabled"] and record["student_is_fsdp2"],
        )
        check("teacher sharded with fully_shard: root + 4 blocks", record["teacher_fsdp_modules"] == 5)
        check("teacher resharded after training (all DTensor)", record["teacher_all_dtensor"])
        check(
            "optimizer state for the student's tensors only",
            record["optimizer_state_tensors"] == record["student_tensors"],
            f"{record['optimizer_state_tensors']} of {record['student_tensors']}",
        )
    elif kind == "zero3":
        check(
            "DeepSpeed enabled, teacher is a DeepSpeed engine",
            record["deepspeed_enabled"] and record["teacher_type"] == "DeepSpeedEngine",
        )
        check("teacher engine has no optimizer", record["teacher_engine_optimizer"] == "DeepSpeedZeRoOffload")
        check(
            "teacher partitions offloaded to the CPU",
            record["teacher_partition_devices"] == ["cpu"],
            str(record["teacher_partition_devices"]),
        )
        check(
            "teacher partitions cover the teacher once (1 process)",
            record["teacher_partition_numel"] == record["teacher_numel"],
            f"{record['teacher_partition_numel']} of {record['teacher_numel']}",
        )
        check(
            "teacher's gathered parameters released (below the persistence threshold only)",
            record["teacher_resident_numel"] < 0.1 * record["teacher_numel"],
            f"{record['teacher_resident_numel']} of {record['teacher_numel']}",
        )
        check(
            "student's fp32 partitions (in memory and in the checkpoint) are the student",
            record["student_fp32_partition_numel"] == record["student_numel"] == record.get("checkpoint_fp32_numel"),
            f"{record['student_fp32_partition_numel']}, {record.get('checkpoint_fp32_numel')} of {record['student_numel']}",
        )
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    default_output = (
        os.path.join(os.environ["OUT"], "sharded_check.json") if os.environ.get("OUT") else "sharded_check.json"
    )
    parser.add_argument("--output", default=default_output)
    parser.add_argument("--worker", choices=["plain", "fsdp2", "zero3"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker(options.worker, options.precision, options.device, options.worker_output)
        return

    import torch
    import transformers

    if options.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu for the smoke mode)")
    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = None
    meta = {
        "device": options.device,
        "gpu": torch.cuda.get_device_name(0) if options.device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": __import__("accelerate").__version__,
        "deepspeed": deepspeed_version,
        "python": platform.python_version(),
    }
    print(json.dumps(meta), flush=True)
    started = time.perf_counter()
    records, checks = {}, []
    with tempfile.TemporaryDirectory(prefix="hf-distill-sharded-check-") as scratch:
        for name, kind, precision in RUNS:
            if kind == "zero3" and deepspeed_version is None:
                records[name] = {"skipped": "deepspeed is not installed"}
                checks.append({"run": name, "check": "ran", "passed": False, "detail": "deepspeed is not installed"})
                print(f"{name}: skipped (deepspeed is not installed)", flush=True)
                continue
            if (kind, precision, options.device) == ("zero3", "bf16", "cpu"):
                records[name] = {"skipped": "smoke mode: transformers refuses bf16 with DeepSpeed without a GPU"}
                print(f"{name}: skipped in the smoke mode", flush=True)
                continue
            records[name] = launch(name, kind, precision, options.device, scratch)
            run_checks = checks_for(
                name, records[name], records.get(f"plain_{precision}") if kind != "plain" else None
            )
            checks += run_checks
            failed = [c["check"] for c in run_checks if not c["passed"]]
            print(
                f"{name}: {records[name]['seconds']} s, {'FAILED: ' + '; '.join(failed) if failed else 'ok'}",
                flush=True,
            )
    seconds = round(time.perf_counter() - started, 1)
    passed = sum(c["passed"] for c in checks)
    print(f"\n{passed} of {len(checks)} checks passed in {seconds} s", flush=True)
    for c in checks:
        print(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['run']}: {c['check']} {c['detail']}".rstrip(), flush=True)
    Path(options.output).write_text(
        json.dumps({"meta": meta, "seconds": seconds, "runs": records, "checks": checks}, indent=1)
    )
    sys.exit(0 if passed == len(checks) else 1)


if __name__ == "__main__":
    main()
