"""Drop-in contract: everything Trainer does keeps working, for every kind of student."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import TASKS, seeded
from safetensors import safe_open
from transformers import PreTrainedModel

from hf_distill import DistillationTrainer, DistillationTrainingArguments


TOTAL_STEPS, SAVE_AT = 6, 3


def build_trainer(tmp_path, task, **overrides):
    student_factory, teacher_factory, dataset_factory = TASKS[task]
    values = dict(
        output_dir=str(tmp_path / task),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=TOTAL_STEPS,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        temperature=2.0,
        alpha=0.5,
    )
    args = DistillationTrainingArguments(**{**values, **overrides})
    student, teacher = seeded(student_factory, 0), seeded(teacher_factory, 1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset_factory(n=48),
        eval_dataset=dataset_factory(n=16, seed=1),
    )
    return trainer, student, teacher


def saved_tensor_shapes(folder) -> Counter:
    """Multiset of the shapes of every weight tensor saved in `folder` (names may be remapped on save, shapes not)."""
    shapes = Counter()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shapes.update(tuple(f.get_slice(name).get_shape()) for name in f.keys())
    for file in folder.glob("pytorch_model*.bin"):
        shapes.update(tuple(t.shape) for t in torch.load(file, weights_only=True).values())
    return shapes


def train_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_evaluate_predict_save_resume(tmp_path, task):
    trainer, student, teacher = build_trainer(tmp_path, task)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == TOTAL_STEPS and all(torch.isfinite(torch.tensor(losses)))

    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_ce", "eval_teacher_agreement"):
        assert key in metrics, key
    assert 0.0 <= metrics["eval_teacher_agreement"] <= 1.0

    prediction = trainer.predict(trainer.eval_dataset)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    assert logits.shape[0] == 16 and "test_teacher_agreement" in prediction.metrics

    # Neither checkpoints nor the saved model hold a teacher tensor: what is saved is a sub-multiset of the student's
    # tensor shapes (the teacher is wider, a saved teacher tensor would add a shape); the optimizer covers the student.
    student_shapes = Counter(tuple(t.shape) for t in student.state_dict().values())
    trainer.save_model(str(tmp_path / "final"))
    for folder in [tmp_path / "final", *sorted((tmp_path / task).glob("checkpoint-*"))]:
        shapes = saved_tensor_shapes(folder)
        assert shapes and not shapes - student_shapes, (folder, shapes - student_shapes)
    checkpoint = tmp_path / task / f"checkpoint-{SAVE_AT}"
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == sum(1 for p in student.parameters() if p.requires_grad)

    if isinstance(student, PreTrainedModel):  # reloads with the standard Auto call, same logits
        reloaded = type(student).from_pretrained(tmp_path / "final")
        batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(4)])
        batch.pop("labels")
        student.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, student(**batch).logits)

    # Resuming from the middle reproduces the uninterrupted run's logged losses exactly (the history up to the
    # checkpoint comes back from trainer_state.json, the rest is recomputed).
    resumed, _, _ = build_trainer(tmp_path, task, output_dir=str(tmp_path / f"{task}_resumed"))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, TOTAL_STEPS + 1))
    for key in ("loss", "loss_kd", "loss_ce"):
        assert [h[key] for h in resumed.state.log_history if "loss" in h] == [
            h[key] for h in trainer.state.log_history if "loss" in h
        ], key
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_AT
