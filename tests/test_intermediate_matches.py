"""Intermediate matches (`hf_distill.intermediate`): hidden-state / attention terms, projections, normalisation, errors."""

from __future__ import annotations

import json
import sys

import datasets
import pytest
import torch
from conftest import VOCAB_SIZE, bert_config, causal_lm_dataset, gpt2_config, seeded, sequence_dataset
from safetensors import safe_open
from test_trainer import make_args, padding_collator
from transformers import (
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2LMHeadModel,
    HfArgumentParser,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments, precompute_teacher_logits
from hf_distill.checkpoints import last_complete_checkpoint
from hf_distill.intermediate import (
    PROJECTIONS_FILE,
    IntermediateMatch,
    capture_layers,
    expand_intermediate_matches,
)
from hf_distill.model_card import distillation_card_data


def bert_student(cls=BertForSequenceClassification, **overrides):
    return lambda: cls(bert_config(16, num_hidden_layers=2, **overrides))


def bert_teacher(cls=BertForSequenceClassification, **overrides):
    return lambda: cls(bert_config(32, num_hidden_layers=4, **overrides))


def token_rows(n: int = 16, seed: int = 0) -> datasets.Dataset:
    """Ragged token-classification rows whose every real token is labelled: once padded (labels -100), the counted
    tokens are exactly the non-padding ones."""
    rows = sequence_dataset(n=n, seed=seed, ragged=True, labels=False)
    g = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, 3, (len(ids),), generator=g).tolist() for ids in rows["input_ids"]]
    return rows.add_column("labels", labels)


def build(tmp_path, student_factory, teacher_factory, dataset, matches, collator=None, **overrides):
    args = make_args(tmp_path, intermediate_matches=matches, **overrides)
    student, teacher = seeded(student_factory, 0), seeded(teacher_factory, 1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, data_collator=collator
    )
    return trainer, student, teacher


def eval_terms(trainer, batch) -> dict[str, float]:
    """The terms `compute_loss` records for one batch in evaluation mode."""
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return {"loss": loss.item(), **trainer._eval_stats.pop_means(trainer.accelerator)}


def hidden_states(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


# ---- 1. the terms against independent references ----


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cosine_term_equals_cosine_embedding_loss(tmp_path, level):
    cls = BertForTokenClassification if level == "token" else BertForSequenceClassification
    dataset = token_rows() if level == "token" else sequence_dataset(n=16, ragged=True)
    trainer, student, teacher = build(
        tmp_path, bert_student(cls), bert_teacher(cls), dataset, "distilbert", collator=padding_collator()
    )
    assert [m.to_dict() for m in trainer._intermediate.matches] == [
        {"student_layer": 2, "teacher_layer": 4, "feature": "hidden", "loss": "cosine", "weight": 1.0}
    ]
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    assert not batch["attention_mask"].all(), "the test needs padding"
    terms = eval_terms(trainer, batch)

    projection = trainer._intermediate.projections["0"]  # 16 -> 32
    with torch.no_grad():
        projected = projection(hidden_states(student, batch)[-1])
    teacher_last = hidden_states(teacher, batch)[-1]
    attended = batch["attention_mask"].bool()
    cosine = torch.nn.CosineEmbeddingLoss(reduction="none")
    if level == "token":  # over the non-padding tokens (the counted ones)
        expected = torch.nn.CosineEmbeddingLoss()(
            projected[attended], teacher_last[attended], torch.ones(int(attended.sum()))
        )
    else:  # each row's mean over its attended tokens, then the mean over rows
        per_row = [
            cosine(projected[b][attended[b]], teacher_last[b][attended[b]], torch.ones(int(attended[b].sum()))).mean()
            for b in range(len(attended))
        ]
        expected = torch.stack(per_row).mean()
    assert terms["loss_match_2_4"] == pytest.approx(expected.item(), abs=1e-6)
    alpha = trainer.args.alpha
    mix = alpha * terms["loss_kd"] + (1 - alpha) * terms["loss_ce"] + terms["loss_match_2_4"]
    assert terms["loss"] == pytest.approx(mix, rel=1e-5)


def test_mse_term_equals_a_hand_computation_through_the_projection(tmp_path):
    """Causal LM, ragged rows: the hidden state at t counts when the logit at t does (label t + 1 is not -100)."""
    matches = [{"student_layer": 1, "teacher_layer": 3, "loss": "mse", "weight": 0.5}]
    student_factory = lambda: GPT2LMHeadModel(gpt2_config(16, n_layer=2))  # noqa: E731
    teacher_factory = lambda: GPT2LMHeadModel(gpt2_config(32, n_layer=4))  # noqa: E731
    dataset = causal_lm_dataset(n=8, ragged=True)
    trainer, student, teacher = build(tmp_path, student_factory, teacher_factory, dataset, matches)
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    terms = eval_terms(trainer, batch)

    weight, bias = (p.detach().double() for p in trainer._intermediate.projections["0"].parameters())
    h_s = hidden_states(student, batch)[1].double()
    h_t = hidden_states(teacher, batch)[3].double()
    total, count = 0.0, 0
    for b in range(h_s.shape[0]):
        for t in range(h_s.shape[1] - 1):
            if batch["labels"][b, t + 1] == -100:
                continue
            projected = weight @ h_s[b, t] + bias
            total += ((projected - h_t[b, t]) ** 2).sum().item() / h_t.shape[-1]
            count += 1
    assert terms["loss_match_1_3"] == pytest.approx(total / count, rel=1e-5)
    alpha = trainer.args.alpha
    mix = alpha * terms["loss_kd"] + (1 - alpha) * terms["loss_ce"] + 0.5 * terms["loss_match_1_3"]
    assert terms["loss"] == pytest.approx(mix, rel=1e-5)


def test_alpha_zero_runs_the_teacher_for_the_matches_alone(tmp_path):
    matches = [{"student_layer": 2, "teacher_layer": 4, "loss": "cosine", "weight": 0.25}]
    dataset = sequence_dataset(n=8)
    trainer, _, teacher = build(tmp_path, bert_student(), bert_teacher(), dataset, matches, alpha=0.0)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))
    terms = trainer._train_stats.pop_means(trainer.accelerator)
    assert calls == [1] and "loss_kd" not in terms
    assert loss.item() == pytest.approx(terms["loss_ce"] + 0.25 * terms["loss_match_2_4"], rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_terms_equal_a_hand_computation(tmp_path, loss):
    """Teacher 4 heads, student 2: each student head against the mean of two consecutive teacher heads; summed over
    keys, averaged over heads, over the counted (here: attended, labelled) query positions."""
    matches = [{"student_layer": 2, "teacher_layer": 3, "feature": "attention", "loss": loss}]
    cls = BertForTokenClassification
    dataset = token_rows()
    trainer, student, teacher = build(
        tmp_path,
        bert_student(cls),
        bert_teacher(cls, num_attention_heads=4),
        dataset,
        matches,
        collator=padding_collator(),
    )
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    terms = eval_terms(trainer, batch)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # both models were switched to eager attention by the trainer
        a_s = student(**inputs, output_attentions=True).attentions[1].double()
        a_t = teacher(**inputs, output_attentions=True).attentions[2].double()
    a_t = (a_t[:, 0::2] + a_t[:, 1::2]) / 2  # heads (0, 1) -> 0, (2, 3) -> 1
    counted = batch["labels"] != -100
    if loss == "mse":
        per_query = ((a_s - a_t) ** 2).sum(-1).mean(1)
    else:
        per_query = torch.where(a_t > 0, a_t * (a_t.log() - a_s.log()), 0.0).sum(-1).mean(1)
    expected = per_query[counted].sum() / counted.sum()
    assert terms["loss_match_attn_2_3"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_captured_layers_follow_the_hidden_states_convention(family):
    """Layer k is `hidden_states[k]`: 0 the embeddings' output, L the (final-norm) last hidden state."""
    if family == "bert":
        model = seeded(lambda: BertForSequenceClassification(bert_config(16, num_hidden_layers=3)), 0)
    else:
        model = seeded(lambda: GPT2LMHeadModel(gpt2_config(16, n_layer=3)), 0)
    model.eval()
    from hf_distill.intermediate import _find_layers

    layers = _find_layers(model, "student", with_attention=False)
    ids = torch.randint(1, VOCAB_SIZE, (2, 6))
    with torch.no_grad(), capture_layers(layers, hidden=[0, 1, 2, 3], attention=[]) as captured:
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert sorted(captured["hidden"]) == [0, 1, 2, 3]
    for k in range(4):
        torch.testing.assert_close(captured["hidden"][k], expected[k], rtol=0, atol=0)


# ---- 2. projections: trained, optimised, checkpointed, never saved with the student ----


def test_projection_trains_is_checkpointed_resumes_exactly_and_is_never_saved_with_the_student(tmp_path):
    matches = [{"student_layer": 1, "teacher_layer": 2}, {"student_layer": 2, "teacher_layer": 4, "loss": "cosine"}]

    def run(output_dir, resume=None):
        trainer, student, _ = build(
            tmp_path,
            bert_student(),
            bert_teacher(),
            sequence_dataset(n=48),
            matches,
            output_dir=str(output_dir),
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            learning_rate=1e-2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, student

    trainer, student = run(tmp_path / "full")
    projections = list(trainer._intermediate.projections.parameters())
    assert len(projections) == 4  # two Linear(16, 32)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in projections} <= optimised
    initial = seeded(lambda: torch.nn.Linear(16, 32), 0)  # any fresh init differs from trained weights
    assert not torch.equal(projections[0].detach(), initial.weight)

    # Gradients reach the projections.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(4)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
    trainer._intermediate.zero_grad(set_to_none=True)

    # Each checkpoint carries them (and the optimizer state for them); the student's saved weights never do.
    checkpoint = tmp_path / "full" / "checkpoint-3"
    with safe_open(str(checkpoint / PROJECTIONS_FILE), framework="pt") as f:
        assert sorted(f.keys()) == sorted(trainer._intermediate.projections.state_dict())
        assert json.loads(f.metadata()["matches"]) == trainer._intermediate.describe()
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == sum(1 for _ in student.parameters()) + len(projections)
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", checkpoint):
        saved = {}
        for file in folder.glob("model*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                saved.update({name: f.get_tensor(name) for name in f.keys()})
        assert saved and len(saved) <= len(student.state_dict())
        for name, tensor in saved.items():
            for parameter in projections:
                assert not (tensor.shape == parameter.shape and torch.equal(tensor, parameter.detach())), name
    assert not (tmp_path / "final" / PROJECTIONS_FILE).exists()

    # Resuming from the middle reproduces the uninterrupted run's logged losses and final projections exactly.
    resumed, _ = run(tmp_path / "resumed", resume=str(checkpoint))
    keys = ["loss", "loss_kd", "loss_ce", "loss_match_1_2", "loss_match_2_4"]
    full_logs = [[h[k] for k in keys] for h in trainer.state.log_history if "loss" in h]
    resumed_logs = [[h[k] for k in keys] for h in resumed.state.log_history if "loss" in h]
    assert len(full_logs) == 6 and resumed_logs == full_logs
    for a, b in zip(projections, resumed._intermediate.projections.parameters()):
        assert torch.equal(a.detach(), b.detach())


def test_a_checkpoint_without_the_projections_file_is_incomplete(tmp_path):
    """An interrupted save (the projections are written after Trainer's files): refused by path, skipped by True."""
    matches = [{"student_layer": 1, "teacher_layer": 2}]
    trainer, _, _ = build(
        tmp_path, bert_student(), bert_teacher(), sequence_dataset(n=16), matches, save_strategy="steps", save_steps=2
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    (checkpoint / PROJECTIONS_FILE).unlink()
    again, _, _ = build(tmp_path, bert_student(), bert_teacher(), sequence_dataset(n=16), matches)
    with pytest.raises(ValueError, match=PROJECTIONS_FILE):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert last_complete_checkpoint(str(tmp_path / "out"), also_needs=PROJECTIONS_FILE) == str(
        tmp_path / "out" / "checkpoint-2"
    )


# ---- 3. normalisation: gradient accumulation stays exact ----


def one_step(tmp_path, name, student_factory, teacher_factory, dataset, batch_size, accumulation, matches, collator):
    trainer, student, _ = build(
        tmp_path / name,
        student_factory,
        teacher_factory,
        dataset,
        matches,
        collator=collator,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        alpha=0.6,
    )
    before = [p.detach().clone() for p in [*student.parameters(), *trainer._intermediate.parameters()]]
    trainer.train()
    after = [p.detach() for p in [*student.parameters(), *trainer._intermediate.parameters()]]
    update = torch.cat([(a - b).flatten().double() for a, b in zip(after, before)])
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return update, log


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_gradient_accumulation_is_exact_with_matches(tmp_path, task):
    if task == "causal_lm":
        student_factory = lambda: GPT2LMHeadModel(gpt2_config(16, n_layer=2))  # noqa: E731
        teacher_factory = lambda: GPT2LMHeadModel(gpt2_config(32, n_layer=4))  # noqa: E731
        dataset, collator = causal_lm_dataset(n=16, ragged=True), None
    else:
        student_factory, teacher_factory = bert_student(), bert_teacher()
        dataset, collator = sequence_dataset(n=16, ragged=True), padding_collator()
    matches = [
        {"student_layer": 0, "teacher_layer": 0, "weight": 0.3},
        {"student_layer": 2, "teacher_layer": 4, "loss": "cosine", "weight": 2.0},
        {"student_layer": 1, "teacher_layer": 2, "feature": "attention", "loss": "kl", "weight": 0.7},
    ]
    full, full_log = one_step(tmp_path, "16x1", student_factory, teacher_factory, dataset, 16, 1, matches, collator)
    accumulated, log = one_step(tmp_path, "4x4", student_factory, teacher_factory, dataset, 4, 4, matches, collator)
    for key in ("loss", "loss_kd", "loss_ce", "loss_match_0_0", "loss_match_2_4", "loss_match_attn_1_2"):
        assert log[key] == pytest.approx(full_log[key], rel=1e-5), key
    assert full.norm() > 0
    assert ((accumulated - full).norm() / full.norm()).item() < 1e-5


# ---- 4. only the matched layers are captured ----


def test_teacher_forward_stores_only_the_hooked_layers(tmp_path):
    matches = [
        {"student_layer": 1, "teacher_layer": 2},
        {"student_layer": 2, "teacher_layer": 4, "feature": "attention"},
    ]
    trainer, _, teacher = build(tmp_path, bert_student(), bert_teacher(), sequence_dataset(n=8), matches)
    captures, calls = {}, []
    original = trainer._intermediate.capture

    def recording_capture(model, role):
        context = original(model, role)

        class Recorder:
            def __enter__(self):
                captures[role] = context.__enter__()
                return captures[role]

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Recorder()

    trainer._intermediate.capture = recording_capture
    teacher.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output)), with_kwargs=True
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))

    assert {kind: sorted(layers) for kind, layers in captures["teacher"].items()} == {"hidden": [2], "attention": [4]}
    assert {kind: sorted(layers) for kind, layers in captures["student"].items()} == {"hidden": [1], "attention": [2]}
    assert captures["teacher"]["attention"][4].shape == (8, 2, 8, 8)
    (kwargs, output), *more = calls
    assert not more and not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions")
    assert output.hidden_states is None and output.attentions is None
    # The hooks live for one forward only.
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in teacher.bert.encoder.layer)


# ---- 5. bad input: clear errors, in the arguments or at construction ----


@pytest.mark.parametrize(
    "matches, pattern",
    [
        ([{"student_layer": 1, "teacher_layer": 2, "feature": "logits"}], "unknown `feature` 'logits'"),
        ([{"student_layer": 1, "teacher_layer": 2, "loss": "huber"}], "'huber' does not apply to hidden"),
        ([{"student_layer": 1, "teacher_layer": 2, "loss": "kl"}], "'kl' is for attention matches"),
        (
            [{"student_layer": 1, "teacher_layer": 2, "feature": "attention", "loss": "cosine"}],
            "'cosine' is for hidden",
        ),
        ([{"student_layer": 0, "teacher_layer": 0, "feature": "attention"}], "layer 0 \\(the embeddings\\) has none"),
        ([{"student_layer": 1, "teacher_layer": 2, "weight": -1}], "`weight` must be a finite number ≥ 0"),
        ([{"student_layer": 1, "teacher_layer": 2, "weight": float("nan")}], "`weight` must be a finite number ≥ 0"),
        ([{"student_layer": -1, "teacher_layer": 2}], "`student_layer` must be an integer ≥ 0"),
        ([{"student_layer": 1}], "missing \\['teacher_layer'\\]"),
        ([{"student_layer": 1, "teacher_layer": 2, "layer": 3}], "unknown key\\(s\\) \\['layer'\\]"),
        ([{"student_layer": 1, "teacher_layer": 2}, {"student_layer": 1, "teacher_layer": 2}], "more than once"),
        ("minilm", "unknown preset 'minilm'"),
        ('[{"student_layer": 1,', "not valid JSON"),
    ],
)
def test_bad_matches_fail_in_the_arguments(tmp_path, matches, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        make_args(tmp_path, intermediate_matches=matches)
    assert "intermediate_matches" in str(error.value)


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("student_layer_beyond_depth", "uses student layer 3, but the student has 2 blocks"),
        ("teacher_attention_beyond_depth", "uses teacher layer 5, but the teacher has 4 blocks"),
        ("unmappable_heads", "student with 2 heads and a teacher with 3"),
        ("ensemble", "ensemble of 2"),
        ("cache_only", "no `teacher_model`"),
        ("teacher_with_cached_dataset", "cached teacher columns"),
        ("plain_module", "need transformers models"),
        ("tinybert_shallow_teacher", "teacher has 1 blocks and the student 2"),
    ],
)
def test_bad_setups_fail_at_construction(tmp_path, case, pattern):
    student, teacher = seeded(bert_student(), 0), seeded(bert_teacher(), 1)
    dataset = sequence_dataset(n=8)
    matches = [{"student_layer": 1, "teacher_layer": 2}]
    if case == "student_layer_beyond_depth":
        matches = [{"student_layer": 3, "teacher_layer": 4}]
    elif case == "teacher_attention_beyond_depth":
        matches = [{"student_layer": 2, "teacher_layer": 5, "feature": "attention"}]
    elif case == "unmappable_heads":
        teacher = BertForSequenceClassification(bert_config(24, num_hidden_layers=4, num_attention_heads=3))
        matches = [{"student_layer": 2, "teacher_layer": 4, "feature": "attention"}]
    elif case == "ensemble":
        teacher = [teacher, seeded(bert_teacher(), 2)]
    elif case == "cache_only":
        dataset, teacher = precompute_teacher_logits(teacher, dataset, batch_size=8), None
    elif case == "teacher_with_cached_dataset":
        dataset = precompute_teacher_logits(teacher, dataset, batch_size=8)
    elif case == "plain_module":
        from conftest import PlainLogitsTeacher, PlainMLP, features_dataset

        student, teacher, dataset = PlainMLP(), PlainLogitsTeacher(), features_dataset(n=8)
    elif case == "tinybert_shallow_teacher":
        teacher, matches = BertForSequenceClassification(bert_config(32, num_hidden_layers=1)), "tinybert"
    args = make_args(tmp_path, intermediate_matches=matches)
    with pytest.raises(ValueError, match=pattern):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)


# ---- 6. presets and parsing ----


def test_presets_expand_from_the_two_configs():
    student, teacher = bert_config(16, num_hidden_layers=2), bert_config(32, num_hidden_layers=4)
    assert expand_intermediate_matches("distilbert", student, teacher) == [IntermediateMatch(2, 4, "hidden", "cosine")]
    assert expand_intermediate_matches("tinybert", student, teacher) == [
        IntermediateMatch(0, 0, "hidden", "mse"),
        IntermediateMatch(1, 2, "hidden", "mse"),
        IntermediateMatch(2, 4, "hidden", "mse"),
        IntermediateMatch(1, 2, "attention", "mse"),
        IntermediateMatch(2, 4, "attention", "mse"),
    ]
    # Not a multiple: m -> floor(m * L_t / L_s), the last layer still on the last.
    uneven = expand_intermediate_matches("tinybert", bert_config(num_hidden_layers=3), teacher)
    assert [(m.student_layer, m.teacher_layer) for m in uneven if m.feature == "hidden"] == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 4),
    ]
    gpt2 = expand_intermediate_matches("distilbert", gpt2_config(n_layer=3), gpt2_config(n_layer=6))
    assert gpt2 == [IntermediateMatch(3, 6, "hidden", "cosine")]
    assert [m.name for m in expand_intermediate_matches("tinybert", student, teacher)][-1] == "loss_match_attn_2_4"


def test_matches_parse_from_flags_json_and_yaml(tmp_path):
    parser = HfArgumentParser(DistillationTrainingArguments)
    matches = [{"student_layer": 2, "teacher_layer": 4, "loss": "cosine", "weight": 0.5}]
    expected = [{"student_layer": 2, "teacher_layer": 4, "feature": "hidden", "loss": "cosine", "weight": 0.5}]
    common = ["--output_dir", str(tmp_path), "--report_to", "none"]
    (flags,) = parser.parse_args_into_dataclasses(common + ["--intermediate_matches", json.dumps(matches)])
    assert flags.intermediate_matches == expected
    (preset,) = parser.parse_args_into_dataclasses(common + ["--intermediate_matches", "tinybert"])
    assert preset.intermediate_matches == "tinybert"

    yaml_file = tmp_path / "args.yaml"
    yaml_file.write_text(
        f"output_dir: {tmp_path}\nreport_to: none\nintermediate_matches:\n"
        "  - {student_layer: 2, teacher_layer: 4, loss: cosine, weight: 0.5}\n"
    )
    (from_yaml,) = parser.parse_yaml_file(str(yaml_file))
    assert from_yaml.intermediate_matches == expected
    json_file = tmp_path / "args.json"
    json_file.write_text(json.dumps({"output_dir": str(tmp_path), "intermediate_matches": matches}))
    (from_json,) = parser.parse_json_file(str(json_file))
    assert from_json.intermediate_matches == expected
    assert json.loads(from_json.to_json_string())["intermediate_matches"] == expected


# ---- 7. model card and side evaluations ----


def test_card_records_the_expanded_matches_and_the_teacher_is_evaluated_without_them(tmp_path):
    trainer, _, _ = build(tmp_path, bert_student(), bert_teacher(), sequence_dataset(n=8), "tinybert", max_steps=1)
    trainer.eval_dataset = sequence_dataset(n=8, seed=1)
    trainer.train()
    trainer.evaluate()  # the student's results: its own evaluation, match terms included
    data = distillation_card_data(trainer)
    assert data.loss_settings["intermediate_matches"] == trainer._intermediate.describe()
    assert len(data.loss_settings["intermediate_matches"]) == 5
    assert "eval_loss_match_1_2" in data.student_results
    assert "eval_loss_kd" in data.teacher_results
    assert not any(key.startswith("eval_loss_match") for key in data.teacher_results)


# ---- 8. DDP: the projections' gradients are averaged over processes ----


@pytest.mark.slow
def test_two_process_ddp_with_matches_matches_one_process(tmp_path):
    """`tests/scripts/distributed_run.py` (GPT-2 16 -> 32 wide, ragged rows) under 2-process gloo DDP and in one
    process at the same global batch: same losses, match terms, student weights and projections."""
    from test_distributed import LAUNCH, SCRIPT, run

    matches = json.dumps([{"student_layer": 1, "teacher_layer": 2}, {"student_layer": 0, "teacher_layer": 0}])
    run([*LAUNCH, "--multi_gpu", str(SCRIPT), str(tmp_path / "ddp"), "4", matches], tmp_path)
    run([sys.executable, str(SCRIPT), str(tmp_path / "single"), "8", matches], tmp_path)
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    assert ddp["world_size"] == 2 and sorted(ddp["loss_match"]) == ["loss_match_0_0", "loss_match_1_2"]
    for a, b in zip(ddp["losses"], single["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    for key, values in single["loss_match"].items():
        assert ddp["loss_match"][key] == pytest.approx(values, rel=1e-4), key
    assert ddp["weight_norm"] == pytest.approx(single["weight_norm"], rel=1e-5)
    assert single["projection_norm"] > 0
    assert ddp["projection_norm"] == pytest.approx(single["projection_norm"], rel=1e-5)
