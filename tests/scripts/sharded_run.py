"""Trains a tiny student from a sharded teacher and writes what tests/test_sharded_teacher.py compares to
`<output_dir>/result.json`.

    python sharded_run.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE MODE

MODE:
  fsdp2-teacher  under `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1: the student in DDP
                 over gloo, the teacher sharded with FSDP2's `fully_shard` (`shard_teacher=True`).
  fsdp2          the same launch, with `fsdp=True, fsdp_config={"version": 2}`: the student sharded by accelerate's
                 FSDP2 plugin, the teacher by `fully_shard` (the default `shard_teacher=None`). accelerate 1.15 enables
                 FSDP only for GPU-type distributed types, never MULTI_CPU (`fsdp=True` on CPU silently trains in
                 DDP), so this mode relabels the CPU state MULTI_GPU before anything reads it: the only change made
                 to the libraries' behaviour. Everything else (the plugin, `fully_shard` of the student, Trainer's
                 FSDP checkpointing) is accelerate's and transformers' own code, on gloo.
  zero3          under `accelerate launch --use_deepspeed --num_processes 2` with DS_ACCELERATOR=cpu: DeepSpeed ZeRO-3
                 over gloo, the teacher in a DeepSpeed inference engine. Two changes for CPU, both below: accelerate's
                 state is built with backend="gloo", and DeepSpeed's compiled shared-memory all-reduce is not used.
  plain          one process, no sharding, twice the per-device batch (the same global batch).
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState


output_dir, per_device_batch_size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
extra = {"use_cpu": True}
if mode == "fsdp2-teacher":
    extra["shard_teacher"] = True
elif mode == "fsdp2":
    from accelerate.utils import DistributedType

    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU  # see the docstring
    extra.update(fsdp=True, fsdp_config={"version": 2}, accelerator_config={"use_configured_state": True})
elif mode == "zero3":
    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (C++) at its first use: ~70 s on a fresh
    # machine, and a compiler needed. It only speeds up CPU collectives; without it DeepSpeed uses gloo's.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # accelerate 1.15 never gives DeepSpeed a backend on a machine without an accelerator it knows: its state would
    # say "1 process" while DeepSpeed runs 2 (each process would then train on the whole dataset). Building the
    # state first with backend="gloo" (the documented `use_configured_state` route) makes both agree on 2.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    extra = {
        "use_cpu": False,
        "accelerator_config": {"use_configured_state": True},
        "deepspeed": {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3},
        },
    }
elif mode != "plain":
    raise SystemExit(f"unknown mode {mode!r}")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TASKS, causal_lm_dataset, seeded  # noqa: E402

import hf_distill  # noqa: E402
from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402


student_factory, teacher_factory, _ = TASKS["causal_lm"]
args = DistillationTrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=per_device_batch_size,
    per_device_eval_batch_size=per_device_batch_size,
    max_steps=5,
    logging_steps=1,
    save_strategy="steps",
    save_steps=5,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    report_to=[],
    disable_tqdm=True,
    seed=0,
    temperature=2.0,
    alpha=0.5,
    **extra,
)
student = seeded(student_factory, 0)
teacher = seeded(teacher_factory, 1)
teacher_numel = sum(p.numel() for p in teacher.parameters())
student_numel = sum(p.numel() for p in student.parameters())
trainer = DistillationTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=causal_lm_dataset(n=64, ragged=True),
    eval_dataset=causal_lm_dataset(n=16, seed=1),  # equal lengths: the mean of batch means is the global mean
)
trainer.train()
metrics = trainer.evaluate()
# The sharded teacher evaluated in the student's place (not under DeepSpeed: the side trainer's fresh accelerate
# state would be the 1-process one this CPU harness works around above).
teacher_metrics = trainer.evaluate_teacher() if mode != "zero3" else {"eval_loss": None}

# What each process holds of the teacher after training, and what its optimizer holds.
placed = trainer.teacher_model
teacher_module = getattr(placed, "module", placed)  # a DeepSpeed engine wraps the module
local_teacher_numel, resident_teacher_numel, all_resharded = 0, 0, True
if mode in ("fsdp2-teacher", "fsdp2"):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for parameter in teacher_module.parameters():
        all_resharded &= isinstance(parameter, DTensor)  # unsharded parameters are plain tensors
        local_teacher_numel += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    resident_teacher_numel = local_teacher_numel
    sharded_modules = [type(m).__name__ for m in teacher_module.modules() if isinstance(m, FSDPModule)]
elif mode == "zero3":
    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op (C++) at its first use: ~70 s on a fresh
    # machine, and a compiler needed. It only speeds up CPU collectives; without it DeepSpeed uses gloo's.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for parameter in teacher_module.parameters():
        local_teacher_numel += parameter.ds_tensor.numel()
        # ZeRO-3 keeps parameters under `stage3_param_persistence_threshold` gathered on every process.
        resident_teacher_numel += parameter.ds_tensor.numel() + parameter.numel()
    sharded_modules = []
else:
    local_teacher_numel = resident_teacher_numel = sum(p.numel() for p in teacher_module.parameters())
    sharded_modules = []
teacher_ids = {id(p) for p in teacher_module.parameters()}
optimizer_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
if mode == "zero3":  # ZeRO-3 optimizes this process's fp32 partition of what it was given: the student's, or more
    optimized = trainer.model_wrapped.optimizer.fp32_partitioned_groups_flat
else:  # this process's part of the parameters the optimizer updates (a shard each under FSDP2)
    optimized = [p.to_local() if hasattr(p, "to_local") else p for p in optimizer_params]
per_process = {
    "local_teacher_numel": local_teacher_numel,
    "resident_teacher_numel": resident_teacher_numel,
    "all_resharded": all_resharded,
    "optimizer_numel": sum(p.numel() for p in optimized),
    "teacher_in_optimizer": any(id(p) in teacher_ids for p in optimizer_params),
    # DeepSpeed gives an engine built without an optimizer its parameter manager (`DeepSpeedZeRoOffload`) instead.
    "teacher_engine_optimizer": type(getattr(placed, "optimizer", None)).__name__,
}
if dist.is_initialized():
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_process)
else:
    gathered = [per_process]

if trainer.is_world_process_zero():
    logs = [h for h in trainer.state.log_history if "loss" in h]
    Path(output_dir, "result.json").write_text(
        json.dumps(
            {
                "hf_distill": hf_distill.__file__,
                "world_size": trainer.args.world_size,
                "num_processes": trainer.accelerator.num_processes,
                "deepspeed": trainer.is_deepspeed_enabled,
                "fsdp": trainer.is_fsdp_enabled,
                "teacher_type": type(placed).__name__,
                "student_wrapped": type(trainer.model_wrapped).__name__,
                "sharded_modules": sharded_modules,
                "teacher_numel": teacher_numel,
                "student_numel": student_numel,
                "per_process": gathered,
                "optimizer_has_state_for": len(trainer.optimizer.state),
                "losses": [h["loss"] for h in logs],
                "loss_kd": [h["loss_kd"] for h in logs],
                "eval_loss": metrics["eval_loss"],
                "eval_loss_kd": metrics["eval_loss_kd"],
                "teacher_eval_loss": teacher_metrics["eval_loss"],
            }
        )
    )

# A gloo process (torch 2.13, CPU) sometimes aborts in interpreter shutdown, after all its work: "terminate called
# without an active exception", no Python frame. Seen in 3 of 35 plain DDP runs of tests/scripts/distributed_run.py
# (with and without deepspeed installed) and in about 1 run in 10 here. Finish together, then leave without the
# interpreter's shutdown.
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
