"""Trains a tiny student with DistillationTrainer and writes what the test compares to `<output_dir>/result.json`.

Run by tests/test_distributed.py with `accelerate launch --multi_gpu --num_processes 2` (gloo DDP on CPU) and with
plain `python` (one process, twice the per-device batch: the same global batch). An optional third argument is
`intermediate_matches` (JSON), whose learned projections are then compared too. `KD_FUSE_LM_HEAD=1` in the
environment forces the fused lm_head path (`kd_fuse_lm_head=True`).
"""

import json
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TASKS, causal_lm_dataset, seeded  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402


output_dir, per_device_batch_size = sys.argv[1], int(sys.argv[2])
intermediate_matches = sys.argv[3] if len(sys.argv) > 3 else None
student_factory, teacher_factory, _ = TASKS["causal_lm"]
args = DistillationTrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=per_device_batch_size,
    max_steps=4,
    logging_steps=1,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
    use_cpu=True,
    temperature=2.0,
    alpha=0.5,
    intermediate_matches=intermediate_matches,
    kd_fuse_lm_head=True if os.environ.get("KD_FUSE_LM_HEAD") == "1" else None,
)
student = seeded(student_factory, 0)
trainer = DistillationTrainer(
    model=student,
    teacher_model=seeded(teacher_factory, 1),
    args=args,
    train_dataset=causal_lm_dataset(n=64, ragged=True),
)
trainer.train()
if trainer.is_world_process_zero():
    logs = [h for h in trainer.state.log_history if "loss" in h]
    Path(output_dir, "result.json").write_text(
        json.dumps(
            {
                "world_size": trainer.args.world_size,
                "num_processes": trainer.accelerator.num_processes,
                "teacher_wrapped": type(trainer.teacher_model).__name__,
                "student_wrapped": type(trainer.model_wrapped).__name__,
                "losses": [h["loss"] for h in logs],
                "loss_kd": [h["loss_kd"] for h in logs],
                "fused_heads_checked": trainer._fused_heads_checked,
                "weight_norm": float(torch.cat([p.detach().flatten() for p in student.parameters()]).norm()),
                "loss_match": {key: [h[key] for h in logs] for key in logs[0] if key.startswith("loss_match")},
                "projection_norm": float(
                    torch.cat([p.detach().flatten() for p in trainer._intermediate.parameters()]).norm()
                    if trainer._intermediate is not None
                    else 0.0
                ),
            }
        )
    )

# A gloo process sometimes aborts in interpreter shutdown after all its work (see tests/scripts/sharded_run.py):
# finish together, then leave without the interpreter's shutdown.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
