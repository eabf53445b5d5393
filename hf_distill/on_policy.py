"""On-policy and sequence-level distillation of causal LMs (GKD, Agarwal et al. 2024; Kim & Rush 2016).

A micro-batch chosen for generation is rebuilt as an ordinary causal-LM batch, so the trainer's counting, teacher forward
and KD machinery apply to it unchanged:

1. `prompt_mask` — the prompt of each row: its attended tokens before the first counted label (SFT rows label the
   prompt -100; a row without counted labels is all prompt);
2. `left_padded_prompts` — those tokens left-padded (``generate`` appends on the right), left-truncated to a budget;
3. `generate_completions` — one ``generate`` call on them, its sampling driven by a dedicated ``torch.Generator``;
4. `generated_batch` — ``input_ids`` = prompt + completion, ``labels`` = the completion up to and including its first
   EOS (-100 elsewhere), ``attention_mask`` without the left padding and the padding after EOS, and ``position_ids``
   that start at 0 at each row's first real token (GPT-2-style models take positions from the cache position, not the
   mask, so a left-padded row would otherwise be scored at shifted positions).

Everything here is a pure function of tensors except `generate_completions` (which runs the model) and
`generation_token_ids` (which reads the tokenizer/config).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .losses import IGNORE_INDEX


# Marks a micro-batch whose completions the student generated; removed by `compute_loss` before any model call.
GENERATED_KEY = "_hf_distill_generated"
# The generation RNG state in a checkpoint folder (one file per process in multi-process runs).
GENERATION_RNG_FILE = "generation_rng_state.pt"
# Plain sampling from the model unless `generation_kwargs` says otherwise: on-policy means the student's own
# distribution, not the top-k/top-p truncations a model's `generation_config` may default to.
DEFAULT_GENERATION_KWARGS = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def generation_rng_file(process_index: int, num_processes: int) -> str:
    """The file name of one process's generation RNG state (Trainer's ``rng_state[_i].pth`` convention)."""
    return GENERATION_RNG_FILE if num_processes <= 1 else f"generation_rng_state_{process_index}.pt"


def generation_token_ids(processing_class: Any, model: nn.Module) -> tuple[int | None, list[int]]:
    """``(pad_token_id, eos_token_ids)``: from the tokenizer, else the model's ``generation_config``, else its config.

    The pad id falls back to the (first) EOS id, as ``generate`` does. ``(None, [])`` when nothing names them.
    """
    sources = [processing_class, getattr(model, "generation_config", None), getattr(model, "config", None)]
    sources = [getattr(s, "tokenizer", s) for s in sources if s is not None]  # a processor wraps its tokenizer

    def first(name: str):
        return next((getattr(s, name) for s in sources if getattr(s, name, None) is not None), None)

    eos = first("eos_token_id")
    eos_ids = [] if eos is None else [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = first("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return (int(pad) if pad is not None else None), eos_ids


def _predicted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the labels a causal LM predicts (not -100, and not at position 0, which nothing predicts)."""
    counted = labels.ne(IGNORE_INDEX)
    counted[:, 0] = False
    return counted


def prompt_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
) -> torch.Tensor:
    """``[B, L]`` bool: the prompt tokens of each row, the attended tokens before its first counted label.

    A label counts from position 1 on (a causal LM's label at 0 predicts nothing), so rows whose labels are their input
    ids (plain LM data) keep their first token as the prompt. Rows without counted labels (or no ``labels`` at all:
    prompt-only data) are all prompt.
    """
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is None:
        return attended
    before_first = _predicted_labels(labels).cumsum(dim=1).eq(0)
    return attended & before_first


def left_padded_prompts(
    input_ids: torch.Tensor, mask: torch.Tensor, *, max_prompt_length: int | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``input_ids [B, L]`` where ``mask [B, L]`` is set, per row, left-padded: ``(ids [B, P],
    attention_mask [B, P])`` with ``P`` the longest prompt kept.

    A prompt longer than `max_prompt_length` keeps its last tokens (left-truncation). A row with no prompt token gets
    one `pad_token_id` token, attended, so no row is empty (``generate`` then continues from that token).
    """
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    rank_from_end = lengths[:, None] - mask.long().cumsum(dim=1)  # 0 for a row's last prompt token
    if max_prompt_length is not None:
        mask = mask & rank_from_end.lt(max_prompt_length)
        lengths = lengths.clamp(max=max_prompt_length)
    width = max(int(lengths.max()), 1)  # the one host sync: `generate` needs the shape
    # Each prompt token goes to column `width - 1 - rank_from_end`; every other token to a spare last column, dropped.
    destination = torch.where(mask, width - 1 - rank_from_end, width)
    batch = input_ids.shape[0]
    ids = torch.full((batch, width + 1), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    attention = torch.zeros((batch, width + 1), dtype=torch.long, device=input_ids.device)
    ids.scatter_(1, destination, input_ids)
    attention.scatter_(1, destination, mask.long())
    ids, attention = ids[:, :width], attention[:, :width]
    attention[:, -1] |= lengths.eq(0).long()  # an empty prompt: one attended pad token
    return ids, attention


def completion_mask(completions: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """``[B, N]`` bool: the generated tokens of ``completions [B, N]`` up to and including each row's first EOS (all
    of them for a row without EOS); what ``generate`` appends after EOS is padding."""
    if not eos_token_ids:
        return torch.ones_like(completions, dtype=torch.bool)
    is_eos = torch.isin(completions, torch.as_tensor(list(eos_token_ids), device=completions.device))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before.eq(0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions counting attended tokens from 0 at each row's first one (0 on the left padding), as
    ``generate`` computes them; the padding after EOS keeps increasing positions, which no counted token sees."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def generated_batch(
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    sequences: torch.Tensor,
    eos_token_ids: Sequence[int],
    *,
    with_position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """The causal-LM batch of prompts ``[B, P]`` (left-padded, ``prompt_attention [B, P]``) and the ``sequences
    [B, P + N]`` that ``generate`` returned for them.

    Returns ``input_ids = sequences``; ``attention_mask`` [B, P + N]: the prompt's, then the completion up to and
    including its first EOS; ``labels`` [B, P + N]: the completion tokens up to and including the first EOS, -100 on
    the prompt, the padding and after EOS; ``position_ids`` (`position_ids_from_mask`) when `with_position_ids`.
    """
    prompt_length = prompt_ids.shape[1]
    completions = sequences[:, prompt_length:]
    counted = completion_mask(completions, eos_token_ids)
    attention = torch.cat([prompt_attention.long(), counted.long()], dim=1)
    labels = torch.cat(
        [torch.full_like(prompt_ids, IGNORE_INDEX), completions.masked_fill(~counted, IGNORE_INDEX)], dim=1
    )
    batch = {"input_ids": sequences, "attention_mask": attention, "labels": labels}
    if with_position_ids:
        batch["position_ids"] = position_ids_from_mask(attention)
    return batch


def completion_logits_only(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A generated micro-batch (`generated_batch`) set up for both models to compute logits only where they are scored.

    Its prompt columns count nothing, yet a forward would project every position of them onto the vocabulary (the LM
    head, both log-softmaxes and the divergence: a third of the work at a 32-token prompt and 64 new tokens). Adds
    ``logits_to_keep = L - first + 1`` (``first``: the first column where any row counts a label; the extra position is
    the prompt's last token, whose logit predicts the first completion token) and keeps the last ``logits_to_keep``
    columns of ``labels``, so the shifted labels line up with the kept logits exactly as the full ones did with all of
    them. The inputs (``input_ids``, ``attention_mask``, ``position_ids``) are unchanged: the models still see the whole
    sequence. A batch that counts nothing is returned as is.
    """
    labels = batch["labels"]
    columns = _predicted_labels(labels).any(dim=0).nonzero()
    if columns.numel() == 0:
        return dict(batch)
    keep = labels.shape[1] - int(columns[0, 0]) + 1
    return {**batch, "labels": labels[:, -keep:], "logits_to_keep": keep}


@contextlib.contextmanager
def forked_global_rng(seed: int, device: torch.device):
    """The global RNGs seeded with `seed` inside the block and restored after it, so sampling inside neither disturbs
    nor depends on the run's dropout / data RNG: the CPU's, and on CUDA `device`'s. (Other accelerators' RNGs are left
    alone: sampling there is not reproduced on resume.)"""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
            torch.random.default_generator.manual_seed(seed)
            torch.cuda.manual_seed(seed)  # this device only
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def draw_seed(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from `generator` (advancing it)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def generate_completions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention: torch.Tensor,
    *,
    generator: torch.Generator,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    generation_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """``model.generate`` once on left-padded prompts ``[B, P]``; returns its sequences ``[B, P + N]`` (``N <=
    max_new_tokens``).

    Runs in eval mode (restored after), under ``torch.no_grad()`` with the KV cache, with the global RNGs seeded from
    `generator` (`forked_global_rng`), which advances by one draw per call: the same generator state gives the same
    samples, and it is all a checkpoint has to store.
    """
    settings = {**DEFAULT_GENERATION_KWARGS, **(generation_kwargs or {})}
    if not settings.get("do_sample", False):  # greedy / beam: the sampling settings would only draw warnings
        for key in ("temperature", "top_k", "top_p"):
            if key not in (generation_kwargs or {}):
                settings.pop(key, None)
    settings.setdefault("eos_token_id", list(eos_token_ids) if eos_token_ids else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forked_global_rng(draw_seed(generator), prompt_ids.device):
            sequences = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_attention,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                use_cache=True,
                **settings,
            )
    finally:
        model.train(was_training)
    return sequences


def generation_stats(batch: Mapping[str, torch.Tensor], *, on_policy: bool) -> dict[str, torch.Tensor | float]:
    """Device-side sums for the logs of one generated micro-batch: counted completion tokens, rows, whether the
    student generated it."""
    return {
        "gen_tokens": batch["labels"].ne(IGNORE_INDEX).sum(),
        "gen_rows": float(batch["labels"].shape[0]),
        "policy_batches": float(on_policy),
        "batches": 1.0,
    }
