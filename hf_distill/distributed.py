"""Placing the frozen teacher in multi-process runs, sharded or not, and what of it has been verified.

`DistillationTrainingArguments.shard_teacher` chooses: None (default) shards the teacher when the student is sharded
(FSDP2, DeepSpeed ZeRO-3) and keeps one full copy per process otherwise; True shards it also when the student is
replicated (DDP: a large teacher, a small student); False keeps one full copy per process always.

| setting | the teacher | verified |
| --- | --- | --- |
| one process, CPU, fp32 or bf16 autocast | moved to the student's device, under the student's autocast | yes, by the test suite |
| DDP, 2 processes over gloo on CPU (`accelerate launch --multi_gpu`) | one full copy per process, never wrapped in DDP | yes, by the test suite |
| DDP student, `shard_teacher=True`, 2 processes over gloo on CPU | FSDP2 `fully_shard` over all processes (each block, then the root; `reshard_after_forward=True`) | yes, by the test suite: half the teacher per process, resharded after each forward, not in the optimizer or checkpoints, losses equal to 1 process |
| FSDP2 student (`fsdp=True`, `fsdp_config={"version": 2}`), 2 processes over gloo on CPU | the same `fully_shard` | yes, by the test suite, with accelerate's state relabelled as a GPU one (accelerate never enables FSDP on CPU: `fsdp=True` there silently trains in DDP); same checks |
| FSDP2 on CUDA (NCCL, bf16 mixed precision) | the same `fully_shard` | no: `benchmarks/gpu/check_sharded.py` is written, not run |
| FSDP1 student with a teacher | refused at construction, recommending FSDP2 | the check is unit-tested; FSDP1 never ran |
| DeepSpeed ZeRO-3, 2 processes over gloo on CPU (`DS_ACCELERATOR=cpu`) | a DeepSpeed inference engine with the student's ZeRO config (no optimizer): partitioned | yes, by the test suite (needs `deepspeed`), with accelerate's state built with `backend="gloo"` (accelerate gives DeepSpeed none on CPU) and DeepSpeed's compiled shared-memory CPU all-reduce off: half the teacher per process, not in the optimizer or checkpoints, losses equal to 1 process without DeepSpeed |
| DeepSpeed ZeRO-3 on CUDA, with `offload_param` | the same engine | no: in `benchmarks/gpu/check_sharded.py`, not run |
| DeepSpeed ZeRO-0/1/2 | the same engine at stage 0: one full copy per process | no |
| `evaluate_teacher()` with a sharded teacher | FSDP2: the sharded teacher in the student's place; DeepSpeed: the engine's module | FSDP2: yes, by the test suite; DeepSpeed: no |
| CUDA fp16/bf16, multi-GPU DDP | the same code path as the DDP rows (accelerate's autocast and DDP) | see `docs/devices.md` |
| `device_map` teacher (`from_pretrained(..., device_map=...)`) | left where accelerate dispatched it | no |

"Verified" means a test or a recorded run exercised it; the rest is written to the libraries' documented behaviour and
kept in this one module so that what is untested is visible in one place.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.utils import logging

from .teachers import ensemble_members


logger = logging.get_logger(__name__)


def _fsdp_version(trainer) -> int:
    return getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)


def _deepspeed_stage(trainer) -> int:
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def teacher_sharding(trainer) -> str | None:
    """How the teacher is placed: "deepspeed" (an inference engine), "fsdp2" (`fully_shard`), or None (one full copy
    per process)."""
    shard = trainer.args.shard_teacher
    if trainer.is_deepspeed_enabled:
        return "deepspeed"
    if trainer.is_fsdp_enabled:
        return None if shard is False else "fsdp2"
    if (
        shard
        and trainer.args.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return "fsdp2"
    return None


def check_teacher_placement(trainer) -> None:
    """Refuse, at construction, the settings whose teacher placement is unsupported (see the table above)."""
    if trainer.is_fsdp_enabled and _fsdp_version(trainer) != 2:
        raise ValueError(
            "A teacher under FSDP1 is not supported: use FSDP2 (`fsdp_config={'version': 2}`, or `fsdp_version: 2` "
            "in accelerate's config), under which the teacher is sharded with `fully_shard` and kept out of the "
            "optimizer and checkpoints. Or precompute the teacher's outputs (`precompute_teacher_logits`) and train "
            "without a teacher model."
        )
    if trainer.is_deepspeed_enabled and trainer.args.shard_teacher and _deepspeed_stage(trainer) != 3:
        raise ValueError(
            f"`shard_teacher=True` under DeepSpeed ZeRO stage {_deepspeed_stage(trainer)}: DeepSpeed partitions the "
            "teacher only under ZeRO-3. Use stage 3, or shard_teacher=None (a full copy per process)."
        )
    for asked, enabled, name in (
        (trainer.args.fsdp, trainer.is_fsdp_enabled, "FSDP"),
        (trainer.args.deepspeed, trainer.is_deepspeed_enabled, "DeepSpeed"),
    ):
        if asked and not enabled:  # accelerate 1.15 under `accelerate launch` with ACCELERATE_USE_CPU=1
            logger.warning(
                f"{name} was asked for but accelerate did not enable it (accelerate does not on CPU): the student "
                f"trains in {trainer.accelerator.distributed_type}, and the teacher is "
                + ("sharded with FSDP2 (`shard_teacher=True`)." if teacher_sharding(trainer) else "copied whole.")
            )
    if trainer.args.shard_teacher and teacher_sharding(trainer) is None and not trainer.is_fsdp_enabled:
        logger.warning(
            "`shard_teacher=True` in a single-process run: there is nothing to shard over, the teacher is kept whole."
        )


def needs_late_placement(trainer) -> bool:
    """Whether the teacher is placed at its first use: after DeepSpeed/FSDP have their final configuration, and
    sharded then (every process reaches the first forward together)."""
    return trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or teacher_sharding(trainer) is not None


def place_teacher(teacher: nn.Module, trainer) -> nn.Module:
    """The teacher as the run needs it (see the table above): a DeepSpeed engine, sharded in place with FSDP2, or on
    the student's device."""
    sharding = teacher_sharding(trainer)
    if next(teacher.parameters(), None) is None:
        return teacher  # nothing to place: e.g. the teacher lent to a side evaluation (`evaluate_teacher`)
    if sharding == "deepspeed":
        return deepspeed_inference_engine(
            teacher, trainer.accelerator, partition=trainer.args.shard_teacher is not False
        )
    if sharding == "fsdp2":
        return shard_with_fsdp2(teacher, trainer.args.device)
    return teacher.to(trainer.args.device)


def shard_with_fsdp2(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Shard the frozen teacher over all processes with FSDP2's `fully_shard` (public torch API), in place.

    Each block (the classes a transformers model names in `_no_split_modules`) is sharded on its own, then the root,
    all with ``reshard_after_forward=True``, the root included: a forward gathers one block at a time and every
    process keeps only its shard between forwards. A block holding a parameter also used outside it (tied input and
    output embeddings) is left to the root's unit, which is gathered for the whole forward. A module without
    `_no_split_modules` is sharded as one unit (its whole weights are gathered during its forward). Each member of an
    ensemble is sharded separately. The teacher is never given to the optimizer or registered with accelerate, so it
    is neither trained nor saved.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for member in ensemble_members(teacher):
        if isinstance(member, FSDPModule) or next(member.parameters(), None) is None:
            continue  # already sharded (e.g. lent to a side evaluation), or nothing to shard
        block_names = set(getattr(member, "_no_split_modules", None) or ())
        users: dict[int, list[str]] = {}  # parameter -> every name it has (tied parameters have several)
        for name, parameter in member.named_parameters(remove_duplicate=False):
            users.setdefault(id(parameter), []).append(name)
        for prefix, module in reversed(list(member.named_modules())):  # descendants before their ancestors
            if module is member or type(module).__name__ not in block_names:
                continue
            if all(name.startswith(prefix + ".") for p in module.parameters() for name in users[id(p)]):
                fully_shard(module, mesh=mesh, reshard_after_forward=True)
        fully_shard(member, mesh=mesh, reshard_after_forward=True)
    return teacher


def deepspeed_inference_engine(model: nn.Module, accelerator, partition: bool = True) -> nn.Module:
    """Wrap the frozen teacher in a DeepSpeed inference engine sharing the student's ZeRO config (TRL's approach).

    Under ZeRO-3 (and `partition`) the teacher is partitioned like the student; otherwise the engine runs at stage 0,
    a full copy per process. No optimizer is built for it, and Trainer saves only the student's engine.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if stage == 3 and partition and hidden_size is not None:
        # "auto" values are filled for the student by Trainer; give the teacher concrete ones from its own width.
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            }
        )
    if stage != 3 or not partition:
        config.setdefault("zero_optimization", {})["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
