"""Distillation works on real data: a small student distilled from a trained teacher beats the same student trained
on labels alone (a 2,000-row MNIST subset from ../shared/datasets/mnist; skipped when absent).

On 2,000 rows an unregularised 2×100 student overfits its hard labels; the teacher's soft targets at T = 8 regularise
it (the paper's §3 point). Measured once: teacher 122, labels-only 265, distilled (T=8) 211 errors out of 2,000.
"""

from __future__ import annotations

import pytest
import torch
from mnist_data import ImageTensorDataset, Jitter, load_mnist_idx
from transformers import Trainer, TrainingArguments

from hf_distill import DistillationTrainer, DistillationTrainingArguments, MLPConfig, MLPForImageClassification


TRAIN_ROWS, TEST_ROWS, EPOCHS = 2000, 2000, 40


def mnist_subset(mnist_dir) -> dict[str, ImageTensorDataset]:
    splits = load_mnist_idx(mnist_dir)
    subsets = {}
    for name, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        images, labels = splits[name]
        subsets[name] = ImageTensorDataset(images[:rows].float().div(255).unsqueeze(1), labels[:rows])
    return subsets


def training_args(output_dir) -> dict:
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=128,
        per_device_eval_batch_size=1000,
        num_train_epochs=EPOCHS,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def count_errors(trainer, test_set) -> int:
    predictions = trainer.predict(test_set)
    return int((predictions.predictions.argmax(-1) != test_set.labels.numpy()).sum())


def make_student() -> MLPForImageClassification:
    torch.manual_seed(1)
    return MLPForImageClassification(MLPConfig(hidden_sizes=[100, 100]))


@pytest.mark.slow
def test_distilled_student_beats_labels_only_student(tmp_path, mnist_dir):
    data = mnist_subset(mnist_dir)

    torch.manual_seed(0)
    teacher = MLPForImageClassification(MLPConfig(hidden_sizes=[400, 400], input_dropout=0.2, hidden_dropout=0.5))
    teacher_trainer = Trainer(
        model=teacher,
        args=TrainingArguments(**training_args(tmp_path / "teacher")),
        train_dataset=data["train"].with_augmentation(Jitter(1)),
    )
    teacher_trainer.train()

    baseline = Trainer(
        model=make_student(),
        args=TrainingArguments(**training_args(tmp_path / "baseline")),
        train_dataset=data["train"],
    )
    baseline.train()

    distilled = DistillationTrainer(
        model=make_student(),
        teacher_model=teacher,
        train_dataset=data["train"],
        args=DistillationTrainingArguments(**training_args(tmp_path / "distilled"), temperature=8.0, alpha=0.9),
    )
    distilled.train()

    errors = {
        name: count_errors(trainer, data["test"])
        for name, trainer in (("teacher", teacher_trainer), ("baseline", baseline), ("distilled", distilled))
    }
    print(f"test errors out of {TEST_ROWS}: {errors}")
    assert errors["teacher"] < errors["baseline"]
    assert errors["distilled"] < errors["baseline"]


@pytest.mark.slow
def test_ensemble_of_teachers_trains_a_better_student_than_the_average_single_teacher(tmp_path, mnist_dir):
    """Paper §1: the ensemble's soft targets (arithmetic mean) are better targets than any one teacher's, on average.

    Measured once: students of the three single teachers 253, 254, 245 errors; of their ensemble 239 (of 2,000).
    """
    data = mnist_subset(mnist_dir)
    teachers = []
    for seed in range(3):
        torch.manual_seed(10 + seed)
        teacher = MLPForImageClassification(MLPConfig(hidden_sizes=[400, 400], input_dropout=0.2, hidden_dropout=0.5))
        args = TrainingArguments(
            **{**training_args(tmp_path / f"teacher{seed}"), "num_train_epochs": 10, "seed": seed}
        )
        Trainer(model=teacher, args=args, train_dataset=data["train"].with_augmentation(Jitter(1))).train()
        teachers.append(teacher)

    def distilled_errors(teacher_model, name) -> int:
        trainer = DistillationTrainer(
            model=make_student(),
            teacher_model=teacher_model,
            train_dataset=data["train"],
            args=DistillationTrainingArguments(**training_args(tmp_path / name), temperature=8.0, alpha=0.9),
        )
        trainer.train()
        return count_errors(trainer, data["test"])

    single = [distilled_errors(teacher, f"single{i}") for i, teacher in enumerate(teachers)]
    ensemble = distilled_errors(teachers, "ensemble")
    print(f"test errors out of {TEST_ROWS}: single teachers' students {single}, ensemble's student {ensemble}")
    assert ensemble < sum(single) / len(single)
