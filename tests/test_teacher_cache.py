"""Cached teacher outputs: same training as online distillation, row-keyed under shuffling, clear errors on mismatch."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import (
    TASKS,
    VOCAB_SIZE,
    PlainLogitsTeacher,
    bert_config,
    causal_lm_dataset,
    features_dataset,
    seeded,
    sequence_dataset,
)
from test_trainer import make_args, padding_collator
from transformers import BertForSequenceClassification

from hf_distill import DistillationTrainer, precompute_teacher_logits
from hf_distill.teacher_cache import (
    METADATA_KEY,
    TEACHER_INPUT_HASH,
    TEACHER_LOGITS,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
    read_cache_metadata,
)


def logged(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "eval_loss" not in h]


def build(tmp_path, name, task, teacher, dataset, **overrides):
    student_factory = TASKS[task][0]
    collator = padding_collator() if task == "sequence_classification" else None
    args = make_args(
        tmp_path / name,
        **{
            "num_train_epochs": 3,
            "max_steps": -1,
            "per_device_train_batch_size": 8,
            "temperature": 3.0,
            "alpha": 0.6,
            **overrides,
        },
    )
    return DistillationTrainer(
        model=seeded(student_factory, 0),
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
    )


def train(tmp_path, name, task, teacher, dataset, **overrides):
    trainer = build(tmp_path, name, task, teacher, dataset, **overrides)
    trainer.train()
    return trainer


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_cached_float32_logits_train_like_the_online_teacher(tmp_path, task):
    """Shuffled, three epochs, ragged rows (padding): every logged loss agrees with online KD to 1e-5."""
    teacher = seeded(TASKS[task][1], 1)
    dataset = (sequence_dataset if task == "sequence_classification" else causal_lm_dataset)(n=24, ragged=True)
    collator = padding_collator() if task == "sequence_classification" else None
    cached = precompute_teacher_logits(teacher, dataset, batch_size=5, dtype="float32", data_collator=collator)
    assert TEACHER_LOGITS in cached.column_names and len(cached) == len(dataset)

    online = train(tmp_path, "online", task, teacher, dataset)
    offline = train(tmp_path, "cached", task, None, cached)  # no teacher at all: the columns are the teacher
    for key in ("loss", "loss_kd", "loss_ce"):
        assert len(logged(online, key)) == 9
        assert logged(offline, key) == pytest.approx(logged(online, key), rel=1e-5, abs=1e-7), key
    online_metrics, offline_metrics = online.evaluate(dataset), offline.evaluate(cached)
    for key in ("eval_loss", "eval_loss_kd", "eval_teacher_agreement"):
        assert offline_metrics[key] == pytest.approx(online_metrics[key], rel=1e-5), key
    # Without a teacher, data that carries no cache is still evaluated and predicted: the label loss alone.
    plain_metrics = offline.evaluate(dataset)
    assert "eval_loss_kd" not in plain_metrics
    assert plain_metrics["eval_loss_ce"] == pytest.approx(offline_metrics["eval_loss_ce"], rel=1e-5)
    assert plain_metrics["eval_loss"] != pytest.approx(offline_metrics["eval_loss"], rel=1e-3)  # no KD term in it
    assert offline.predict(dataset).predictions is not None


def test_cache_survives_save_to_disk_and_shuffling(tmp_path):
    teacher = seeded(TASKS["sequence_classification"][1], 1)
    dataset = sequence_dataset(n=16)
    cached = precompute_teacher_logits(teacher, dataset, batch_size=4, dtype="float32")
    cached.save_to_disk(str(tmp_path / "cache"))
    reloaded = datasets.load_from_disk(str(tmp_path / "cache")).shuffle(seed=3)
    assert read_cache_metadata(reloaded)["teachers"] == read_cache_metadata(cached)["teachers"]
    # Each row keeps its own teacher logits, whatever the order.
    with torch.no_grad():
        for row in reloaded.select(range(4)):
            expected = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(torch.tensor(row[TEACHER_LOGITS]), expected)


def test_top_k_cache_approximates_full_logits(tmp_path):
    """k = V reproduces full-logit KD exactly; a small k is an approximation whose error is measured here."""
    task = "causal_lm"
    teacher = seeded(TASKS[task][1], 1)
    dataset = causal_lm_dataset(n=16)
    full_cache = precompute_teacher_logits(teacher, dataset, dtype="float32")
    full = train(tmp_path, "full", task, None, full_cache)
    vocab = teacher.config.vocab_size
    every = precompute_teacher_logits(teacher, dataset, top_k=vocab, dtype="float32")
    assert {TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_IDS} <= set(every.column_names)
    all_k = train(tmp_path, "all_k", task, None, every)
    assert logged(all_k) == pytest.approx(logged(full), rel=1e-5)

    # The approximation's error shrinks as k grows (this random teacher is nearly uniform: the worst case for top-k).
    errors = []
    for k in (4, 16, 32):
        top_k_cache = precompute_teacher_logits(teacher, dataset, top_k=k, dtype="float32")
        top_k = train(tmp_path, f"top{k}", task, None, top_k_cache)
        errors.append(abs(logged(top_k, "loss_kd")[0] - logged(full, "loss_kd")[0]) / logged(full, "loss_kd")[0])
        # Agreement compares argmaxes, which top-k keeps exactly (evaluated on the full cache's student: same weights
        # only at k = V, so compare each trainer with itself on both caches).
        assert (
            top_k.evaluate(top_k_cache)["eval_teacher_agreement"]
            == top_k.evaluate(full_cache)["eval_teacher_agreement"]
        )
    print(f"relative error of the first KD term, top-4/16/32 of {vocab}: {errors}")
    assert errors[0] > errors[1] > errors[2] > 0


def test_mismatched_caches_raise_clear_errors(tmp_path):
    task = "sequence_classification"
    teacher, other_teacher = seeded(TASKS[task][1], 1), seeded(TASKS[task][1], 2)
    dataset = causal_lm_dataset(n=16)
    lm_teacher = seeded(TASKS["causal_lm"][1], 1)
    cached = precompute_teacher_logits(lm_teacher, dataset, dtype="float32")

    # Positions that don't match the batch (labels changed after caching).
    relabelled = cached.map(lambda row: {"labels": [-100] * 3 + row["labels"][3:]})
    with pytest.raises(ValueError, match="Cached teacher outputs hold .* positions for a batch that counts"):
        train(tmp_path, "relabelled", "causal_lm", None, relabelled)

    # A teacher other than the one that made the cache.
    classification = precompute_teacher_logits(teacher, sequence_dataset(n=16), dtype="float32")
    with pytest.raises(ValueError, match="cached teacher outputs come from teacher"):
        train(tmp_path, "other", task, other_teacher, classification)

    # Cached logits of another label set.
    five_way = seeded(lambda: BertForSequenceClassification(bert_config(32, num_labels=5)), 1)
    wrong_size = precompute_teacher_logits(five_way, sequence_dataset(n=16), dtype="float32")
    with pytest.raises(ValueError, match=r"teacher logits \(8, 5\), student logits \(8, 3\)"):
        train(tmp_path, "size", task, None, wrong_size)

    # An arithmetic ensemble cached at another temperature.
    ensemble = precompute_teacher_logits([teacher, other_teacher], sequence_dataset(n=16), temperature=2.0)
    with pytest.raises(ValueError, match="computed at temperature 2.0 .* temperature=3.0"):
        train(tmp_path, "temperature", task, None, ensemble)

    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(
            model=seeded(TASKS[task][0], 0),
            teacher_model=None,
            args=make_args(tmp_path),
            train_dataset=sequence_dataset(),
        )


def test_cache_of_another_ensemble_recipe_is_refused(tmp_path):
    """The run (and its model card) must use the reduction and weights the cache was computed with."""
    task = "sequence_classification"
    teachers = [seeded(TASKS[task][1], 1), seeded(TASKS[task][1], 2)]
    dataset = sequence_dataset(n=16)
    geometric = precompute_teacher_logits(
        teachers, dataset, ensemble_reduction="mean_log_probs", teacher_weights=[0.9, 0.1]
    )
    with pytest.raises(
        ValueError,
        match=r"ensemble_reduction='mean_log_probs', teacher_weights=\[0.9, 0.1\].*"
        r"ensemble_reduction='mean_probs', teacher_weights=\[0.1, 0.9\].*"
        r"precompute_teacher_logits",
    ):
        build(tmp_path, "recipe", task, None, geometric, ensemble_reduction="mean_probs", teacher_weights=[0.1, 0.9])
    with pytest.raises(ValueError, match=r"teacher_weights=\[0.9, 0.1\].*teacher_weights=None"):
        build(tmp_path, "weights", task, None, geometric, ensemble_reduction="mean_log_probs")
    with pytest.raises(ValueError, match="ensemble_reduction"):  # with the teachers given too
        build(
            tmp_path, "online", task, teachers, geometric, ensemble_reduction="mean_probs", teacher_weights=[0.9, 0.1]
        )
    # Weights are compared normalised; no weights means uniform.
    build(tmp_path, "scaled", task, None, geometric, ensemble_reduction="mean_log_probs", teacher_weights=[9, 1])
    uniform = precompute_teacher_logits(teachers, dataset, temperature=3.0)
    build(tmp_path, "uniform", task, None, uniform, teacher_weights=[2.0, 2.0])
    # A single teacher's cache: the args' ensemble settings do not apply.
    single = precompute_teacher_logits(teachers[0], dataset)
    build(tmp_path, "single", task, None, single, ensemble_reduction="mean_log_probs")


def retokenised(cached: datasets.Dataset, row: int) -> datasets.Dataset:
    """`cached` with row `row` tokenised differently to the same length (same counted positions)."""

    def change(example, index):
        if index != row:
            return {}
        ids = [i % (VOCAB_SIZE - 1) + 1 for i in example["input_ids"]]
        return {"input_ids": ids, "labels": [-100 if old == -100 else new for old, new in zip(example["labels"], ids)]}

    return cached.map(change, with_indices=True)


def test_stale_token_cache_after_retokenisation_is_refused(tmp_path, caplog):
    teacher = seeded(TASKS["causal_lm"][1], 1)
    dataset = causal_lm_dataset(n=16)
    cached = precompute_teacher_logits(teacher, dataset, top_k=8, dtype="float32")
    assert cached[TEACHER_INPUT_HASH] == precompute_teacher_logits(teacher, dataset, top_k=2)[TEACHER_INPUT_HASH]
    stale = retokenised(cached, row=5)
    with pytest.raises(ValueError, match=r"(?s)1 of 8 rows .*input_ids.* changed .*precompute_teacher_logits"):
        train(tmp_path, "stale", "causal_lm", None, stale)
    with pytest.raises(ValueError, match="changed"):  # evaluation checks its rows too
        build(tmp_path, "eval", "causal_lm", None, cached).evaluate(stale)
    # The column never reaches the student (whose forward would reject it), whatever remove_unused_columns says.
    assert train(tmp_path, "fresh", "causal_lm", None, cached, remove_unused_columns=False, num_train_epochs=1)

    # A cache written before rows were hashed: accepted, with a warning that stale rows go undetected.
    old = stale.remove_columns(TEACHER_INPUT_HASH)
    metadata = read_cache_metadata(old)
    del metadata["input_hash"]
    old.info.description = json.dumps({METADATA_KEY: metadata})
    with caplog.at_level("WARNING", logger="hf_distill"):
        build(tmp_path, "old", "causal_lm", None, old)
    assert "cannot be detected" in caplog.text
    # Rows without input_ids (feature vectors, images) are not hashed, and no warning is given for them.
    caplog.clear()
    features = precompute_teacher_logits(PlainLogitsTeacher(), features_dataset(n=16))
    assert TEACHER_INPUT_HASH not in features.column_names
    with caplog.at_level("WARNING", logger="hf_distill"):
        DistillationTrainer(
            model=TASKS["plain_module"][0](), teacher_model=None, args=make_args(tmp_path), train_dataset=features
        )
    assert "cannot be detected" not in caplog.text


def test_nonfinite_teacher_outputs_are_not_cached():
    teacher = PlainLogitsTeacher()
    with torch.no_grad():
        teacher.linear.weight.fill_(1.0), teacher.linear.bias.zero_()  # logits = the sum of the 8 features
    dataset = features_dataset(n=16)
    large = dataset.map(lambda row, i: {"features": [1e4] * 8} if i in (3, 11) else {}, with_indices=True)
    with pytest.raises(ValueError, match=r"(?s)rows \[3, 11\].*overflow float16.*dtype=.float32."):
        precompute_teacher_logits(teacher, large, batch_size=5)
    stored = precompute_teacher_logits(teacher, large, dtype="float32")[TEACHER_LOGITS]
    assert torch.isfinite(torch.tensor(stored)).all() and torch.tensor(stored).abs().max() > 65504
    for top_k in (None, 2):
        nan = dataset.map(lambda row, i: {"features": [float("nan")] * 8} if i == 7 else {}, with_indices=True)
        with pytest.raises(ValueError, match=r"(?s)NaN or inf .*rows \[7\]"):
            precompute_teacher_logits(teacher, nan, batch_size=5, top_k=top_k, dtype="float32")


def test_nonfinite_cache_is_blamed_not_the_teacher(tmp_path):
    teacher = seeded(TASKS["sequence_classification"][1], 1)
    cached = precompute_teacher_logits(teacher, sequence_dataset(n=16), dtype="float32")
    broken = cached.map(lambda row, i: {TEACHER_LOGITS: [float("inf")] * 3} if i == 2 else {}, with_indices=True)
    with pytest.raises(ValueError, match=r"cached teacher outputs .* NaN or inf") as error:
        train(tmp_path, "broken", "sequence_classification", None, broken)
    assert "teacher_model_init_kwargs" not in str(error.value)
