"""Tiny models built from configs and small synthetic datasets: nothing is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hub_server import HubServer
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_distill import MLPConfig, MLPForImageClassification


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "examples"))  # the MNIST example's data code: tests `from mnist_data import ...`
MNIST_DIR = REPO_ROOT.parent / "shared" / "datasets" / "mnist"

VOCAB_SIZE = 40
NUM_LABELS = 3
SEQ_LEN = 8


def bert_config(hidden_size: int = 16, **overrides) -> BertConfig:
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**values, **overrides})


def gpt2_config(n_embd: int = 16, **overrides) -> GPT2Config:
    values = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2Config(**{**values, **overrides})


class PlainMLP(nn.Module):
    """A plain `nn.Module` classifier (no transformers base class), returning a `ModelOutput` like Trainer expects."""

    def __init__(self, in_features: int = 8, hidden: int = 16, num_labels: int = NUM_LABELS):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_labels))

    def forward(self, features, labels=None):
        logits = self.net(features)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PlainLogitsTeacher(nn.Module):
    """A teacher that is a bare `nn.Module` returning a logits tensor."""

    def __init__(self, in_features: int = 8, num_labels: int = NUM_LABELS):
        super().__init__()
        self.linear = nn.Linear(in_features, num_labels)

    def forward(self, features):
        return self.linear(features)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequence_dataset(n: int = 32, seed: int = 0, ragged: bool = False, labels: bool = True) -> datasets.Dataset:
    """Token ids with one class label per row. `ragged` gives rows different lengths (padding when batched)."""
    g = _generator(seed)
    lengths = torch.randint(3, SEQ_LEN + 1, (n,), generator=g) if ragged else torch.full((n,), SEQ_LEN)
    rows = {"input_ids": [torch.randint(1, VOCAB_SIZE, (int(L),), generator=g).tolist() for L in lengths]}
    rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
    if labels:
        rows["labels"] = torch.randint(0, NUM_LABELS, (n,), generator=g).tolist()
    return datasets.Dataset.from_dict(rows)


def token_dataset(n: int = 32, seed: int = 0) -> datasets.Dataset:
    """Token classification: one label per token, some positions -100."""
    g = _generator(seed)
    ids = torch.randint(1, VOCAB_SIZE, (n, SEQ_LEN), generator=g)
    labels = torch.randint(0, NUM_LABELS, (n, SEQ_LEN), generator=g)
    labels[torch.rand(n, SEQ_LEN, generator=g) < 0.25] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def causal_lm_dataset(n: int = 32, seed: int = 0, ragged: bool = False) -> datasets.Dataset:
    """Causal LM rows whose labels are the input ids; `ragged` rows are right-padded with label -100."""
    g = _generator(seed)
    ids = torch.randint(1, VOCAB_SIZE, (n, SEQ_LEN), generator=g)
    attention = torch.ones_like(ids)
    if ragged:
        lengths = torch.randint(2, SEQ_LEN + 1, (n,), generator=g)
        attention = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(attention == 0, -100)
    ids = ids.masked_fill(attention == 0, 0)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": attention.tolist(), "labels": labels.tolist()}
    )


def image_dataset(n: int = 32, seed: int = 0) -> datasets.Dataset:
    g = _generator(seed)
    return datasets.Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 1, 8, 8, generator=g).tolist(),
            "labels": torch.randint(0, NUM_LABELS, (n,), generator=g).tolist(),
        }
    )


def features_dataset(n: int = 32, seed: int = 0) -> datasets.Dataset:
    g = _generator(seed)
    return datasets.Dataset.from_dict(
        {
            "features": torch.randn(n, 8, generator=g).tolist(),
            "labels": torch.randint(0, NUM_LABELS, (n,), generator=g).tolist(),
        }
    )


def seeded(factory, seed: int):
    torch.manual_seed(seed)
    return factory()


# One entry per task of the drop-in contract: (student factory, teacher factory, dataset factory).
TASKS = {
    "sequence_classification": (
        lambda: BertForSequenceClassification(bert_config(16)),
        lambda: BertForSequenceClassification(bert_config(32)),
        sequence_dataset,
    ),
    "token_classification": (
        lambda: BertForTokenClassification(bert_config(16)),
        lambda: BertForTokenClassification(bert_config(32)),
        token_dataset,
    ),
    "causal_lm": (
        lambda: GPT2LMHeadModel(gpt2_config(16)),
        lambda: GPT2LMHeadModel(gpt2_config(32, n_layer=2)),
        causal_lm_dataset,
    ),
    # hf-distill's MLP rather than a tiny ViT: plain Trainer does not resume ViT bit-exactly (transformers 5.24:
    # losses after the checkpoint drift by ~1e-4 with `Trainer` alone), and exact resume is what is tested here.
    "image_classification": (
        lambda: MLPForImageClassification(MLPConfig(image_size=8, hidden_sizes=[16], num_labels=NUM_LABELS)),
        lambda: MLPForImageClassification(MLPConfig(image_size=8, hidden_sizes=[32, 32], num_labels=NUM_LABELS)),
        image_dataset,
    ),
    "plain_module": (lambda: PlainMLP(hidden=16), lambda: PlainLogitsTeacher(), features_dataset),
}


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def hub_server():
    """A local Hub-compatible server (see `tests/hub_server.py`), shared by the session; failures reset per test."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub(hub_server):
    """`hub_server` with no injected failures left over from another test."""
    hub_server.reset_failures()
    yield hub_server
    hub_server.reset_failures()
