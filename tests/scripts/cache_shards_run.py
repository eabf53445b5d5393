"""Precomputes a top-k teacher cache (with its tail) and writes what this process returned to
`<output_dir>/process-<i>.json`.

Run by tests/test_cache_scale.py with `accelerate launch --multi_gpu --num_processes 2` (each process writes its shard
of rows to its own Arrow file) and with plain `python` (one process, one file): every process must return the same
dataset, in row order, with the same metadata.
"""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import PartialState  # noqa: E402
from conftest import TASKS, causal_lm_dataset, seeded  # noqa: E402

from hf_distill import precompute_teacher_logits  # noqa: E402
from hf_distill.teacher_cache import read_cache_metadata  # noqa: E402


output_dir = Path(sys.argv[1])
state = PartialState(cpu=True)  # gloo on CPU, as `use_cpu=True` makes the trainer set it up
cached = precompute_teacher_logits(
    seeded(TASKS["causal_lm"][1], 1),
    causal_lm_dataset(n=21, ragged=True),  # 11 + 10 rows: uneven shards
    batch_size=4,
    top_k=4,
    top_k_tail=True,
    dtype="float32",
    cache_dir=output_dir / "shards",
)
teacher_columns = [name for name in cached.column_names if name.startswith("teacher_")]
output_dir.mkdir(parents=True, exist_ok=True)
(output_dir / f"process-{state.process_index}.json").write_text(
    json.dumps(
        {
            "num_processes": state.num_processes,
            "columns": {name: list(cached[name]) for name in teacher_columns},
            "metadata": read_cache_metadata(cached),
            "shard_files": sorted(os.listdir(output_dir / "shards")),
        }
    )
)
