"""On-policy distillation (lmbda=1) of a tiny causal LM; writes what tests/test_distributed.py checks.

Run with `accelerate launch --multi_gpu --num_processes 2` (gloo DDP on CPU). Each process writes
`<output_dir>/result_<rank>.json`: the tokens it generated and counted itself, and the logged values (all processes).
"""

import json
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_on_policy import EOS, RecordingCollator, record_generate, sft_dataset, student_model, teacher_model  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments, on_policy  # noqa: E402


output_dir = sys.argv[1]
args = DistillationTrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_steps=3,
    logging_steps=1,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
    use_cpu=True,
    alpha=0.5,
    lmbda=1.0,
    max_new_tokens=5,
    distillation_loss="reverse_kl",
    remove_unused_columns=False,
)
trainer = DistillationTrainer(
    model=student_model(),
    teacher_model=teacher_model(),
    args=args,
    train_dataset=sft_dataset(n=64),
    data_collator=RecordingCollator(),
)
calls = record_generate(trainer.accelerator.unwrap_model(trainer.model))
trainer.train()
counted = sum(int(on_policy.completion_mask(c["output"][:, c["input_ids"].shape[1] :], [EOS]).sum()) for c in calls)
logs = [h for h in trainer.state.log_history if "loss" in h]
Path(output_dir, f"result_{trainer.args.process_index}.json").write_text(
    json.dumps(
        {
            "world_size": trainer.args.world_size,
            "generate_calls": len(calls),
            "generated_tokens": counted,
            "losses": [h["loss"] for h in logs],
            "loss_kd": [h["loss_kd"] for h in logs],
            "logged_generated_tokens": [h["generated_tokens"] for h in logs],
            "on_policy_fraction": [h["on_policy_fraction"] for h in logs],
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
