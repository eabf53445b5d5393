"""Teacher ensembles (paper §1) against a hand computation, and temperature/alpha schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TASKS, seeded, sequence_dataset
from test_trainer import make_args

from hf_distill import DistillationTrainer, ensemble_teacher_logits, precompute_teacher_logits
from hf_distill.teacher_cache import TEACHER_LOGITS


def hand_ensemble(logits: list[np.ndarray], weights, T: float, reduction: str) -> np.ndarray:
    """The ensemble's tempered distribution for one position, from the definitions."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    distributions = [np.exp(z / T) / np.exp(z / T).sum() for z in np.asarray(logits, dtype=np.float64)]
    if reduction == "mean_probs":
        return sum(w * q for w, q in zip(weights, distributions))
    geometric = np.prod([q**w for w, q in zip(weights, distributions)], axis=0)
    return geometric / geometric.sum()


@pytest.mark.parametrize("reduction", ["mean_probs", "mean_log_probs"])
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3]])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_reductions_match_hand_computation(reduction, weights, temperature):
    g = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(4, 6, generator=g) for _ in range(3)]
    combined = ensemble_teacher_logits(logits, reduction=reduction, weights=weights, temperature=temperature)
    got = torch.softmax(combined.double() / temperature, -1).numpy()
    for i in range(4):
        expected = hand_ensemble([z[i].numpy() for z in logits], weights or [1, 1, 1], temperature, reduction)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-7)


def test_online_and_cached_ensembles_agree(tmp_path):
    task = "sequence_classification"
    teachers = [seeded(TASKS[task][1], seed) for seed in (1, 2)]
    dataset = sequence_dataset(n=16)
    cached = precompute_teacher_logits(teachers, dataset, dtype="float32", temperature=3.0, teacher_weights=[1, 3])
    with torch.no_grad():
        ids = torch.tensor(dataset["input_ids"][:2])
        expected = ensemble_teacher_logits(
            [t(input_ids=ids).logits for t in teachers], weights=[1, 3], temperature=3.0
        )
    torch.testing.assert_close(torch.tensor(cached[TEACHER_LOGITS][:2]), expected)

    def run(name, teacher, train_dataset):
        args = make_args(tmp_path / name, temperature=3.0, teacher_weights=[1.0, 3.0], max_steps=3)
        trainer = DistillationTrainer(
            model=seeded(TASKS[task][0], 0), teacher_model=teacher, args=args, train_dataset=train_dataset
        )
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert run("cached", None, cached) == pytest.approx(run("online", teachers, dataset), rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_logged_and_resume_exactly(tmp_path, schedule):
    task = "sequence_classification"
    settings = dict(
        max_steps=6,
        temperature=8.0,
        temperature_end=2.0,
        temperature_schedule=schedule,
        alpha=1.0,
        alpha_end=0.5,
        alpha_schedule=schedule,
        save_strategy="steps",
        save_steps=3,
    )

    def run(name, resume=None):
        trainer = DistillationTrainer(
            model=seeded(TASKS[task][0], 0),
            teacher_model=seeded(TASKS[task][1], 1),
            args=make_args(tmp_path / name, **settings),
            train_dataset=sequence_dataset(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return [h for h in trainer.state.log_history if "loss" in h]

    logs = run("full")
    for log in logs:
        progress = (log["step"] - 1) / 6  # the value the logged step trained with
        shape = progress if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * progress))
        assert log["temperature"] == pytest.approx(8.0 + (2.0 - 8.0) * shape)
        assert log["alpha"] == pytest.approx(1.0 + (0.5 - 1.0) * shape)
        label_term = (1 - log["alpha"]) * log["loss_ce"] if log["alpha"] < 1 else 0.0  # alpha = 1: no label loss
        assert log["loss"] == pytest.approx(log["alpha"] * log["loss_kd"] + label_term, rel=1e-5)
    resumed = run("resumed", resume=str(tmp_path / "full" / "out" / "checkpoint-3"))
    assert [(h["loss"], h["temperature"], h["alpha"]) for h in resumed] == [
        (h["loss"], h["temperature"], h["alpha"]) for h in logs
    ]


@pytest.mark.parametrize(
    "overrides, parameter",
    [
        ({"temperature_schedule": "linear"}, "temperature_end"),
        ({"alpha_schedule": "step"}, "alpha_schedule"),
        ({"alpha_end": 1.5, "alpha_schedule": "linear"}, "alpha_end"),
        ({"ensemble_reduction": "median"}, "ensemble_reduction"),
    ],
)
def test_bad_schedule_and_ensemble_arguments(tmp_path, overrides, parameter):
    with pytest.raises(ValueError, match=parameter):
        make_args(tmp_path, **overrides)


def test_teacher_weights_must_fit_the_ensemble(tmp_path):
    task = "sequence_classification"
    with pytest.raises(ValueError, match="teacher_weights"):
        DistillationTrainer(
            model=seeded(TASKS[task][0], 0),
            teacher_model=[seeded(TASKS[task][1], 1), seeded(TASKS[task][1], 2)],
            args=make_args(tmp_path, teacher_weights=[1.0, 2.0, 3.0]),
            train_dataset=sequence_dataset(),
        )
