"""Teacher caches at dataset scale: flat memory while precomputing, compact storage, the top-k tail bucket, and
top-k log-probabilities imported from an inference server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TASKS, VOCAB_SIZE, causal_lm_dataset, gpt2_config, seeded, sequence_dataset
from test_teacher_cache import build, logged, train
from transformers import GPT2LMHeadModel

from hf_distill import distillation_divergence, import_teacher_logprobs, precompute_teacher_logits
from hf_distill.losses import top_k_tail_logits
from hf_distill.teacher_cache import (
    TEACHER_COLUMNS,
    TEACHER_INPUT_HASH,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
    TEACHER_TOPK_TAIL,
    TeacherColumnsCollator,
    _CacheWriter,
    read_cache_metadata,
    teacher_top_k,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks" / "bench_cache_scale.py"


def teacher_bytes_per_position(cached: datasets.Dataset) -> float:
    """Bytes of the Arrow buffers of every teacher column (values, ids, tail, hash, offsets) per counted position."""
    num_bytes = 0
    for name in (c for c in TEACHER_COLUMNS if c in cached.column_names):
        for chunk in cached.data.column(name).chunks:
            storage = getattr(chunk, "storage", chunk)
            num_bytes += sum(buffer.size for buffer in storage.buffers() if buffer is not None)
    return num_bytes / read_cache_metadata(cached)["num_positions"]


def lm_rows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> datasets.Dataset:
    ids = torch.randint(1, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def collated(cached: datasets.Dataset, rows=range(4)) -> dict[str, torch.Tensor]:
    """What the trainer's collator hands the loss for these rows (the student's inputs dropped)."""
    batch = TeacherColumnsCollator(lambda features: {}, token_level=True)([cached[i] for i in rows])
    return {name: tensor for name, tensor in batch.items() if name in TEACHER_COLUMNS}


# ---- memory ----


def peak_above_start(rows: int, **config) -> dict:
    """`benchmarks/bench_cache_scale.py`'s measurement in a fresh process: peak RSS during the precompute minus the
    RSS just before it (after imports, the teacher, the dataset, and a 256-row warm-up run)."""
    command = [sys.executable, str(BENCH), "--child", "--rows", str(rows), "--warmup_rows", "256"]
    for name, value in config.items():
        command += [f"--{name}", str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        # glibc's default raises its mmap threshold as large blocks are freed, after which freed batch tensors stay
        # in the heap by chance: ±10 MiB from run to run, as much as this small workspace. A fixed threshold returns
        # them, so the resident set follows what is alive (the full-size benchmark runs with the defaults).
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    }
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_precompute_peak_memory_does_not_grow_with_rows():
    """Fresh processes, N and 4N rows: peak RSS above the start at 4N ≤ 1.2 × at N (a cache held in memory would add
    3 × the N-row cache, which is already larger than one batch's float32 logits)."""
    config = dict(vocab_size=512, seq_len=64, top_k=32, batch_size=128, hidden=16, layers=1)
    small, large = peak_above_start(2500, **config), peak_above_start(10_000, **config)
    one_batch_logits = config["batch_size"] * config["seq_len"] * config["vocab_size"] * 4
    assert small["cache_bytes"] > one_batch_logits  # the premise: the cache outgrows one batch's workspace
    growth = large["cache_bytes"] - small["cache_bytes"]
    print(
        f"peak above start: {small['peak_above_start_mib']:.1f} MiB at 2,500 rows, "
        f"{large['peak_above_start_mib']:.1f} MiB at 10,000 (cache {large['cache_bytes'] / 2**20:.1f} MiB)"
    )
    assert large["peak_above_start_mib"] <= 1.2 * small["peak_above_start_mib"]
    assert (large["peak_above_start_mib"] - small["peak_above_start_mib"]) * 2**20 < growth / 4


# ---- storage ----


def test_top_k_storage_takes_under_130_bytes_per_counted_position():
    teacher = seeded(lambda: GPT2LMHeadModel(gpt2_config(8, vocab_size=4096, n_positions=64)), 1)
    dataset = lm_rows(24, 64, 4096)
    cached = precompute_teacher_logits(teacher, dataset, top_k=32, batch_size=8)
    assert cached.features[TEACHER_TOPK_IDS] == datasets.List(datasets.List(datasets.Value("uint16"), length=32))
    assert cached.features[TEACHER_TOPK_LOGPROBS].feature.feature.dtype == "float16"
    per_position = teacher_bytes_per_position(cached)
    print(f"bytes per counted position, top-32 float16: {per_position:.2f}")
    assert per_position <= 130
    bfloat16 = precompute_teacher_logits(teacher, dataset, top_k=32, batch_size=8, dtype="bfloat16")
    assert teacher_bytes_per_position(bfloat16) == pytest.approx(per_position)
    assert read_cache_metadata(bfloat16)["dtype"] == "bfloat16"

    # The trainer's tensors: ids as int64, values as float32, each the float32 outputs rounded to the storage dtype.
    exact = collated(precompute_teacher_logits(teacher, dataset, top_k=32, batch_size=8, dtype="float32"))
    for stored, dtype in ((cached, torch.float16), (bfloat16, torch.bfloat16)):
        batch = collated(stored)
        assert batch[TEACHER_TOPK_IDS].dtype == torch.int64
        assert torch.equal(batch[TEACHER_TOPK_IDS], exact[TEACHER_TOPK_IDS])
        assert batch[TEACHER_TOPK_LOGPROBS].dtype == torch.float32
        assert torch.equal(batch[TEACHER_TOPK_LOGPROBS], exact[TEACHER_TOPK_LOGPROBS].to(dtype).float())


def test_ids_beyond_uint16_are_stored_as_int32():
    teacher = seeded(lambda: GPT2LMHeadModel(gpt2_config(4, vocab_size=70_000)), 1)
    cached = precompute_teacher_logits(teacher, lm_rows(4, 8, 70_000), top_k=4)
    assert cached.features[TEACHER_TOPK_IDS].feature.feature.dtype == "int32"
    assert read_cache_metadata(cached)["ids_dtype"] == "int32"
    assert collated(cached)[TEACHER_TOPK_IDS].max() >= 0


def test_shards_live_in_cache_dir_and_failures_leave_nothing(tmp_path):
    teacher = seeded(TASKS["causal_lm"][1], 1)
    cached = precompute_teacher_logits(teacher, causal_lm_dataset(n=8), top_k=4, cache_dir=tmp_path / "cache")
    files = [Path(f["filename"]) for f in cached.cache_files]
    assert files and all(f.parent == tmp_path / "cache" for f in files)
    # Saved and reloaded, the cache is the same.
    cached.save_to_disk(str(tmp_path / "saved"))
    reloaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert read_cache_metadata(reloaded) == read_cache_metadata(cached)
    assert torch.equal(collated(reloaded)[TEACHER_TOPK_LOGPROBS], collated(cached)[TEACHER_TOPK_LOGPROBS])
    # An in-memory dataset without cache_dir: a temporary directory (removed at exit).
    temporary = precompute_teacher_logits(teacher, causal_lm_dataset(n=8), top_k=4)
    assert "hf_distill_teacher_cache_" in temporary.cache_files[0]["filename"]

    broken = seeded(TASKS["causal_lm"][1], 1)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        precompute_teacher_logits(broken, causal_lm_dataset(n=8), top_k=4, cache_dir=tmp_path / "failed")
    assert list((tmp_path / "failed").iterdir()) == []


@pytest.mark.slow
def test_two_processes_write_one_shard_each_and_return_the_same_dataset(tmp_path):
    script = REPO_ROOT / "tests" / "scripts" / "cache_shards_run.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", "0"]
    for command, name in ((launcher, "two"), ([sys.executable], "one")):
        completed = subprocess.run(
            [*command, str(script), str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=600
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "process-0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"process-{i}.json").read_text()) for i in range(2)]
    assert two[0]["num_processes"] == 2 and len(two[0]["shard_files"]) == 2 and len(one["shard_files"]) == 1
    for process in two:  # every process returns the whole cache, in row order, with the single process's values
        assert process["metadata"] == one["metadata"]
        assert process["columns"].keys() == one["columns"].keys()
        for name, values in one["columns"].items():
            got, expected = process["columns"][name], values
            if name == TEACHER_INPUT_HASH:
                assert got == expected
            else:
                for got_row, expected_row in zip(got, expected):
                    np.testing.assert_allclose(np.asarray(got_row, float), np.asarray(expected_row, float), 1e-6)


# ---- the tail bucket ----


def full_and_tail_kl(teacher_logits, student_logits, k, temperature=1.0, loss_type="kl"):
    values, ids, tail = teacher_top_k(teacher_logits, k, tail=True)
    student, teacher = top_k_tail_logits(student_logits, ids, values, tail, temperature)
    bucketed = distillation_divergence(student, teacher, temperature=temperature, loss_type=loss_type)
    full = distillation_divergence(student_logits, teacher_logits, temperature=temperature, loss_type=loss_type)
    return full, bucketed


def test_tail_kl_is_a_lower_bound_of_the_full_kl():
    """1,000 random draws (logit scales from 0.1 to 10, k from 1 to V − 1): 0 ≤ KL over k + 1 buckets ≤ full KL."""
    generator = torch.Generator().manual_seed(0)
    vocab = 64
    for k in (1, 4, 16, 63):
        scale = 10 ** (torch.rand(250, 1, generator=generator) * 2 - 1)
        teacher = torch.randn(250, vocab, generator=generator) * scale
        student = torch.randn(250, vocab, generator=generator) * scale.flip(0)
        full, bucketed = full_and_tail_kl(teacher, student, k)
        assert (bucketed >= 0).all()
        assert (bucketed <= full + 1e-6 * full.abs().clamp(min=1)).all()
        assert (bucketed < full).any()  # a lower bound, not the same thing
    # k = V: no rest bucket, the full KL (at any temperature), and the other divergences too.
    teacher, student = torch.randn(100, vocab, generator=generator) * 3, torch.randn(100, vocab, generator=generator)
    for temperature in (1.0, 2.5):
        for loss_type in ("kl", "reverse_kl", "jsd"):
            full, bucketed = full_and_tail_kl(teacher, student, vocab, temperature, loss_type)
            torch.testing.assert_close(bucketed, full, rtol=1e-6, atol=1e-6)


def test_tail_retempering_is_exact_for_a_uniform_tail_and_never_negative():
    """At T ≠ 1 the rest mass is re-tempered as if uniform over the V − k entries outside the top k: exact when it
    is, and a divergence between two distributions (≥ 0) whatever the tail."""
    generator = torch.Generator().manual_seed(1)
    vocab, k = 50, 8
    teacher = torch.randn(200, vocab, generator=generator) * 3
    kept = teacher.topk(k, dim=-1).indices
    uniform_tail = torch.full_like(teacher, -4.0).scatter(-1, kept, teacher.gather(-1, kept).clamp(min=-3.0))
    student = torch.randn(200, vocab, generator=generator)
    for temperature in (0.5, 2.0, 4.0):
        values, ids, tail = teacher_top_k(uniform_tail, k, tail=True)
        _, bucketed_teacher = top_k_tail_logits(student, ids, values, tail, temperature)
        tempered = torch.softmax(uniform_tail / temperature, dim=-1)  # the true tempered teacher, bucketed
        expected = torch.cat([tempered.gather(-1, ids), 1 - tempered.gather(-1, ids).sum(-1, keepdim=True)], -1)
        torch.testing.assert_close(torch.softmax(bucketed_teacher / temperature, -1), expected, rtol=1e-5, atol=1e-6)
        _, bucketed = full_and_tail_kl(teacher, student, k, temperature)
        assert (bucketed >= 0).all()


@pytest.mark.parametrize("loss_type", ["kl", "jsd"])
def test_tail_cache_trains_alike_on_the_naive_and_chunked_paths(tmp_path, loss_type):
    task = "causal_lm"
    teacher = seeded(TASKS[task][1], 1)
    cached = precompute_teacher_logits(teacher, causal_lm_dataset(n=16, ragged=True), top_k=8, top_k_tail=True)
    assert cached.features[TEACHER_TOPK_TAIL] == datasets.List(datasets.Value("float16"))
    runs = {
        name: train(tmp_path, name, task, None, cached, kd_chunk_size=size, distillation_loss=loss_type)
        for name, size in (("naive", 0), ("chunked", 5))
    }
    for key in ("loss", "loss_kd"):
        assert logged(runs["chunked"], key) == pytest.approx(logged(runs["naive"], key), rel=1e-5, abs=1e-7), key
    without_tail = precompute_teacher_logits(teacher, causal_lm_dataset(n=16, ragged=True), top_k=8)
    plain = train(tmp_path, "plain", task, None, without_tail, distillation_loss=loss_type)
    assert logged(plain, "loss_kd")[0] != pytest.approx(logged(runs["naive"], "loss_kd")[0], rel=1e-3)


def test_tail_cache_at_k_equal_v_trains_like_full_logits(tmp_path):
    task = "causal_lm"
    teacher = seeded(TASKS[task][1], 1)
    dataset = causal_lm_dataset(n=16)
    full = train(tmp_path, "full", task, None, precompute_teacher_logits(teacher, dataset, dtype="float32"))
    every = precompute_teacher_logits(teacher, dataset, top_k=VOCAB_SIZE, top_k_tail=True, dtype="float32")
    assert collated(every)[TEACHER_TOPK_TAIL].eq(float("-inf")).all()  # an empty rest bucket, accepted as such
    all_k = train(tmp_path, "all_k", task, None, every, kd_chunk_size=4)
    assert logged(all_k) == pytest.approx(logged(full), rel=1e-5)


def test_tail_cache_with_logit_matching_is_refused(tmp_path):
    cached = precompute_teacher_logits(
        seeded(TASKS["causal_lm"][1], 1), causal_lm_dataset(n=8), top_k=4, top_k_tail=True
    )
    with pytest.raises(ValueError, match=r"rest bucket .*distillation_loss='mse'"):
        build(tmp_path, "mse", "causal_lm", None, cached, distillation_loss="mse")
    classification = precompute_teacher_logits(
        seeded(TASKS["sequence_classification"][1], 1), sequence_dataset(n=8), top_k=2, top_k_tail=True
    )
    trainer = train(tmp_path, "classification", "sequence_classification", None, classification)
    assert all(math.isfinite(loss) for loss in logged(trainer))
    with pytest.raises(ValueError, match="needs `top_k`"):
        precompute_teacher_logits(seeded(TASKS["causal_lm"][1], 1), causal_lm_dataset(n=4), top_k_tail=True)


# ---- imported log-probabilities ----


@torch.no_grad()
def vllm_prompt_logprobs(teacher, dataset: datasets.Dataset, k: int) -> list[dict]:
    """What vLLM returns for each row with ``prompt_logprobs=k``, as its OpenAI-compatible server writes it: per token
    j, the top-k log-probabilities of token j given the tokens before it (rank 1 first), plus token j itself when it
    is not among them; None for the first token."""
    lines = []
    for row in dataset:
        length = sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"])
        prompt = row["input_ids"][:length]  # the server sees the tokens, not the padding
        log_probs = torch.log_softmax(teacher(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
        entries = [None]
        for j in range(1, length):
            values, ids = log_probs[j - 1].topk(k)
            entry = {
                str(i): {"logprob": v, "rank": rank + 1, "decoded_token": f"<{i}>"}
                for rank, (i, v) in enumerate(zip(ids.tolist(), values.tolist()))
            }
            token = prompt[j]
            if str(token) not in entry:
                rank = int((log_probs[j - 1] > log_probs[j - 1, token]).sum()) + 1
                entry[str(token)] = {"logprob": log_probs[j - 1, token].item(), "rank": rank, "decoded_token": "?"}
            entries.append(entry)
        lines.append({"prompt_token_ids": prompt, "prompt_logprobs": entries})
    return lines


def test_imported_server_logprobs_train_like_precomputed_top_k(tmp_path):
    task = "causal_lm"
    teacher = seeded(TASKS[task][1], 1)
    dataset = causal_lm_dataset(n=24, ragged=True)
    path = tmp_path / "prompt_logprobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in vllm_prompt_logprobs(teacher, dataset, 32)))

    imported = import_teacher_logprobs(dataset, path, top_k=32, cache_dir=tmp_path / "cache")
    precomputed = precompute_teacher_logits(teacher, dataset, top_k=32)
    metadata = read_cache_metadata(imported)
    assert metadata["origin"] == "import_teacher_logprobs" and metadata["source"] == "prompt_logprobs.jsonl"
    assert metadata["teachers"] == [{"name": None, "fingerprint": None}]
    assert metadata["num_positions"] == read_cache_metadata(precomputed)["num_positions"]
    assert imported.features[TEACHER_TOPK_IDS] == precomputed.features[TEACHER_TOPK_IDS]  # uint16, as V ≤ 65,535
    assert imported[TEACHER_INPUT_HASH] == precomputed[TEACHER_INPUT_HASH]

    from_server = train(tmp_path, "imported", task, None, imported)
    from_teacher = train(tmp_path, "precomputed", task, None, precomputed)
    for key in ("loss", "loss_kd", "loss_ce"):
        assert logged(from_server, key) == pytest.approx(logged(from_teacher, key), rel=1e-6, abs=1e-9), key

    # No fingerprint: refused next to a teacher; recorded at import (`teacher=`), accepted with it.
    with pytest.raises(ValueError, match=r"imported .*teacher_model=None.*teacher=model"):
        build(tmp_path, "with_teacher", task, teacher, imported)
    recorded = import_teacher_logprobs(dataset, path, top_k=32, teacher=teacher, teacher_name="org/teacher")
    assert read_cache_metadata(recorded)["teachers"][0]["name"] == "org/teacher"
    build(tmp_path, "recorded", task, teacher, recorded)
    with pytest.raises(ValueError, match="come from teacher"):
        build(tmp_path, "other", task, seeded(TASKS[task][1], 2), recorded)


def test_imported_tail_matches_the_precomputed_tail(tmp_path):
    teacher = seeded(TASKS["causal_lm"][1], 1)
    dataset = causal_lm_dataset(n=8, ragged=True)
    lines = vllm_prompt_logprobs(teacher, dataset, 8)
    imported = import_teacher_logprobs(dataset, lines, top_k=8, top_k_tail=True, dtype="float32")
    precomputed = precompute_teacher_logits(teacher, dataset, top_k=8, top_k_tail=True, dtype="float32")
    got, expected = collated(imported, range(8)), collated(precomputed, range(8))
    assert torch.equal(got[TEACHER_TOPK_IDS], expected[TEACHER_TOPK_IDS])
    # The "server" ran each row alone, unpadded: float32 rounding apart, the same values, and the same tail (from
    # the k log-probabilities in float64 there, from the teacher's whole distribution here).
    for name in (TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_TAIL):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_import_checks_its_input(tmp_path):
    dataset = causal_lm_dataset(n=4)
    teacher = seeded(TASKS["causal_lm"][1], 1)
    lines = vllm_prompt_logprobs(teacher, dataset, 4)
    with pytest.raises(ValueError, match="3 lines for a dataset of 4 rows"):
        import_teacher_logprobs(dataset, lines[:3], top_k=4)
    with pytest.raises(ValueError, match="more lines"):
        import_teacher_logprobs(dataset, lines + lines[:1], top_k=4)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        import_teacher_logprobs(dataset, lines[1:] + lines[:1], top_k=4)
    with pytest.raises(ValueError, match="top_k=8 are needed"):
        import_teacher_logprobs(dataset, lines, top_k=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        import_teacher_logprobs(dataset, lines, top_k=4, vocab_size=8)
    nan = json.loads(json.dumps(lines))
    nan[2]["prompt_logprobs"][3] = {str(i): float("nan") for i in range(4)}
    with pytest.raises(ValueError, match=r"NaN or inf .*rows \[2\]"):
        import_teacher_logprobs(dataset, nan, top_k=4, cache_dir=tmp_path / "nan")
    assert list((tmp_path / "nan").iterdir()) == []
    # Plain lists of {token_id: logprob} per token (no metadata) work too.
    plain = [[None] + [{t: v["logprob"] for t, v in e.items()} for e in line["prompt_logprobs"][1:]] for line in lines]
    assert torch.equal(
        collated(import_teacher_logprobs(dataset, plain, top_k=4))[TEACHER_TOPK_LOGPROBS],
        collated(import_teacher_logprobs(dataset, lines, top_k=4))[TEACHER_TOPK_LOGPROBS],
    )


def test_import_widens_ids_beyond_uint16(monkeypatch):
    """Without `vocab_size`, ids start as uint16 and the column is rewritten as int32 once an id needs it."""
    monkeypatch.setattr(_CacheWriter, "ROWS_PER_RECORD_BATCH", 2)  # uint16 record batches are written first
    dataset = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 5, "labels": [[1, 2, 3]] * 5})
    line = [None, {"7": -0.5, "9": -1.5}, {"8": -0.25, "3": -2.0}]
    big = [None, {"7": -0.5, "70000": -1.5}, {"8": -0.25, "3": -2.0}]
    cached = import_teacher_logprobs(dataset, [line, line, line, big, line], top_k=2, rows_per_write=2)
    assert cached.features[TEACHER_TOPK_IDS].feature.feature.dtype == "int32"
    ids = collated(cached, range(5))[TEACHER_TOPK_IDS]
    assert ids.tolist() == [[7, 9], [8, 3]] * 3 + [[7, 70000], [8, 3]] + [[7, 9], [8, 3]]
    small = import_teacher_logprobs(dataset, [line] * 5, top_k=2)
    assert small.features[TEACHER_TOPK_IDS].feature.feature.dtype == "uint16"


def test_card_of_an_imported_tail_cache_says_where_the_teacher_came_from(tmp_path):
    from huggingface_hub import ModelCard

    dataset = causal_lm_dataset(n=8)
    lines = vllm_prompt_logprobs(seeded(TASKS["causal_lm"][1], 1), dataset, 4)
    for name, expected in ((None, None), ("org/served-teacher", "served-teacher")):
        imported = import_teacher_logprobs(dataset, lines, top_k=4, top_k_tail=True, teacher_name=name)
        trainer = build(tmp_path, f"card-{expected}", "causal_lm", None, imported, num_train_epochs=1)
        trainer.train()
        trainer.create_model_card()
        card = ModelCard.load(trainer.args.output_dir + "/README.md").data.to_dict()["distillation"]
        assert card["teacher_source"] == "imported log-probabilities"
        assert card["teacher_top_k"] == 4 and card["teacher_top_k_tail"] is True
        assert card.get("teacher") == expected
