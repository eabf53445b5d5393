"""The fused lm_head + KD loss equals the naive path (full logits → the existing loss functions → autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, VOCAB_SIZE, bert_config, causal_lm_dataset, gpt2_config, seeded, sequence_dataset
from test_trainer import make_args as trainer_make_args
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    BertForSequenceClassification,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import hf_distill.trainer as trainer_module
from hf_distill import DistillationTrainer, DistillationTrainingArguments, losses, precompute_teacher_logits
from hf_distill.fused import fused_linear_distillation_loss


JSD_BETA = 0.3
UPSTREAM = 0.37  # an upstream gradient ≠ 1, as the trainer's division by the counted positions gives
N, H, H_TEACHER, VOCAB, PADDED, K = 13, 8, 6, 29, 32, 5


def head(hidden, weight, bias, scale, softcap):
    logits = F.linear(hidden, weight, bias)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def make_inputs(seed=0, bias=True, vocab=VOCAB, head_rows=VOCAB):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(head_rows, H, generator=g) / 2).requires_grad_()
    student_bias = torch.randn(head_rows, generator=g).requires_grad_() if bias else None
    teacher_hidden = torch.randn(N, H_TEACHER, generator=g)
    teacher_weight = torch.randn(head_rows + 3, H_TEACHER, generator=g) / 2  # a teacher padded differently
    teacher_bias = torch.randn(head_rows + 3, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[1, 4, 5, 11]] = False
    labels = torch.randint(0, head_rows, (N,), generator=g)
    labels[[1, 4, 5, 7]] = losses.IGNORE_INDEX  # row 7 counts for KD but has no label
    return dict(
        student_hidden=student_hidden,
        student_weight=weight,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        mask=mask,
        labels=labels,
    )


def naive(inputs, *, source, kd_weight, ce_weight, temperature, loss_type, vocab_size, scale, softcap, use_labels):
    """The trainer's naive computation on full logits: (loss, kd_sum, ce_sum)."""
    student = head(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], scale, softcap)
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 0.5, 7.0).detach()
    kwargs = dict(temperature=temperature, loss_type=loss_type, jsd_beta=JSD_BETA)
    student_kd, teacher_kd = student[:, :vocab_size], teacher[:, :vocab_size]
    if source.startswith("top_k"):
        log_probs = teacher_kd.log_softmax(-1)
        top = log_probs.topk(K, dim=-1)
        if source == "top_k_tail":
            tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
            student_kd, teacher_kd = losses.top_k_tail_logits(student_kd, top.indices, top.values, tail, temperature)
        else:
            student_kd, teacher_kd = student_kd.gather(-1, top.indices), top.values
    kd_sum = losses.masked_sum(losses.distillation_divergence(student_kd, teacher_kd, **kwargs), inputs["mask"])
    ce_sum = (
        F.cross_entropy(student.float(), inputs["labels"], ignore_index=losses.IGNORE_INDEX, reduction="sum")
        if use_labels
        else torch.zeros(())
    )
    return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum


def teacher_arguments(inputs, source, vocab_size):
    """The teacher signal as `fused_linear_distillation_loss` takes it, for each source."""
    if source == "online":
        return dict(
            teacher_hidden=inputs["teacher_hidden"],
            teacher_weight=inputs["teacher_weight"],
            teacher_bias=inputs["teacher_bias"],
            teacher_logit_scale=0.5,
            teacher_softcap=7.0,
        )
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 0.5, 7.0)
    teacher = teacher[:, :vocab_size]
    if source == "cache":
        return dict(teacher_logits=teacher)
    top = teacher.log_softmax(-1).topk(K, dim=-1)
    arguments = dict(top_k_ids=top.indices, top_k_logprobs=top.values)
    if source == "top_k_tail":
        arguments["top_k_tail"] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return arguments


def gradients(loss, inputs):
    tensors = [inputs["student_hidden"], inputs["student_weight"]]
    if inputs["student_bias"] is not None:
        tensors.append(inputs["student_bias"])
    return torch.autograd.grad(UPSTREAM * loss, tensors)


def assert_close_relative(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1e-30))


def fused_on(inputs, **options):
    """`fused_linear_distillation_loss` on `make_inputs`' student tensors, mask and labels."""
    return fused_linear_distillation_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["student_bias"],
        inputs["mask"],
        labels=inputs["labels"],
        **options,
    )


CASES = [
    # (source, loss_type, temperature, kd_weight, ce_weight, padded, scale, softcap, bias, chunk_size)
    ("online", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("online", "reverse_kl", 1.0, 1.0, 0.0, True, 1.0, None, False, 3),
    ("online", "jsd", 3.0, 0.5, 0.5, True, 0.8, 5.0, True, 5),
    ("online", "mse", 2.0, 0.7, 0.3, False, 1.0, 4.0, True, 100),
    ("cache", "kl", 1.0, 0.9, 0.1, True, 1.3, None, True, 1),
    ("cache", "reverse_kl", 2.0, 0.6, 0.4, False, 1.0, 6.0, False, 4),
    ("cache", "jsd", 1.0, 1.0, 0.0, False, 1.0, None, True, 7),
    ("cache", "mse", 4.0, 0.2, 0.8, True, 1.0, None, True, 2),
    ("top_k", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("top_k", "jsd", 1.0, 1.0, 0.0, True, 1.0, 5.0, True, 3),
    ("top_k_tail", "kl", 2.0, 0.9, 0.1, False, 1.0, None, True, 4),
    ("top_k_tail", "reverse_kl", 1.0, 0.5, 0.5, True, 0.7, 6.0, False, 6),
    ("top_k_tail", "mse", 3.0, 1.0, 0.0, False, 1.0, None, True, 5),
    ("top_k_tail", "jsd", 2.0, 0.8, 0.2, False, 1.0, None, True, 100),
    ("online", "kl", 50.0, 0.9, 0.1, False, 1.0, None, True, 4),  # float64 above T = 20: autograd per chunk
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[:5])))
def test_value_and_gradients_equal_naive(case):
    source, loss_type, temperature, kd_weight, ce_weight, padded, scale, softcap, bias, chunk_size = case
    inputs = make_inputs(bias=bias, head_rows=PADDED if padded else VOCAB)
    vocab_size = VOCAB
    settings = dict(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, loss_type=loss_type)
    use_labels = True
    expected, expected_kd, expected_ce = naive(
        inputs, source=source, vocab_size=vocab_size, scale=scale, softcap=softcap, use_labels=use_labels, **settings
    )
    expected_grads = gradients(expected, inputs)
    result = fused_on(
        inputs,
        jsd_beta=JSD_BETA,
        vocab_size=vocab_size if padded or source == "online" else None,
        student_logit_scale=scale,
        student_softcap=softcap,
        chunk_size=chunk_size,
        **teacher_arguments(inputs, source, vocab_size),
        **settings,
    )
    torch.testing.assert_close(result.loss, expected.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.kd_sum, expected_kd.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.ce_sum, expected_ce.float(), rtol=1e-5, atol=0)
    assert not result.teacher_nonfinite and not result.kd_sum.requires_grad
    for actual, wanted in zip(gradients(result.loss, inputs), expected_grads):
        assert_close_relative(actual, wanted)


@pytest.mark.parametrize("source", ["online", "cache"])
def test_every_row_counted_equals_naive(source):
    """The trainer's usual input (only counted positions; chunks are then slices of the rows): float16 cache too."""
    inputs = make_inputs()
    inputs["mask"][:] = True
    inputs["labels"][inputs["labels"] == losses.IGNORE_INDEX] = 2
    settings = dict(kd_weight=0.6, ce_weight=0.4, temperature=2.0, loss_type="kl")
    teacher = teacher_arguments(inputs, source, VOCAB)
    if source == "cache":  # the naive reference reads the same float16-rounded teacher
        teacher["teacher_logits"] = teacher["teacher_logits"].detach().half()
        rounded = teacher["teacher_logits"].float()
        student = head(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], 1.0, None)
        kd_sum = losses.distillation_divergence(student, rounded, temperature=2.0, loss_type="kl").sum()
        ce_sum = F.cross_entropy(student, inputs["labels"], reduction="sum")
        expected = 0.6 * kd_sum + 0.4 * ce_sum
    else:
        expected, _, _ = naive(
            inputs, source=source, vocab_size=VOCAB, scale=1.0, softcap=None, use_labels=True, **settings
        )
    expected_grads = gradients(expected, inputs)
    result = fused_on(
        inputs,
        vocab_size=VOCAB,
        chunk_size=4,
        **teacher,
        **settings,
    )
    torch.testing.assert_close(result.loss, expected.float(), rtol=1e-5, atol=0)
    for actual, wanted in zip(gradients(result.loss, inputs), expected_grads):
        assert_close_relative(actual, wanted)


def test_without_labels_and_unmasked_rows_never_read():
    """No label term; NaN in the hidden states and teacher logits of rows that do not count stays out (the naive
    reference runs on the clean inputs: through a matmul its own weight gradient would turn NaN)."""
    inputs = make_inputs()
    teacher = head(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 1.0, None)[:, :VOCAB]
    student = head(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], 1.0, None)
    values = losses.distillation_divergence(student, teacher, temperature=2.0, loss_type="kl")
    expected = losses.masked_sum(values, inputs["mask"])
    expected_grads = gradients(expected, inputs)
    with torch.no_grad():
        inputs["student_hidden"][1] = float("nan")
    teacher[1] = float("nan")
    result = fused_linear_distillation_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["student_bias"],
        inputs["mask"],
        teacher_logits=teacher,
        temperature=2.0,
        chunk_size=3,
    )
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=0)
    assert result.ce_sum == 0 and not result.teacher_nonfinite
    for actual, wanted in zip(gradients(result.loss, inputs), expected_grads):
        assert_close_relative(actual, wanted)


def test_nonfinite_teacher_on_a_counted_row_is_reported():
    inputs = make_inputs()
    teacher = torch.zeros(N, VOCAB)
    teacher[0, 3] = float("inf")
    result = fused_linear_distillation_loss(
        inputs["student_hidden"], inputs["student_weight"], teacher_logits=teacher, chunk_size=4
    )
    assert result.teacher_nonfinite


def test_tied_embeddings_and_bfloat16():
    """A head tied to the input embedding gets both gradients; bf16 inputs give bf16 gradients close to float32's."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(VOCAB, H)
    tokens = torch.randint(0, VOCAB, (N,))
    teacher = torch.randn(N, VOCAB)
    labels = torch.randint(0, VOCAB, (N,))

    def run(fused):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(tokens))
        if fused:
            loss = fused_linear_distillation_loss(
                hidden, embedding.weight, teacher_logits=teacher, labels=labels, ce_weight=0.5, chunk_size=5
            ).loss
        else:
            logits = F.linear(hidden, embedding.weight)
            kd = losses.distillation_divergence(logits, teacher, temperature=1.0).sum()
            loss = kd + 0.5 * F.cross_entropy(logits, labels, reduction="sum")
        loss.backward()
        return loss.detach(), embedding.weight.grad.clone()

    (fused_loss, fused_grad), (naive_loss, naive_grad) = run(True), run(False)
    torch.testing.assert_close(fused_loss, naive_loss, rtol=1e-5, atol=0)
    assert_close_relative(fused_grad, naive_grad)

    # A bf16 model: its head's matmuls run in bf16 (forward and backward, as autograd runs them), the loss in float32.
    hidden = torch.randn(N, H, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(VOCAB, H, dtype=torch.bfloat16, requires_grad=True)
    result = fused_linear_distillation_loss(hidden, weight, teacher_logits=teacher.bfloat16(), chunk_size=4)
    result.loss.backward()
    assert result.loss.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    reference_hidden, reference_weight = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    reference = losses.distillation_divergence(
        F.linear(reference_hidden, reference_weight), teacher.bfloat16(), temperature=1.0
    ).sum()
    reference.backward()
    torch.testing.assert_close(result.loss, reference, rtol=1e-5, atol=0)
    for actual, wanted in ((hidden.grad, reference_hidden.grad), (weight.grad, reference_weight.grad)):
        torch.testing.assert_close(actual.float(), wanted.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_heads_in_its_dtype(dtype):
    """Under autocast the logits path multiplies in bf16/fp16 (float32 weights); the fused path does the same, and hands
    back float32 gradients for float32 parameters."""
    inputs = make_inputs()
    settings = dict(kd_weight=0.7, ce_weight=0.3, temperature=2.0)

    def fused():
        return fused_on(
            inputs, vocab_size=VOCAB, chunk_size=4, **teacher_arguments(inputs, "online", VOCAB), **settings
        )

    with torch.autocast("cpu", dtype=dtype):
        expected, _, _ = naive(
            inputs,
            source="online",
            vocab_size=VOCAB,
            scale=1.0,
            softcap=None,
            use_labels=True,
            loss_type="kl",
            **settings,
        )
        expected_grads = gradients(expected, inputs)
        result = fused()
        actual_grads = gradients(result.loss, inputs)
    # 1e-4: the test's teacher scales and softcaps its logits, in bf16/fp16 on the logits path, in float32 here.
    torch.testing.assert_close(result.loss, expected.float(), rtol=1e-4, atol=0)
    for actual, wanted in zip(actual_grads, expected_grads):
        assert actual.dtype == torch.float32
        assert_close_relative(actual, wanted, rtol=1e-2)
    float32 = fused()
    # The products really were rounded: the float32 heads are much further from the logits path under autocast.
    assert 5 * (result.loss - expected).abs() < (float32.loss - expected).abs()


def test_float16_gradients_below_its_range_survive():
    """Under fp16 autocast the fused gradients are formed before any loss scale: entries of ~1e-13 (the gradient of
    classes both models give ~e^-30) would flush to zero in float16 (smallest subnormal 6e-8); they must not."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).abs().add_(1.0).requires_grad_()
    weight = torch.zeros(VOCAB, H)
    weight[0] = 30.0 / H  # class 0 takes logit ≈ 30 · mean(hidden); every other class ≈ 0 plus noise
    weight[1:] = torch.randn(VOCAB - 1, H, generator=g) * 0.05
    weight.requires_grad_()
    teacher = torch.zeros(N, VOCAB)
    teacher[:, 0] = 35.0

    def weight_gradient():
        weight.grad = None
        fused_linear_distillation_loss(hidden, weight, teacher_logits=teacher, chunk_size=4).loss.backward()
        return weight.grad.clone()

    float32 = weight_gradient()
    with torch.autocast("cpu", dtype=torch.float16):
        half = weight_gradient()
    tiny = float32[1:].abs()
    assert tiny.max() < 1e-9 and (tiny > 0).all()  # the case: rare classes' gradients far below float16's range
    assert (half[1:] != 0).all()
    torch.testing.assert_close(half[1:], float32[1:], rtol=0.2, atol=0)


def test_no_grad_gives_the_values():
    inputs = make_inputs()
    with torch.no_grad():
        result = fused_linear_distillation_loss(
            inputs["student_hidden"],
            inputs["student_weight"],
            inputs["student_bias"],
            inputs["mask"],
            labels=inputs["labels"],
            ce_weight=0.5,
            **teacher_arguments(inputs, "online", VOCAB),
            vocab_size=VOCAB,
        )
    expected, _, _ = naive(
        inputs,
        source="online",
        kd_weight=1.0,
        ce_weight=0.5,
        temperature=1.0,
        loss_type="kl",
        vocab_size=VOCAB,
        scale=1.0,
        softcap=None,
        use_labels=True,
    )
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=0)


def test_bad_arguments_are_named():
    inputs = make_inputs()
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    with pytest.raises(ValueError, match="exactly one teacher signal"):
        fused_linear_distillation_loss(hidden, weight)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB + 1))
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB), vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="Unknown distillation loss"):
        fused_linear_distillation_loss(hidden, weight, teacher_logits=torch.zeros(N, VOCAB), loss_type="nope")


# ---- through the trainer ----


def tiny(config_class, hidden_size, **overrides):
    """A one-layer config of a Llama-like family, `hidden_size` wide (two heads, one key/value head)."""
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return config_class(**{**values, **overrides})


FAMILIES = {
    "gpt2": (lambda: GPT2LMHeadModel(gpt2_config(16)), lambda: GPT2LMHeadModel(gpt2_config(32, n_layer=2))),
    "llama": (
        lambda: LlamaForCausalLM(tiny(LlamaConfig, 16)),
        lambda: LlamaForCausalLM(tiny(LlamaConfig, 24, num_hidden_layers=2, tie_word_embeddings=True)),
    ),
}


# Models whose logits are transformed after the head: softcapping (Gemma 2) and a logit scale (Cohere).
FAMILIES["gemma2_softcap"] = (
    lambda: Gemma2ForCausalLM(tiny(Gemma2Config, 16, head_dim=8, final_logit_softcapping=3.0)),
    lambda: Gemma2ForCausalLM(tiny(Gemma2Config, 24, head_dim=12, final_logit_softcapping=5.0)),
)
FAMILIES["cohere_scale"] = (
    lambda: CohereForCausalLM(tiny(CohereConfig, 16, logit_scale=0.3)),
    lambda: CohereForCausalLM(tiny(CohereConfig, 24, logit_scale=0.7)),
)


def make_args(tmp_path, **overrides) -> DistillationTrainingArguments:
    """`test_trainer.make_args` with this file's run: batches of 4, 20 steps, alpha 0.7, T 2."""
    values = dict(per_device_train_batch_size=4, max_steps=20, alpha=0.7, temperature=2.0)
    return trainer_make_args(tmp_path, **{**values, **overrides})


def train_logs(tmp_path, name, family, fuse, teacher=None, dataset=None, **overrides):
    """Train a seeded student; the logged (loss, loss_kd, loss_ce) per step, its final weights, and the trainer."""
    student_factory, teacher_factory = FAMILIES[family]
    model = seeded(student_factory, 0)
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher if teacher is not None or dataset is not None else seeded(teacher_factory, 1),
        args=make_args(tmp_path / name, kd_fuse_lm_head=fuse, **overrides),
        train_dataset=dataset if dataset is not None else causal_lm_dataset(n=40, ragged=True),
    )
    trainer.train()
    logs = [
        tuple(log.get(key) for key in ("loss", "loss_kd", "loss_ce"))
        for log in trainer.state.log_history
        if "loss" in log
    ]
    return logs, torch.cat([p.detach().flatten() for p in model.parameters()]), trainer


def assert_same_run(fused, naive, abs=None):
    """Same logged (loss, loss_kd, loss_ce) to 1e-5 relative (`abs`: an absolute floor, for near-zero KD values whose
    float32 rounding, ~1e-7, is a larger share), and the same final weights."""
    assert len(fused[0]) == len(naive[0]) > 0
    for fused_log, naive_log in zip(fused[0], naive[0]):
        assert [value is None for value in fused_log] == [value is None for value in naive_log]
        assert [v for v in fused_log if v is not None] == pytest.approx(
            [v for v in naive_log if v is not None], rel=1e-5, abs=abs
        )
    torch.testing.assert_close(fused[1], naive[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("loss_type", ["kl", "jsd"])
def test_fused_training_logs_the_naive_losses(tmp_path, family, loss_type):
    """20 steps, online teacher, ragged batches: the same logged loss, loss_kd, loss_ce and the same weights."""
    naive = train_logs(tmp_path, "naive", family, False, distillation_loss=loss_type)
    fused = train_logs(tmp_path, "fused", family, True, distillation_loss=loss_type)
    assert all(log[2] is not None for log in fused[0])
    assert_same_run(fused, naive)
    assert fused[2]._fused_heads_checked == {"student": True, "teacher": True}


def test_fused_under_bf16_autocast(tmp_path):
    """Under `bf16=True` the student's logits come back float32 (accelerate converts its outputs) but were computed in
    bf16: the first-batch head check allows for bf16 rounding, so the fused path is taken (it was refused before), and
    it logs the naive run's losses to that rounding."""
    naive = train_logs(tmp_path, "naive", "gpt2", False, max_steps=3, bf16=True)
    fused = train_logs(tmp_path, "fused", "gpt2", True, max_steps=3, bf16=True)
    assert fused[2]._fused_heads_checked == {"student": True, "teacher": True}
    assert len(fused[0]) == len(naive[0]) == 3
    for fused_log, naive_log in zip(fused[0], naive[0]):
        assert fused_log == pytest.approx(naive_log, rel=1e-2)


@pytest.mark.parametrize("family", ["gemma2_softcap", "cohere_scale"])
def test_softcapped_and_scaled_logits_train_alike(tmp_path, family):
    """The head's transform is read from the config (and checked on the first batch) for student and teacher."""
    naive = train_logs(tmp_path, "naive", family, False, max_steps=6, distillation_loss="reverse_kl")
    fused = train_logs(tmp_path, "fused", family, True, max_steps=6, distillation_loss="reverse_kl")
    assert fused[2]._fused_heads_checked == {"student": True, "teacher": True}
    # Capped / scaled-down logits of tiny random models: loss_kd ≈ 0.007, so its float32 rounding reaches 1e-5 of it.
    assert_same_run(fused, naive, abs=2e-7)


@pytest.mark.parametrize("setting, threshold, fused", [(True, None, True), (None, 0, True), (None, None, False)])
def test_fused_path_skips_the_full_logits(tmp_path, monkeypatch, setting, threshold, fused):
    """Fused, the student's head runs on one position per row in training (`logits_to_keep=1`); automatic mode fuses
    from `FUSED_LM_HEAD_THRESHOLD` elements (tiny logits stay on the logits path)."""
    if threshold is not None:
        monkeypatch.setattr(trainer_module, "FUSED_LM_HEAD_THRESHOLD", threshold)
    student_factory, teacher_factory = FAMILIES["gpt2"]
    model = seeded(student_factory, 0)
    widths = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: widths.append(output.shape[1]))
    trainer = DistillationTrainer(
        model=model,
        teacher_model=seeded(teacher_factory, 1),
        args=make_args(tmp_path, kd_fuse_lm_head=setting, max_steps=2),
        train_dataset=causal_lm_dataset(n=16),
    )
    trainer.train()
    assert widths == ([1, 1] if fused else [SEQ_LEN, SEQ_LEN])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_gradient_accumulation_4x4_equals_16x1(tmp_path, family):
    runs = {
        name: train_logs(
            tmp_path,
            name,
            family,
            True,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
        )
        for name, batch, accumulation in (("16x1", 16, 1), ("4x4", 4, 4))
    }
    naive = train_logs(tmp_path, "naive", family, False, per_device_train_batch_size=16, max_steps=3)
    assert_same_run(runs["4x4"], runs["16x1"])
    assert_same_run(runs["16x1"], naive)


@pytest.mark.parametrize("cache", ["full", "top_k", "top_k_tail"])
def test_fused_training_from_caches_logs_the_naive_losses(tmp_path, cache):
    teacher = seeded(FAMILIES["gpt2"][1], 1)
    options = {"full": dict(dtype="float32"), "top_k": dict(top_k=6), "top_k_tail": dict(top_k=6, top_k_tail=True)}
    dataset = precompute_teacher_logits(teacher, causal_lm_dataset(n=40, ragged=True), **options[cache])
    naive = train_logs(tmp_path, "naive", "gpt2", False, dataset=dataset, max_steps=10)
    fused = train_logs(tmp_path, "fused", "gpt2", True, dataset=dataset, max_steps=10)
    assert_same_run(fused, naive)


def test_fused_alpha_one_logs_no_label_term(tmp_path):
    naive = train_logs(tmp_path, "naive", "llama", False, alpha=1.0, max_steps=5)
    fused = train_logs(tmp_path, "fused", "llama", True, alpha=1.0, max_steps=5)
    assert all(log[2] is None for log in fused[0])
    assert_same_run(fused, naive)


def test_padded_vocabularies_are_compared_on_the_tokenizers_range(tmp_path):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB_SIZE)}, unk_token="t0")), pad_token="t0"
    )
    teacher = seeded(lambda: GPT2LMHeadModel(gpt2_config(32, vocab_size=VOCAB_SIZE + 24)), 1)
    runs = {}
    for name, fuse in (("naive", False), ("fused", True)):
        model = seeded(lambda: GPT2LMHeadModel(gpt2_config(16, vocab_size=VOCAB_SIZE + 8)), 0)
        trainer = DistillationTrainer(
            model=model,
            teacher_model=teacher,
            args=make_args(tmp_path / name, kd_fuse_lm_head=fuse, max_steps=5),
            train_dataset=causal_lm_dataset(n=20, ragged=True),
            processing_class=tokenizer,
        )
        trainer.train()
        assert trainer._kd_vocab_size == VOCAB_SIZE
        logs = [(h["loss"], h["loss_kd"], h["loss_ce"]) for h in trainer.state.log_history if "loss" in h]
        runs[name] = (logs, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert_same_run(runs["fused"], runs["naive"])


def test_evaluate_and_predict_are_unaffected(tmp_path):
    """Evaluation and prediction use the logits as before; compute_metrics sees them."""
    dataset = causal_lm_dataset(n=16)
    seen = []

    def metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"accuracy": float((prediction.predictions.argmax(-1)[:, :-1] == prediction.label_ids[:, 1:]).mean())}

    results = {}
    for fuse in (False, True):
        student_factory, teacher_factory = FAMILIES["gpt2"]
        trainer = DistillationTrainer(
            model=seeded(student_factory, 0),
            teacher_model=seeded(teacher_factory, 1),
            args=make_args(tmp_path / str(fuse), kd_fuse_lm_head=fuse),
            eval_dataset=dataset,
            compute_metrics=metrics,
        )
        evaluation = trainer.evaluate()
        prediction = trainer.predict(dataset)
        results[fuse] = (evaluation, prediction.predictions)
    assert seen[0] == seen[-1] == (16, SEQ_LEN, VOCAB_SIZE)
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_ce", "eval_accuracy", "eval_teacher_agreement"):
        assert results[True][0][key] == results[False][0][key], key
    np.testing.assert_array_equal(results[True][1], results[False][1])


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("classifier", "not a causal LM"),
        ("intermediate_matches", "intermediate_matches"),
        ("plain_teacher", "teacher"),
        ("label_smoothing", "label smoothing"),
    ],
)
def test_forcing_it_where_it_cannot_apply_names_the_parameter(tmp_path, case, pattern):
    student_factory, teacher_factory = FAMILIES["gpt2"]
    student, teacher, overrides = seeded(student_factory, 0), seeded(teacher_factory, 1), {}
    dataset = causal_lm_dataset(n=8)
    if case == "classifier":
        student = BertForSequenceClassification(bert_config())
        teacher, dataset = BertForSequenceClassification(bert_config()), sequence_dataset(n=8)
    elif case == "intermediate_matches":
        overrides = dict(intermediate_matches=[{"student_layer": 1, "teacher_layer": 2, "feature": "hidden"}])
    elif case == "plain_teacher":
        teacher = PlainCausalTeacher()
    else:
        overrides = dict(label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=f"kd_fuse_lm_head=True.*{pattern}"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path, kd_fuse_lm_head=True, **overrides),
            train_dataset=dataset,
        )
    # Automatic: the same setup trains on the logits.
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=1, **overrides),
        train_dataset=dataset,
    )
    assert trainer._fused_obstacle is not None


class PlainCausalTeacher(torch.nn.Module):
    """A bare module returning causal-LM logits: no output head the fused path can use."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB_SIZE, VOCAB_SIZE)

    def forward(self, input_ids):
        return self.embedding(input_ids)


def test_a_head_it_cannot_reproduce_falls_back_or_raises(tmp_path, monkeypatch):
    """A model transforming its logits in an unknown way: automatic mode trains on the logits, True raises."""

    class Scaled(GPT2LMHeadModel):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            outputs = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs
            )
            outputs.logits = outputs.logits * 0.5
            return outputs

    with pytest.raises(ValueError, match="kd_fuse_lm_head=True.*does not give its logits"):
        train_logs(tmp_path, "forced", "gpt2", True, teacher=seeded(lambda: Scaled(gpt2_config(32)), 1), max_steps=1)
    naive = train_logs(
        tmp_path, "naive", "gpt2", False, teacher=seeded(lambda: Scaled(gpt2_config(32)), 1), max_steps=3
    )
    monkeypatch.setattr(trainer_module, "FUSED_LM_HEAD_THRESHOLD", 0)  # so that automatic mode fuses tiny logits
    auto = train_logs(tmp_path, "auto", "gpt2", None, teacher=seeded(lambda: Scaled(gpt2_config(32)), 1), max_steps=3)
    assert auto[2]._fused_heads_checked == {"student": True, "teacher": False}
    assert_same_run(auto, naive)
