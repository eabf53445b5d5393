"""The card names what the student learned from: one teacher, an ensemble, or cached teacher outputs."""

from __future__ import annotations

from conftest import TASKS, seeded, sequence_dataset
from huggingface_hub import ModelCard
from test_trainer import make_args

from hf_distill import DistillationTrainer, precompute_teacher_logits


def card_metadata(trainer):
    trainer.train()
    trainer.create_model_card()
    return ModelCard.load(trainer.args.output_dir + "/README.md").data.to_dict()["distillation"]


def test_ensemble_card_lists_every_teacher_and_the_reduction(tmp_path):
    task = "sequence_classification"
    teachers = [seeded(TASKS[task][1], 1), seeded(TASKS[task][1], 2)]
    trainer = DistillationTrainer(
        model=seeded(TASKS[task][0], 0),
        teacher_model=teachers,
        args=make_args(
            tmp_path,
            ensemble_reduction="mean_log_probs",
            max_steps=2,
            alpha=0.5,
            alpha_end=0.2,
            alpha_schedule="linear",
        ),
        train_dataset=sequence_dataset(),
        eval_dataset=sequence_dataset(n=8, seed=1),
    )
    distillation = card_metadata(trainer)
    assert len(distillation["teachers"]) == 2
    assert distillation["ensemble_reduction"] == "mean_log_probs"
    assert distillation["teacher_parameters"] == sum(p.numel() for t in teachers for p in t.parameters())
    assert (distillation["alpha"], distillation["alpha_end"], distillation["alpha_schedule"]) == (0.5, 0.2, "linear")


def test_cache_only_card_names_the_teacher_from_the_cache(tmp_path):
    task = "sequence_classification"
    teacher = seeded(TASKS[task][1], 1)
    teacher.config.name_or_path = "org/tiny-teacher"
    cached = precompute_teacher_logits(teacher, sequence_dataset(), top_k=2, dtype="float32")
    trainer = DistillationTrainer(
        model=seeded(TASKS[task][0], 0),
        teacher_model=None,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=cached,
    )
    distillation = card_metadata(trainer)
    assert distillation["teacher"] == "tiny-teacher" and distillation["teacher_source"] == "cached outputs"
    assert distillation["teacher_top_k"] == 2 and "teacher_parameters" not in distillation
