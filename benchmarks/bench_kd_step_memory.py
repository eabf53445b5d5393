"""Peak memory of a whole online KD training step of a causal LM, per KD path, against the same models without logits.

Every variant runs three optimizer steps of the same GPT-2 student (forward + backward + AdamW) with the same GPT-2
teacher (forward, no grad), on the same batch of ``--batch_size × --seq_len`` random token ids, float32, each in a
fresh process; the figure is the process's peak RSS (``ru_maxrss``). Variants:

* ``base`` — the two models' backbones only (``model.transformer``): the student's last hidden state goes into a
  scalar (its mean square), the teacher's is computed and dropped. No tensor of the vocabulary's size per token: the
  floor any KD path is measured against (the embedding / lm_head weights ``[V, H]`` and their AdamW state are there in
  every variant);
* ``naive`` — `DistillationTrainer`, ``kd_chunk_size=0, kd_fuse_lm_head=False``: full ``[N, V]`` logits of both models,
  autograd KD loss;
* ``chunked`` — ``kd_chunk_size=None, kd_fuse_lm_head=False``: full logits, closed-form chunked KD loss;
* ``fused`` — ``kd_fuse_lm_head=True``: hidden states and heads into `hf_distill.fused`, no logits.

Reported: peak RSS, and (peak − base) in units of one float32 ``[N, V]`` tensor (``N = batch_size × seq_len``).
``alpha=1`` (the KD term alone), forward KL, T = 2. Memory does not depend on the machine's load; times are not taken.

    python benchmarks/bench_kd_step_memory.py                       # V = 32000, N = 2048; results/kd_step_memory.json
    python benchmarks/bench_kd_step_memory.py --vocab_size 128256 --batch_size 4 --results_name kd_step_memory_v128256
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("base", "naive", "chunked", "fused")


def run_variant(
    variant: str, vocab_size: int, batch_size: int, seq_len: int, hidden: int, kd_chunk_size: int | None
) -> dict:
    import datasets
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    def gpt2(layers: int, seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=hidden, n_layer=layers, n_head=hidden // 64
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return GPT2LMHeadModel(config)

    student, teacher = gpt2(2, 0), gpt2(4, 1).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch_size,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if variant == "base":

        class BackbonesOnly(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                with torch.no_grad():
                    teacher.transformer(input_ids=inputs["input_ids"])
                hidden_states = model.transformer(input_ids=inputs["input_ids"]).last_hidden_state
                return hidden_states.pow(2).mean()

        trainer = BackbonesOnly(model=student, args=TrainingArguments(**common), train_dataset=dataset)
    else:
        paths = {
            "naive": dict(kd_chunk_size=0, kd_fuse_lm_head=False),
            "chunked": dict(kd_chunk_size=None, kd_fuse_lm_head=False),
            "fused": dict(kd_fuse_lm_head=True, kd_chunk_size=kd_chunk_size),
        }[variant]
        args = DistillationTrainingArguments(**common, alpha=1.0, temperature=2.0, **paths)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    trainer.train()
    return {"variant": variant, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--kd_chunk_size", type=int, default=None, help="Rows per chunk of the fused variant (default: the trainer's)."
    )
    parser.add_argument("--results_name", default="kd_step_memory")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.vocab_size, args.batch_size, args.seq_len, args.hidden, args.kd_chunk_size)
    if args.child:
        print(json.dumps(run_variant(args.child, *shape)))
        return

    runs = {}
    for variant in VARIANTS:
        flags = [f"--vocab_size={args.vocab_size}", f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}"]
        flags += [f"--hidden={args.hidden}", f"--child={variant}"]
        flags += [f"--kd_chunk_size={args.kd_chunk_size}"] if args.kd_chunk_size is not None else []
        completed = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
        if completed.returncode != 0:
            sys.exit(f"{variant} failed:\n{completed.stderr[-4000:]}")
        runs[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{variant}: peak RSS {runs[variant]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

    num_tokens = args.batch_size * args.seq_len
    unit = num_tokens * args.vocab_size * 4  # one float32 [N, V] tensor
    base = runs["base"]["peak_rss_bytes"]
    rows = [
        "| variant | peak RSS (MiB) | above base (MiB) | above base, in float32 [N, V] tensors |",
        "|---|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        peak = runs[variant]["peak_rss_bytes"]
        runs[variant]["above_base_in_nv_tensors"] = (peak - base) / unit
        rows.append(f"| {variant} | {peak / 2**20:.0f} | {(peak - base) / 2**20:.0f} | {(peak - base) / unit:.2f} |")
    table = "\n".join(rows)
    header = (
        f"GPT-2 student 2 × {args.hidden}, teacher 4 × {args.hidden}, V = {args.vocab_size}, N = {args.batch_size} × "
        f"{args.seq_len} = {num_tokens} tokens; one float32 [N, V] tensor = {unit / 2**20:.0f} MiB; alpha = 1, forward "
        f"KL, T = 2; 3 AdamW steps; peak RSS of a fresh process per variant."
    )
    print(f"\n{header}\n\n{table}")
    RESULTS_DIR.mkdir(exist_ok=True)
    results = {
        "setup": vars(args) | {"num_tokens": num_tokens, "nv_tensor_bytes": unit},
        "runs": runs,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    (RESULTS_DIR / f"{args.results_name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS_DIR / f"{args.results_name}.md").write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
