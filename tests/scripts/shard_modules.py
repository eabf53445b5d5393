"""`shard_with_fsdp2` on teachers of several shapes, in 2 processes over gloo: the outputs must equal the unsharded
module's, and each process must hold about half of the parameters. Run by tests/test_sharded_teacher.py with
`torchrun --nproc_per_node 2`; writes `<output_dir>/result.json` on rank 0.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from hf_distill.distributed import shard_with_fsdp2
from hf_distill.teachers import EnsembleTeacher


def bert_mlm():  # input and output embeddings tied: BertEmbeddings must stay in the root's unit
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    return BertForMaskedLM(config)


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16))


class Plain(nn.Module):  # no `_no_split_modules`: one unit
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


dist.init_process_group("gloo")
output_dir = Path(sys.argv[1])
ids = torch.randint(1, 40, (2, 8), generator=torch.Generator().manual_seed(0))
results = {}
builders = {
    "bert_mlm": bert_mlm,
    "gpt2": gpt2,
    "plain": Plain,
    "ensemble": lambda: EnsembleTeacher([gpt2(), gpt2()], "mean_probs", None, 2.0),
}
for name, build in builders.items():
    torch.manual_seed(0)
    model = build().eval().requires_grad_(False)
    expected = logits(model, ids)
    total = sum(p.numel() for p in model.parameters())
    shard_with_fsdp2(model, torch.device("cpu"))
    with torch.no_grad():
        got = [logits(model, ids) for _ in range(2)]  # twice: the second forward after resharding
    local = sum(p.to_local().numel() for p in model.parameters())
    gathered = [None, None]
    dist.all_gather_object(gathered, local)
    results[name] = {
        "max_abs_diff": max((g - expected).abs().max().item() for g in got),
        "local_numel": gathered,
        "total_numel": total,
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
    }
if dist.get_rank() == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # see tests/scripts/sharded_run.py: skip the interpreter's shutdown
