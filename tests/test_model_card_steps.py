"""`DistillationTrainer.evaluate_teacher`, and the model card's pure render step (data in, card out, no trainer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import bert_config, sequence_dataset
from huggingface_hub import ModelCard
from test_hub import accuracy, card_results_table, make_args
from transformers import BertForSequenceClassification, TrainerCallback

from hf_distill import DistillationTrainer, get_distillation_loss, precompute_teacher_logits
from hf_distill.evaluation import EVAL_TIMING_KEYS
from hf_distill.model_card import (
    DistillationCardData,
    build_distillation_model_card,
    distillation_card_data,
    render_distillation_model_card,
)


def bert_trainer(tmp_path, eval_dataset=None, **overrides) -> DistillationTrainer:
    torch.manual_seed(0)
    student, teacher = BertForSequenceClassification(bert_config(16)), BertForSequenceClassification(bert_config(32))
    eval_dataset = sequence_dataset(24, seed=2) if eval_dataset is None else eval_dataset
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path / "out", **overrides),
        train_dataset=sequence_dataset(16, seed=1),
        eval_dataset=eval_dataset,
        compute_metrics=accuracy,
    )


def test_evaluate_teacher_scores_the_teacher_against_itself_without_touching_the_trainer(tmp_path, capsys):
    trainer = bert_trainer(tmp_path)
    trainer.train()
    log_history, rng_state = list(trainer.state.log_history), torch.random.get_rng_state()
    capsys.readouterr()

    results = trainer.evaluate_teacher()
    assert capsys.readouterr().out == ""  # nothing printed as if it were the run's evaluation
    assert trainer.state.log_history == log_history and torch.equal(torch.random.get_rng_state(), rng_state)
    assert results["eval_loss_kd"] == pytest.approx(0.0, abs=1e-7)
    assert results["eval_teacher_agreement"] == 1.0
    assert results["eval_loss"] == pytest.approx((1 - 0.7) * results["eval_loss_ce"], rel=1e-5)
    # Named as `evaluate()` names the student's metrics; throughput figures left out.
    assert set(results) == {key for key in trainer.evaluate() if key != "epoch" and not key.endswith(EVAL_TIMING_KEYS)}
    eval_set = trainer.eval_dataset
    with torch.no_grad():
        predictions = trainer.teacher_model(input_ids=torch.tensor(eval_set["input_ids"])).logits.argmax(-1)
    teacher_accuracy = (predictions == torch.tensor(eval_set["labels"])).float().mean().item()
    assert results["eval_accuracy"] == pytest.approx(teacher_accuracy)

    # The card's teacher column is these results, evaluated once (cached) for both.
    table = card_results_table(str(build_distillation_model_card(trainer)))
    for metric, value in results.items():
        assert table[metric][1] == (f"{value:.4g}" if isinstance(value, float) else str(value)), metric
    assert trainer.evaluate_teacher() == results


def test_evaluate_teacher_uses_the_scheduled_alpha_as_evaluate_does(tmp_path):
    trainer = bert_trainer(tmp_path, alpha=0.5, alpha_end=0.2, alpha_schedule="linear", max_steps=2)
    before = trainer.evaluate_teacher()
    trainer.train()
    after = trainer.evaluate_teacher()
    assert before["eval_loss"] == pytest.approx(0.5 * before["eval_loss_ce"], rel=1e-5)
    assert after["eval_loss"] == pytest.approx(0.8 * after["eval_loss_ce"], rel=1e-5)
    # The student's column, evaluated for the card after training, is what `evaluate()` reports.
    card = distillation_card_data(trainer)
    assert card.student_results["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)


def test_evaluate_teacher_on_several_eval_sets_as_evaluate_names_them(tmp_path):
    sets = {"a": sequence_dataset(8, seed=3), "b": sequence_dataset(8, seed=4)}
    trainer = bert_trainer(tmp_path, eval_dataset=sets)
    results = trainer.evaluate_teacher()
    assert {"eval_a_loss_kd", "eval_b_teacher_agreement", "eval_b_accuracy"} <= set(results)
    one = trainer.evaluate_teacher("a", metric_key_prefix="test")
    assert one["test_accuracy"] == results["eval_a_accuracy"] and one["test_teacher_agreement"] == 1.0
    assert trainer.evaluate_teacher(sets["b"])["eval_loss_ce"] == pytest.approx(results["eval_b_loss_ce"])


def test_evaluate_teacher_refuses_without_a_teacher_model_or_an_eval_set(tmp_path):
    trainer = bert_trainer(tmp_path)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="needs an evaluation set"):
        trainer.evaluate_teacher()

    torch.manual_seed(1)
    cached = precompute_teacher_logits(BertForSequenceClassification(bert_config(32)), sequence_dataset(16))
    cache_only = DistillationTrainer(
        model=BertForSequenceClassification(bert_config(16)),
        teacher_model=None,
        args=make_args(tmp_path / "cache"),
        train_dataset=cached,
        eval_dataset=sequence_dataset(8, seed=2),
    )
    with pytest.raises(ValueError, match="no teacher model to evaluate"):
        cache_only.evaluate_teacher()


# The objectives the card wrote for the built-in losses before they came from the divergence registry.
BUILT_IN_OBJECTIVES = {
    "kl": "alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · label_loss",
    "reverse_kl": "alpha · T² · KL(student_T ‖ teacher_T) + (1 − alpha) · label_loss",
    "jsd": "alpha · T² · JSD_β(teacher_T, student_T) + (1 − alpha) · label_loss",
    "mse": "alpha · ½ · mean_i (z̃_i − ṽ_i)² + (1 − alpha) · label_loss",
}


def hand_made_data(loss: str = "kl", **overrides) -> dict:
    divergence = get_distillation_loss(loss)
    data = {
        "model_name": "tiny-student",
        "lineage": {
            "teacher": "org/tiny-teacher",
            "teacher_revision": "a" * 40,
            "teacher_architecture": "BertForSequenceClassification",
        },
        "loss_settings": {"loss": loss, "temperature": 2.0, "alpha": 0.9},
        "loss_formula": divergence.formula,
        "loss_description": divergence.description,
        "student_architecture": "BertForSequenceClassification",
        "student_parameters": 1_000,
        "teacher_parameters": 4_000,
        "metadata": {"library_name": "transformers", "tags": ["knowledge-distillation", "hf-distill"]},
        "eval_data": [
            {
                "key": None,
                "name": "tiny-set",
                "split": "validation",
                "num_examples": 24,
                "columns": ["input_ids", "labels"],
            }
        ],
        "student_results": {"eval_loss": 0.5, "eval_accuracy": 0.75},
        "teacher_results": {"eval_loss": 0.25, "eval_accuracy": 0.875},
        "results_source": "hand-made numbers",
        "framework_versions": {"hf-distill": "0.1.0"},
    }
    if loss == "jsd":
        data["loss_settings"]["jsd_beta"] = 0.3
    return {**data, **overrides}


def test_render_needs_no_trainer_and_gives_the_same_card_for_the_same_data():
    data = hand_made_data()
    card = render_distillation_model_card(data)
    assert isinstance(card, ModelCard)
    text = str(card)
    assert render_distillation_model_card(DistillationCardData(**data)).content == card.content
    assert card.data.distillation == {
        "teacher": "org/tiny-teacher",
        "teacher_revision": "a" * 40,
        "teacher_architecture": "BertForSequenceClassification",
        "teacher_parameters": 4000,
        "student_parameters": 1000,
        "compression_ratio": 4.0,
        "loss": "kl",
        "temperature": 2.0,
        "alpha": 0.9,
    }
    for section in (
        "# tiny-student",
        "## Teacher and student",
        "## Distillation",
        "## Evaluation: student vs teacher",
        "## Intended uses & limitations",
        "## Training and evaluation data",
        "## Citation",
    ):
        assert section in text, section
    assert "the teacher [org/tiny-teacher](https://huggingface.co/org/tiny-teacher)" in text
    assert "**4.00× fewer parameters**" in text
    assert "Compression ratio (teacher / student parameters): **4.0×**" in text
    assert card_results_table(text) == {"eval_loss": ("0.5", "0.25"), "eval_accuracy": ("0.75", "0.875")}
    assert "(24 examples)" in text and "`tiny-set`, split `validation`, 24 examples, columns `input_ids`" in text
    assert "- distillation_alpha: 0.9" in text and "- hf-distill 0.1.0" in text
    assert data == hand_made_data()  # rendering leaves its input alone


@pytest.mark.parametrize("loss", sorted(BUILT_IN_OBJECTIVES))
def test_render_writes_each_built_in_objective_as_before(loss):
    text = str(render_distillation_model_card(hand_made_data(loss)))
    assert f"    loss = {BUILT_IN_OBJECTIVES[loss]}\n" in text
    assert f"`{loss}`: {get_distillation_loss(loss).description}" in text
    assert ("jsd_beta (β)" in text) == (loss == "jsd")


def test_render_of_minimal_data_says_what_is_missing():
    data = hand_made_data(
        student_results={},
        teacher_results={},
        eval_data=[],
        results_source="no evaluation set",
        teacher_parameters=None,
        lineage={"teacher_architecture": "PlainLogitsTeacher"},
    )
    text = str(render_distillation_model_card(data))
    assert "No evaluation results (no evaluation set)" in text
    assert "a `PlainLogitsTeacher` teacher" in text and "Evaluation set: none." in text
    assert "compression_ratio" not in text and "fewer parameters" not in text


def test_collected_data_is_plain_and_renders_to_the_built_card(tmp_path):
    trainer = bert_trainer(tmp_path)
    trainer.train()
    data = distillation_card_data(trainer, dataset="tiny-set")
    plain = dataclasses.asdict(data)
    assert plain["loss_formula"] == "T² · KL(teacher_T ‖ student_T)"
    assert plain["eval_data"][0]["num_examples"] == 24 and plain["eval_data"][0]["name"] == "tiny-set"
    assert (
        render_distillation_model_card(plain).content
        == build_distillation_model_card(trainer, dataset="tiny-set").content
    )


def test_evaluate_teacher_mid_training_leaves_the_run_unchanged(tmp_path):
    """Called from a callback in the middle of training (as a card written at a checkpoint evaluates the teacher), it
    changes nothing in the run: the same losses, step for step, as a run without it."""

    class EvaluateTeacherAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                results.update(trainer.evaluate_teacher())

    losses = {}
    for name in ("plain", "with_teacher_evaluation"):
        results = {}
        torch.manual_seed(0)
        student = BertForSequenceClassification(bert_config(16, hidden_dropout_prob=0.1))  # draws from torch's RNG
        trainer = DistillationTrainer(
            model=student,
            teacher_model=BertForSequenceClassification(bert_config(32)),
            args=make_args(tmp_path / name, max_steps=4, per_device_train_batch_size=4),
            train_dataset=sequence_dataset(16, seed=1),
            eval_dataset=sequence_dataset(8),
        )
        if name == "with_teacher_evaluation":
            trainer.add_callback(EvaluateTeacherAtStep2())
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert results["eval_teacher_agreement"] == 1.0
    assert losses["with_teacher_evaluation"] == losses["plain"]
