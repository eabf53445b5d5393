"""Placing the frozen teacher when the student is sharded, and what of it has been verified.

| setting | the teacher | verified |
| --- | --- | --- |
| one process, CPU, fp32 or bf16 autocast | moved to the student's device, under the student's autocast | yes, by the test suite |
| DDP, 2 processes over gloo on CPU (`accelerate launch --multi_gpu`) | one full copy per process, never wrapped in DDP | yes, by the test suite |
| CUDA fp16/bf16, multi-GPU DDP | the same code path as the two rows above (accelerate's autocast and DDP) | see `docs/devices.md` |
| `device_map` teacher (`from_pretrained(..., device_map=...)`) | left where accelerate dispatched it | no |
| DeepSpeed (any ZeRO stage) | a DeepSpeed inference engine with the student's config; partitioned under ZeRO-3 | no |
| FSDP | wrapped by `accelerator.prepare_model(..., evaluation_mode=True)`, kept out of checkpoints | no |

"Verified" means a test or a recorded run exercised it; the rest is written to the libraries' documented behaviour and
kept in this one module so that what is untested is visible in one place.
"""

from __future__ import annotations

import copy

from torch import nn

from .private_apis import forget_prepared_model


def needs_late_placement(trainer) -> bool:
    """Whether the teacher is placed at its first use, after DeepSpeed/FSDP have their final configuration."""
    return trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled


def place_teacher(teacher: nn.Module, trainer) -> nn.Module:
    """The teacher as the sharded student's setting needs it (see the table above): an engine, a wrapped module, or
    the teacher itself."""
    if trainer.is_deepspeed_enabled:
        return deepspeed_inference_engine(teacher, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        # UNVERIFIED: FSDP shards the frozen teacher like the student; it must not stay among the models accelerate
        # saves in checkpoints (`save_state`).
        teacher = trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
        forget_prepared_model(trainer.accelerator, teacher)
    return teacher


def deepspeed_inference_engine(model: nn.Module, accelerator) -> nn.Module:
    """Wrap the frozen teacher in a DeepSpeed inference engine sharing the student's ZeRO config (TRL's approach).

    UNVERIFIED until a DeepSpeed run. Under ZeRO-3 the teacher is partitioned like the student; other stages keep a
    full copy per process (stage 0). No optimizer is built for it.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if stage == 3 and hidden_size is not None:
        # "auto" values are filled for the student by Trainer; give the teacher concrete ones from its own width.
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            }
        )
    if stage != 3:
        config.setdefault("zero_optimization", {})["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
