"""The student's generated micro-batches are scored on the completion's logits alone (`logits_to_keep`): same loss and
gradients as scoring every position, with the prompt's logits never computed."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_distill import DistillationTrainer, DistillationTrainingArguments, on_policy


def _gpt2(seed: int, layers: int, width: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0
    )
    config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model


def _generated_batch():
    """Two left-padded prompts (widths 3 and 5 in a 5-column block) and 6 generated tokens, one row ending at EOS."""
    prompts = torch.tensor([[0, 0, 7, 8, 9], [10, 11, 12, 13, 14]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    completions = torch.tensor([[20, 21, 22, 1, 0, 0], [30, 31, 32, 33, 34, 35]])
    batch = on_policy.generated_batch(prompts, attention, torch.cat([prompts, completions], 1), [1])
    batch[on_policy.GENERATED_KEY] = True
    return batch


def test_completion_logits_only_slices_labels_to_the_kept_logits():
    batch = _generated_batch()
    kept = on_policy.completion_logits_only(batch)
    assert kept["logits_to_keep"] == 7  # 6 completion columns + the prompt's last token
    assert torch.equal(kept["labels"], batch["labels"][:, -7:])
    assert torch.equal(kept["input_ids"], batch["input_ids"])  # the models still see the whole sequence
    # Counted positions are the same ones, shifted the same way.
    assert kept["labels"][:, 1:].ne(-100).sum() == batch["labels"][:, 1:].ne(-100).sum() == 10
    nothing = dict(batch, labels=torch.full_like(batch["labels"], -100))
    assert "logits_to_keep" not in on_policy.completion_logits_only(nothing)


@pytest.mark.parametrize("loss", ["reverse_kl", "kl"])
def test_generated_batch_loss_and_gradients_match_the_full_logits(tmp_path, loss):
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path),
        lmbda=1.0,
        alpha=1.0,
        temperature=1.0,
        distillation_loss=loss,
        max_new_tokens=6,
        report_to=[],
        use_cpu=True,
    )
    student, teacher = _gpt2(0, 1, 16), _gpt2(1, 2, 32)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert trainer._completion_logits_only

    calls = []
    hook = student.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("logits_to_keep")), with_kwargs=True)

    class FullLogits(DistillationTrainer):
        _completion_logits_only = False

    results = {}
    for sliced in (True, False):
        student.zero_grad()
        trainer.__class__ = DistillationTrainer if sliced else FullLogits
        value = trainer.compute_loss(student, _generated_batch())
        value.backward()
        results[sliced] = (value.detach(), [p.grad.clone() for p in student.parameters()])
    hook.remove()
    assert calls == [7, None]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-8)
    for sliced_grad, full_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(sliced_grad, full_grad, rtol=1e-5, atol=1e-8)
