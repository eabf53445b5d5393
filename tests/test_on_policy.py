"""On-policy (GKD) and sequence-level distillation: `lmbda`, `seq_kd`, `hf_distill.on_policy`, through the trainer."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import VOCAB_SIZE, causal_lm_dataset, gpt2_config, seeded
from test_trainer import make_args
from transformers import GPT2LMHeadModel, HfArgumentParser

from hf_distill import DistillationTrainer, DistillationTrainingArguments, on_policy, precompute_teacher_logits
from hf_distill.checkpoints import last_complete_checkpoint
from hf_distill.models import counted_positions
from hf_distill.on_policy import GENERATED_KEY
from hf_distill.teacher_cache import TEACHER_COLUMNS


PAD, EOS = 0, 1
TOKENS = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
MAX_NEW_TOKENS = 5


def student_model(seed: int = 0) -> GPT2LMHeadModel:
    return seeded(lambda: GPT2LMHeadModel(gpt2_config(16, **TOKENS)), seed)


def teacher_model(seed: int = 1) -> GPT2LMHeadModel:
    return seeded(lambda: GPT2LMHeadModel(gpt2_config(32, n_layer=2, **TOKENS)), seed)


def sft_dataset(n: int = 16, seed: int = 0, completions: bool = True) -> datasets.Dataset:
    """SFT rows: a prompt of 2-6 tokens (label -100), then a completion of 1-3 tokens (labels = ids); ragged."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "prompt": []}
    for _ in range(n):
        prompt = torch.randint(2, VOCAB_SIZE, (int(torch.randint(2, 7, (), generator=g)),), generator=g).tolist()
        completion = torch.randint(2, VOCAB_SIZE, (int(torch.randint(1, 4, (), generator=g)),), generator=g).tolist()
        completion = completion if completions else []
        rows["input_ids"].append(prompt + completion)
        rows["labels"].append([-100] * len(prompt) + completion)
        rows["prompt"].append(prompt)
    if not completions:
        del rows["labels"]
    return datasets.Dataset.from_dict(rows)


class RecordingCollator:
    """Right-pads `input_ids` (0) and `labels` (-100), adds `attention_mask`; records each batch's prompts in order."""

    def __init__(self):
        self.prompts: list[list[list[int]]] = []

    def __call__(self, rows):
        self.prompts.append([row["prompt"] for row in rows])
        length = max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [PAD] * (length - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
            ),
        }
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in rows])
        return batch


def record_generate(model) -> list[dict]:
    """Wraps `model.generate` to record the inputs of each call (and its output)."""
    calls, original = [], model.generate

    def generate(*args, **kwargs):
        output = original(*args, **kwargs)
        calls.append(
            {
                "input_ids": kwargs["input_ids"].clone(),
                "attention_mask": kwargs["attention_mask"].clone(),
                "output": output,
            }
        )
        return output

    model.generate = generate
    return calls


def on_policy_args(tmp_path, **overrides) -> DistillationTrainingArguments:
    values = dict(
        per_device_train_batch_size=4,
        max_steps=2,
        lmbda=1.0,
        alpha=0.5,
        max_new_tokens=MAX_NEW_TOKENS,
        remove_unused_columns=False,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
    )
    return make_args(tmp_path, **{**values, **overrides})


def build(tmp_path, *, dataset=None, collator=None, student=None, teacher=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else student_model(),
        teacher_model=teacher if teacher is not None else teacher_model(),
        args=on_policy_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else sft_dataset(),
        data_collator=collator if collator is not None else RecordingCollator(),
    )


def losses_of(trainer, key: str = "loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def reference_generated_loss(student, teacher, batch, temperature: float) -> float:
    """``Σ_counted T²·KL(teacher_T ‖ student_T) / n_counted`` in float64, counted = completion tokens (shifted)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        s = student(**inputs).logits.double()[:, :-1] / temperature
        t = teacher(**inputs).logits.double()[:, :-1] / temperature
    mask = batch["labels"][:, 1:] != -100
    log_p_t, log_p_s = t.log_softmax(-1), s.log_softmax(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return float(temperature**2 * kl[mask].sum() / mask.sum())


# ---- the pure functions ----


def test_prompt_mask_left_padding_truncation_and_completion_mask():
    ids = torch.tensor([[7, 8, 9, 10, 11, 0], [5, 6, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 10, 11, -100], [-100] * 6, [3, 4, 5, 6, 7, 8]])
    mask = on_policy.prompt_mask(ids, attention, labels)
    # row 0: before its first label; row 1: no counted label, all prompt; row 2: labels = ids, the first token only
    assert unpadded(ids, mask) == [[7, 8, 9], [5, 6], [3]]
    assert on_policy.prompt_mask(ids, attention, None).equal(attention.bool())

    prompts, prompt_attention = on_policy.left_padded_prompts(ids, mask, max_prompt_length=None, pad_token_id=PAD)
    assert prompts.tolist() == [[7, 8, 9], [0, 5, 6], [0, 0, 3]]
    assert prompt_attention.tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    # left-truncation keeps the last tokens; an empty prompt gets one attended pad token, never an empty row
    empty = torch.zeros_like(mask)
    empty[0] = mask[0]
    prompts, prompt_attention = on_policy.left_padded_prompts(ids, empty, max_prompt_length=2, pad_token_id=PAD)
    assert prompts.tolist() == [[8, 9], [0, 0], [0, 0]]
    assert prompt_attention.tolist() == [[1, 1], [0, 1], [0, 1]]

    # generated: row 0 ends with EOS then padding (= EOS here too), row 1 has no EOS
    prompts = torch.tensor([[7, 8, 9], [0, 5, 6]])
    prompt_attention = torch.tensor([[1, 1, 1], [0, 1, 1]])
    sequences = torch.cat([prompts, torch.tensor([[12, EOS, EOS, EOS], [13, 14, 15, 16]])], dim=1)
    batch = on_policy.generated_batch(prompts, prompt_attention, sequences, [EOS])
    assert batch["labels"].tolist() == [[-100, -100, -100, 12, EOS, -100, -100], [-100, -100, -100, 13, 14, 15, 16]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4, 4], [0, 0, 1, 2, 3, 4, 5]]
    # the KD mask the trainer counts (shifted like the label loss): the completion up to and including EOS
    kd_mask = counted_positions(batch, token_level=True, shift=True, main_input_name="input_ids")
    hand = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert kd_mask.equal(hand)


def test_sampling_is_driven_by_its_generator_and_leaves_the_global_rng_alone():
    student = student_model()
    prompts, attention = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])

    def sample(generator):
        return on_policy.generate_completions(
            student, prompts, attention, generator=generator, max_new_tokens=8, pad_token_id=PAD, eos_token_ids=[EOS]
        )

    before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    first, second = sample(generator), sample(generator)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(generator.get_state(), state), "the generator advances"
    assert torch.equal(sample(torch.Generator().set_state(state)), first)
    assert not torch.equal(first, second)
    assert student.training, "back in train mode"


# ---- lmbda = 0 is the off-policy trainer ----


def test_lmbda_zero_explicit_equals_default_bit_for_bit(tmp_path):
    runs = []
    for explicit in (False, True):
        overrides = dict(lmbda=0.0, max_new_tokens=7, generation_kwargs={"do_sample": True}) if explicit else {}
        torch.manual_seed(123)
        trainer = DistillationTrainer(
            model=student_model(),
            teacher_model=teacher_model(),
            args=make_args(tmp_path / str(explicit), max_steps=3, alpha=0.5, **overrides),
            train_dataset=causal_lm_dataset(n=24, ragged=True),
        )
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        runs.append((losses_of(trainer), losses_of(trainer, "loss_kd"), weights, torch.get_rng_state()))
        assert not any("generated_tokens" in h for h in trainer.state.log_history)
    (losses_a, kd_a, weights_a, rng_a), (losses_b, kd_b, weights_b, rng_b) = runs
    assert losses_a == losses_b and kd_a == kd_b
    assert torch.equal(weights_a, weights_b)
    assert torch.equal(rng_a, rng_b)  # no random number drawn from the global generator


# ---- lmbda = 1 ----


def test_lmbda_one_generates_once_per_micro_batch_on_its_prompts(tmp_path):
    collator = RecordingCollator()
    trainer = build(tmp_path, collator=collator, gradient_accumulation_steps=2)
    calls = record_generate(trainer.model)
    teacher_calls = record_generate(trainer.teacher_model)
    trainer.train()
    assert len(calls) == 4 and not teacher_calls  # 2 steps × 2 micro-batches
    # the dataloader may collate one batch ahead: the calls match the first collated batches, in order
    for call, prompts in zip(calls, collator.prompts):
        assert unpadded(call["input_ids"], call["attention_mask"]) == prompts
        assert call["input_ids"][:, -1].ne(PAD).all(), "prompts are left-padded"
        assert call["output"].shape[1] <= call["input_ids"].shape[1] + MAX_NEW_TOKENS
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for log in logs:
        assert log["on_policy_fraction"] == 1.0
        assert 0 < log["completion_length"] <= MAX_NEW_TOKENS
        assert log["generated_tokens"] == pytest.approx(log["completion_length"] * 8)
        assert "loss_ce" not in log and log["loss"] == pytest.approx(log["loss_kd"], rel=1e-6)
    assert trainer.model.training


def generated_fixture(trainer):
    """A fixed generated batch: row 0 stops at EOS (then padding), row 1 is left-padded and runs to the end."""
    prompts = torch.tensor([[7, 8, 9], [0, 5, 6]])
    prompt_attention = torch.tensor([[1, 1, 1], [0, 1, 1]])
    sequences = torch.cat([prompts, torch.tensor([[12, EOS, PAD, PAD], [13, 14, 15, 16]])], dim=1)
    return on_policy.generated_batch(prompts, prompt_attention, sequences, [EOS])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_generated_batch_loss_is_kd_alone_with_weight_one(tmp_path, temperature):
    trainer = build(tmp_path, temperature=temperature, alpha=0.3)
    student, teacher = trainer.model, trainer.teacher_model
    batch = generated_fixture(trainer)
    expected = reference_generated_loss(student, teacher, batch, temperature)
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, {**batch, GENERATED_KEY: True})
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # in training, the micro-batch's share of a step that counts 10 tokens: its Σ T²·D / 10 (6 counted here)
    student.train()
    loss = trainer.compute_loss(student, {**batch, GENERATED_KEY: True}, num_items_in_batch=torch.tensor(10))
    assert loss.item() == pytest.approx(expected * 6 / 10, rel=1e-6, abs=1e-6)
    metrics = trainer._train_stats.pop_means(trainer.accelerator)
    assert "loss_ce" not in metrics and metrics["loss_kd"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_left_padded_row_scores_as_the_row_alone(tmp_path):
    """Position ids follow the mask: a left-padded generated row gets the KD it gets unpadded (GPT-2 would otherwise
    take positions from the cache position and score the padded row at shifted positions)."""
    trainer = build(tmp_path, alpha=1.0)
    batch = generated_fixture(trainer)
    trainer.model.eval()

    def kd_sum(rows):
        inputs = {key: value[rows] for key, value in batch.items()}
        if rows == slice(1, 2):  # alone: without its left padding
            inputs = {key: value[:, 1:] for key, value in inputs.items()}
            inputs["position_ids"] = inputs["position_ids"] - inputs["position_ids"][:, :1]
        with torch.no_grad():
            trainer.compute_loss(trainer.model, {**inputs, GENERATED_KEY: True})
        totals = trainer._eval_stats.totals
        trainer._eval_stats.totals = None
        return float(totals[0])

    together = kd_sum(slice(0, 2))
    assert together == pytest.approx(kd_sum(slice(0, 1)) + kd_sum(slice(1, 2)), rel=1e-5)


def test_accumulation_4x4_equals_16x1_on_policy(tmp_path):
    """Greedy decoding (do_sample=False): each row's completion does not depend on the rows batched with it, so both
    runs train on the same samples; the step loss is normalised over all 16 rows either way."""
    results = []
    for batch_size, accumulation in ((4, 4), (16, 1)):
        trainer = build(
            tmp_path / f"{batch_size}x{accumulation}",
            dataset=sft_dataset(n=32),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            generation_kwargs={"do_sample": False},
            alpha=0.8,
        )
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append((losses_of(trainer), losses_of(trainer, "generated_tokens"), weights))
    (losses_a, tokens_a, weights_a), (losses_b, tokens_b, weights_b) = results
    assert tokens_a == tokens_b
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    torch.testing.assert_close(weights_a, weights_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lmbda", [1.0, 0.5])
def test_fused_lm_head_trains_generated_batches_as_the_logits_path(tmp_path, lmbda):
    """The fused lm_head path (no logits) on generated and dataset micro-batches: the same logged losses and weights as
    the logits path (which scores generated batches on the completion's logits only)."""
    results = []
    for fuse in (False, True):
        trainer = build(
            tmp_path / str(fuse), dataset=sft_dataset(n=32), lmbda=lmbda, max_steps=4, kd_fuse_lm_head=fuse, alpha=0.7
        )
        trainer.train()
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append(([losses_of(trainer, key) for key in ("loss", "loss_kd", "on_policy_fraction")], weights))
    (logged_a, weights_a), (logged_b, weights_b) = results
    for a, b in zip(logged_a, logged_b):  # float32 rounding: the losses here are ~0.01
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(weights_a, weights_b, rtol=1e-5, atol=1e-6)


def test_long_prompt_is_left_truncated_and_still_generates(tmp_path):
    long_prompt = list(range(2, 14))  # 12 tokens
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [long_prompt + [20]], "labels": [[-100] * 12 + [20]], "prompt": [long_prompt]}
    )
    trainer = build(
        tmp_path, dataset=dataset, per_device_train_batch_size=1, max_steps=1, max_length=10, max_new_tokens=4
    )
    calls = record_generate(trainer.model)
    trainer.train()
    (call,) = calls
    assert call["input_ids"].tolist() == [long_prompt[-6:]]  # max_length - max_new_tokens = 6 last tokens
    assert call["output"].shape[1] > 6 and losses_of(trainer)[0] > 0


def test_prompt_only_rows_train_with_lmbda_one(tmp_path):
    trainer = build(tmp_path, dataset=sft_dataset(n=8, completions=False), max_steps=1)
    trainer.train()
    assert losses_of(trainer)[0] > 0
    # with lmbda < 1 the dataset's micro-batches need their completions
    with pytest.raises(ValueError, match="needs labels for the label loss"):
        build(tmp_path, dataset=sft_dataset(n=8, completions=False), lmbda=0.5, max_steps=4).train()


def test_lmbda_half_mixes_batches_and_the_fraction_is_logged(tmp_path):
    trainer = build(tmp_path, lmbda=0.5, max_steps=4, gradient_accumulation_steps=2, logging_steps=4)
    calls = record_generate(trainer.model)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["on_policy_fraction"] == len(calls) / 8
    assert 0 < len(calls) < 8, "seed 0 flips both sides in 8 coins"


def test_cached_teacher_columns_of_a_generated_batch_are_dropped(tmp_path):
    teacher = teacher_model()
    cached = precompute_teacher_logits(teacher, causal_lm_dataset(n=8), batch_size=4, dtype="float32")
    trainer = DistillationTrainer(
        model=student_model(), teacher_model=teacher, args=on_policy_args(tmp_path, max_steps=1), train_dataset=cached
    )
    teacher_calls = []
    teacher.register_forward_hook(lambda module, args, kwargs_or_output: teacher_calls.append(1))
    batch = next(iter(trainer.get_train_dataloader()))
    assert any(column in batch for column in TEACHER_COLUMNS)
    (generated,), _ = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    assert not any(column in generated for column in TEACHER_COLUMNS)
    teacher_calls.clear()
    trainer.train()
    assert teacher_calls, "the online teacher scores the generated completions"
    assert losses_of(trainer)[0] > 0


# ---- seq_kd ----


def test_seq_kd_trains_on_the_teachers_samples(tmp_path):
    trainer = build(tmp_path, lmbda=0.0, seq_kd=True, alpha=0.5)
    student_calls, teacher_calls = record_generate(trainer.model), record_generate(trainer.teacher_model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    samples, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    assert not student_calls and len(teacher_calls) == 1
    (generated,) = samples
    assert GENERATED_KEY not in generated, "the label loss applies to the teacher's samples"
    completions = teacher_calls[0]["output"][:, teacher_calls[0]["input_ids"].shape[1] :]
    counted = on_policy.completion_mask(completions, [EOS])
    width = teacher_calls[0]["input_ids"].shape[1]
    assert generated["labels"][:, width:][counted].equal(completions[counted])
    assert int(num_items) == int(counted.sum())  # KD (and CE) counted on the teacher's completions
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert "loss_ce" in log and log["on_policy_fraction"] == 0.0 and log["generated_tokens"] > 0


# ---- resuming ----


def test_resume_reproduces_sampled_run(tmp_path):
    def trainer_for(output_dir):
        return build(
            tmp_path,
            dataset=sft_dataset(n=32),
            output_dir=str(output_dir),
            lmbda=0.5,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            generation_kwargs={"do_sample": True, "temperature": 1.5},
        )

    full = trainer_for(tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / on_policy.GENERATION_RNG_FILE).exists()
    resumed = trainer_for(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("loss", "loss_kd", "generated_tokens", "on_policy_fraction"):
        assert losses_of(resumed, key) == losses_of(full, key), key
    # the state matters: resumed without it, the coins and samples (so the losses) differ
    (checkpoint / on_policy.GENERATION_RNG_FILE).unlink()
    fresh = trainer_for(tmp_path / "fresh")
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert losses_of(fresh) != losses_of(full)
    # a checkpoint without the generation RNG state is not complete
    (tmp_path / "full" / "checkpoint-4" / on_policy.GENERATION_RNG_FILE).unlink()
    with pytest.raises(ValueError, match="No complete checkpoint"):
        last_complete_checkpoint(str(tmp_path / "full"), also_needs=[on_policy.GENERATION_RNG_FILE])
    assert last_complete_checkpoint(str(tmp_path / "resumed"), also_needs=[on_policy.GENERATION_RNG_FILE]).endswith(
        "checkpoint-4"
    )


# ---- evaluation ----


def test_eval_on_policy(tmp_path):
    trainer = build(tmp_path, eval_on_policy=True, per_device_eval_batch_size=8)  # one batch: eval_loss = its mean
    calls = record_generate(trainer.model)
    metrics = trainer.evaluate(sft_dataset(n=8, seed=3))
    assert len(calls) == 1
    assert metrics["eval_on_policy_fraction"] == 1.0 and metrics["eval_generated_tokens"] > 0
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss_kd"], rel=1e-5)
    assert "eval_loss_ce" not in metrics
    again = trainer.evaluate(sft_dataset(n=8, seed=3))
    assert again["eval_loss"] == metrics["eval_loss"], "each evaluation samples the same completions"
    off = build(tmp_path, per_device_eval_batch_size=4).evaluate(sft_dataset(n=8, seed=3))
    assert "eval_generated_tokens" not in off and "eval_loss_ce" in off
    # the teacher in the student's place: its own completions, scored against itself
    teacher_metrics = trainer.evaluate_teacher(sft_dataset(n=8, seed=3))
    assert teacher_metrics["eval_loss_kd"] == pytest.approx(0.0, abs=1e-6)
    assert teacher_metrics["eval_generated_tokens"] > 0


# ---- command line and model card ----


def test_arguments_from_the_command_line_and_the_model_card(tmp_path):
    (args,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--lmbda", "0.5", "--seq_kd", "true", "--max_new_tokens", "8"]
        + ["--max_length", "24", "--generation_kwargs", '{"do_sample": false}', "--eval_on_policy", "true"]
    )
    assert (args.lmbda, args.seq_kd, args.max_new_tokens, args.max_length, args.eval_on_policy) == (
        0.5,
        True,
        8,
        24,
        True,
    )
    assert args.generation_kwargs == {"do_sample": False}

    trainer = build(tmp_path, max_steps=1)
    trainer.train()
    trainer.create_model_card(model_name="gkd-student")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "lmbda" in card and "max_new_tokens" in card


# ---- bad input ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lmbda=-0.1), "`lmbda` must be in \\[0, 1\\]"),
        (dict(lmbda=1.5), "`lmbda` must be in \\[0, 1\\]"),
        (dict(lmbda=0.5, alpha=0.0), "alpha=0 gives the distillation term no weight"),
        (dict(max_new_tokens=0), "`max_new_tokens` must be an integer > 0"),
        (dict(lmbda=0.5, max_new_tokens=16, max_length=16), "max_length=16 leaves no room for a prompt"),
        (dict(generation_kwargs={"max_new_tokens": 3}), "which the trainer sets itself"),
        (dict(generation_kwargs="[1]"), "generation_kwargs"),
    ],
)
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_bad_trainers(tmp_path):
    cached = precompute_teacher_logits(teacher_model(), causal_lm_dataset(n=8), batch_size=4, dtype="float32")
    with pytest.raises(ValueError, match="only cached teacher outputs"):
        DistillationTrainer(model=student_model(), args=on_policy_args(tmp_path), train_dataset=cached)

    no_ids = dict(pad_token_id=None, eos_token_id=None, bos_token_id=None)
    student = seeded(lambda: GPT2LMHeadModel(gpt2_config(16, **no_ids)), 0)
    student.generation_config.pad_token_id = student.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="needs a pad token id"):
        build(tmp_path, student=student)

    with pytest.raises(ValueError, match="an ensemble of teachers"):
        build(tmp_path, teacher=[teacher_model(1), teacher_model(2)], seq_kd=True)

    with pytest.raises(ValueError, match="leaves no room for a prompt before max_new_tokens=40"):
        build(tmp_path, max_new_tokens=40)  # the students' n_positions = 32
