"""Cached (offline) teacher outputs: run the teacher once over a transfer set that is not augmented.

`precompute_teacher_logits` adds the teacher's outputs to a `datasets.Dataset` as columns, one entry per row, so the
cache follows its row through shuffling, `select`, `save_to_disk` and sharding (a cache keyed by step index serves the
wrong teacher as soon as the order changes). `DistillationTrainer` uses the columns whenever a batch carries them.

Columns:

* ``teacher_logits`` — classification: ``[C]`` per row. Token level: ``[n_i, V]`` per row, one line per *counted*
  position of the row (label not -100, causal LMs shifted: exactly the trainer's positions, in order).
* ``teacher_topk_logprobs`` + ``teacher_topk_ids`` — with ``top_k=k``: the teacher's k largest log-probabilities at
  T = 1 (descending) and their class/token ids, ``[k]`` or ``[n_i, k]`` per row. The KD term is then computed on the
  teacher's top-k support, both distributions renormalised there: ``D(softmax(lp_topk / T) ‖ softmax(z[ids] / T))``.
  Log-probabilities at T = 1 differ from logits by a per-position constant, so the renormalised tempered distribution
  is the same for every T (the cache is temperature-free); what is approximated is the mass outside the top k, which
  the student is no longer asked to match.
* ``teacher_input_hash`` — int64 per row: ``blake2b(input_ids as int64 little-endian bytes, digest_size=8)`` read as
  a signed little-endian integer, the ids the outputs were computed on (before padding). The trainer's collator
  recomputes it for every row it batches and refuses a row whose ``input_ids`` changed since (a dataset re-tokenised
  to the same lengths keeps its counted positions, so nothing else would notice stale targets): ~30 µs per batch of
  16 × 64 ids, < 0.1 % of a tiny GPT-2's cached training step. Only ``input_ids`` are hashed: rows without them (images, feature vectors) get no column, since
  comparing floating-point inputs exactly would refuse harmless re-preprocessing and cost a hash over every pixel.
  A cache without the column (written before rows were hashed) is accepted with a warning that stale rows cannot be
  detected.

Outputs are checked before they are stored: NaN/inf (in float32, or from float16 overflow, ``|x| > 65504``) at a
stored position is refused with the rows it came from, so a cache never holds non-finite targets.

The metadata (teacher names and weight fingerprints, the ensemble's reduction and weights, top_k, dtype, and the
temperature when an arithmetic ensemble makes the cache depend on it) is stored in ``dataset.info.description`` as
JSON under ``hf_distill_teacher_cache``. The trainer checks it (`check_cache_matches_run`): the fingerprints against a
given teacher, an ensemble cache's reduction and normalised weights against the arguments', and an arithmetic
ensemble's temperature.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator
from transformers.utils import logging

from . import losses
from .models import accepted_arguments, counted_positions, is_token_level, logits_of, shifts_labels
from .teachers import EnsembleTeacher, as_teacher_list, ensemble_members, teacher_fingerprint, teacher_identity


logger = logging.get_logger(__name__)

TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_INPUT_HASH = "teacher_input_hash"
# The teacher's outputs, batched by `TeacherColumnsCollator`; with the row hash: every column a cache adds, which the
# trainer keeps through `remove_unused_columns` and takes out of the batch before the student sees it.
TEACHER_OUTPUT_COLUMNS = (TEACHER_LOGITS, TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_IDS)
TEACHER_COLUMNS = (*TEACHER_OUTPUT_COLUMNS, TEACHER_INPUT_HASH)
METADATA_KEY = "hf_distill_teacher_cache"
INPUT_HASH = "blake2b-8 of input_ids as int64 little-endian"  # recorded in the metadata: the hash's definition
FLOAT16_MAX = 65504.0


def input_hash(input_ids) -> int:
    """``blake2b(int64 little-endian bytes of input_ids, digest_size=8)`` as a signed int64: a row's identity.

    `input_ids` is one row's ids (a list, array or CPU tensor, any shape; not padded).
    """
    ids = np.ascontiguousarray(input_ids, dtype="<i8")
    return int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little", signed=True)


def read_cache_metadata(dataset: Any) -> dict | None:
    """The cache metadata stored by `precompute_teacher_logits`, or None (not a `datasets.Dataset`, or no cache)."""
    description = getattr(getattr(dataset, "info", None), "description", None)
    if not description:
        return None
    try:
        return json.loads(description).get(METADATA_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None


@torch.no_grad()
def precompute_teacher_logits(
    teacher: nn.Module | str | Sequence[nn.Module | str],
    dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    top_k: int | None = None,
    dtype: str = "float16",
    data_collator=None,
    ensemble_reduction: str = "mean_probs",
    teacher_weights: Sequence[float] | None = None,
    temperature: float | None = None,
    teacher_model_init_kwargs: dict | None = None,
    device: str | torch.device | None = None,
) -> datasets.Dataset:
    """Run the teacher (or an ensemble) once over `dataset` and return it with the outputs as columns.

    Args:
        teacher: a model, a path/Hub id, or a list of them (an ensemble, combined with `ensemble_reduction` and
            `teacher_weights` exactly as the trainer combines them online).
        dataset: the transfer set. Its rows must hold what the teacher's forward takes (plus ``labels`` for token
            level tasks, which choose the counted positions); other columns are carried through untouched.
        batch_size: rows per teacher forward.
        top_k: keep only the k largest log-probabilities per position (and their ids) instead of full logits.
        dtype: ``"float16"`` (half the space; logits rarely need more) or ``"float32"`` (bit-exact with online KD).
            Values beyond float16's range (``|x| > 65504``) are refused rather than stored as inf: use ``"float32"``.
        data_collator: batches rows for the teacher (e.g. `DataCollatorWithPadding`); default `default_data_collator`.
        temperature: required for an arithmetic-mean ensemble (``"mean_probs"``), whose soft targets depend on T;
            the trainer then refuses another temperature.
        device: where the teacher runs; default the accelerate process's device. When launched on several
            processes, each computes a contiguous shard and the results are gathered in row order.

    Returns:
        `dataset` with ``teacher_logits`` (or ``teacher_topk_logprobs`` and ``teacher_topk_ids``) added, and
        ``teacher_input_hash`` when its rows have ``input_ids``.

    Raises:
        ValueError: when an output to be stored is NaN/inf, in float32 or once cast to `dtype` (naming the rows of
            `dataset`, and ``dtype="float32"`` for a float16 overflow); nothing is returned then.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"`dtype` must be 'float16' or 'float32', got {dtype!r}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}.")
    teachers = as_teacher_list(teacher, None, teacher_model_init_kwargs)
    if len(teachers) > 1 and ensemble_reduction == "mean_probs" and temperature is None:
        raise ValueError("An arithmetic-mean ensemble ('mean_probs') depends on T: pass `temperature=`.")
    losses.check_ensemble_settings(ensemble_reduction, teacher_weights, len(teachers))
    if any(column in dataset.column_names for column in TEACHER_COLUMNS):
        raise ValueError(
            f"`dataset` already has teacher columns {[c for c in TEACHER_COLUMNS if c in dataset.column_names]}; "
            "remove them (`dataset.remove_columns(...)`) before computing new ones."
        )

    state = PartialState()
    device = torch.device(device) if device is not None else state.device
    token_level, shift = is_token_level(teachers[0]), shifts_labels(teachers[0])
    main_input_name = getattr(teachers[0], "main_input_name", "input_ids")
    # The same combination the trainer uses online (temperature only matters to an arithmetic mean).
    teacher = (
        teachers[0]
        if len(teachers) == 1
        else EnsembleTeacher(
            teachers, ensemble_reduction, teacher_weights, temperature if temperature is not None else 1.0
        )
    )
    teacher.eval().to(device)

    accepted = accepted_arguments(teacher) or set(dataset.column_names)
    hashed = "input_ids" in dataset.column_names  # see the module docstring: only token ids are hashed
    model_columns = [c for c in dataset.column_names if c in accepted or c in ("labels", "input_ids")]
    rows = dataset.select_columns(model_columns)
    # Contiguous shards, so gathering the processes' lists in process order restores row order.
    shard = range(len(rows))
    if state.num_processes > 1:
        per_process = -(-len(rows) // state.num_processes)
        shard = range(state.process_index * per_process, min(len(rows), (state.process_index + 1) * per_process))
    collate = data_collator or default_data_collator

    def collate_and_hash(features):  # the rows' hashes from the features, before the collator pads them
        return [input_hash(f["input_ids"]) for f in features] if hashed else None, collate(features)

    loader = DataLoader(rows.select(shard), batch_size=batch_size, collate_fn=collate_and_hash)

    storage_dtype = getattr(torch, dtype)
    outputs: dict[str, list] = {
        name: [] for name in ((TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_IDS) if top_k else (TEACHER_LOGITS,))
    }
    if hashed:
        outputs[TEACHER_INPUT_HASH] = []
    nonfinite_rows, overflow_rows, first_row = [], [], shard.start
    for hashes, batch in logging.tqdm(loader, desc="Teacher logits", disable=not state.is_local_main_process):
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        teacher_inputs = {k: v for k, v in batch.items() if k in accepted and k != "labels"}
        logits = logits_of(teacher(**teacher_inputs)).float()
        mask = counted_positions(batch, token_level=token_level, shift=shift, main_input_name=main_input_name)
        if shift:
            logits = logits[..., :-1, :]
        if top_k:
            log_probs = torch.log_softmax(logits, dim=-1)
            values, ids = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            per_row = {TEACHER_TOPK_LOGPROBS: values.to(storage_dtype), TEACHER_TOPK_IDS: ids.int()}
        else:
            values = logits
            per_row = {TEACHER_LOGITS: logits.to(storage_dtype)}
        # Rows with a non-finite value at a stored position: in float32 already, or only once stored (overflow).
        finite, stored_finite = (torch.isfinite(t).all(-1) | ~mask for t in (values, next(iter(per_row.values()))))
        if token_level:
            finite, stored_finite = finite.flatten(1).all(-1), stored_finite.flatten(1).all(-1)
        for offset, (ok, stored_ok) in enumerate(zip(finite.tolist(), stored_finite.tolist())):
            if not ok:
                nonfinite_rows.append(first_row + offset)
            elif not stored_ok:
                overflow_rows.append(first_row + offset)
        first_row += len(mask)
        for name, tensor in per_row.items():
            for row, row_mask in zip(tensor.cpu(), mask.cpu()):
                outputs[name].append((row[row_mask] if token_level else row).numpy())
        if hashed:
            outputs[TEACHER_INPUT_HASH].extend(hashes)
    if state.num_processes > 1:
        outputs = {name: gather_object(values) for name, values in outputs.items()}
        nonfinite_rows, overflow_rows = gather_object(nonfinite_rows), gather_object(overflow_rows)
    _raise_if_nonfinite(nonfinite_rows, overflow_rows, dtype)

    hashes = outputs.pop(TEACHER_INPUT_HASH, None)
    if token_level:
        # Array2D with a variable first axis: read back as one ndarray per row, ~2x faster than nested lists.
        features = datasets.Features(
            {
                name: datasets.Array2D(
                    shape=(None, values[0].shape[-1]), dtype="int32" if name == TEACHER_TOPK_IDS else dtype
                )
                for name, values in outputs.items()
            }
        )
        columns = datasets.Dataset.from_dict(outputs, features=features)
    else:
        columns = datasets.Dataset(pa.table({name: _rows_to_arrow(values) for name, values in outputs.items()}))
    if hashes is not None:
        columns = columns.add_column(TEACHER_INPUT_HASH, pa.array(hashes, type=pa.int64()))
    with_cache = datasets.concatenate_datasets([dataset, columns], axis=1)
    metadata = {
        "teachers": teacher_identity(teachers),
        "ensemble_reduction": ensemble_reduction if len(teachers) > 1 else None,
        "teacher_weights": list(teacher_weights) if teacher_weights is not None else None,
        # Only an arithmetic ensemble's soft targets depend on T (logits and top-k log-probs do not).
        "temperature": temperature if len(teachers) > 1 and ensemble_reduction == "mean_probs" else None,
        "top_k": top_k,
        "dtype": dtype,
        "token_level": token_level,
        "num_rows": len(dataset),
        "input_hash": INPUT_HASH if hashed else None,
    }
    with_cache.info.description = json.dumps({METADATA_KEY: metadata})
    return with_cache


def _raise_if_nonfinite(nonfinite_rows: list[int], overflow_rows: list[int], dtype: str) -> None:
    """Refuse to store non-finite teacher outputs, naming the rows of `dataset` they came from."""

    def listed(rows):
        return f"{rows[:10]}{f' and {len(rows) - 10} more' if len(rows) > 10 else ''}"

    problems = []
    if nonfinite_rows:
        problems.append(
            f"The teacher's outputs are NaN or inf (in float32, before storing) for rows {listed(nonfinite_rows)} of "
            "`dataset`: check the teacher's weights and dtype (`teacher_model_init_kwargs`) and these rows' inputs."
        )
    if overflow_rows:
        problems.append(
            f"The teacher's outputs for rows {listed(overflow_rows)} of `dataset` are finite in float32 but overflow "
            f'{dtype} (|x| > {FLOAT16_MAX:g}) and would be stored as inf: pass `dtype="float32"`.'
        )
    if problems:
        raise ValueError(" ".join(problems) + " Nothing was cached.")


def _rows_to_arrow(rows: list[np.ndarray]) -> pa.ListArray:
    """Rows of shape ``[W]`` as an Arrow list array built from one flat buffer (no Python floats)."""
    flat = np.concatenate(rows)
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(flat) + 1, rows[0].shape[-1], dtype=np.int64)), pa.array(flat)
    )


def check_cache_matches_run(dataset, args, teacher: nn.Module | None) -> None:
    """Refuse cached teacher outputs that are not what this run (and its model card) will claim.

    Checks, in order: an ensemble cache's ``ensemble_reduction`` and ``teacher_weights`` against `args` (weights
    compared normalised, ``w / Σ w``, None being uniform ``1 / n``; a single teacher's cache has none to compare),
    an arithmetic-mean ensemble's temperature against `args`, and the teacher fingerprints against `teacher` (when
    one is given). Warns when the rows carry ``input_ids`` but no ``teacher_input_hash`` (stale rows go undetected).
    """
    metadata = read_cache_metadata(dataset)
    if metadata is None:
        return
    if metadata.get("num_rows") is not None and len(dataset) != metadata["num_rows"]:
        logger.info(
            f"Cached teacher outputs cover a {metadata['num_rows']}-row dataset; this one has "
            f"{len(dataset)} rows (a selection of it)."
        )
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" in columns and TEACHER_INPUT_HASH not in columns:
        logger.warning(
            f"The train_dataset's cached teacher outputs have no `{TEACHER_INPUT_HASH}` column (a cache written "
            "before rows were hashed, or the column was removed): rows whose input_ids changed since the cache was "
            "computed (e.g. re-tokenised to the same lengths) cannot be detected and would train on stale targets. "
            "Recompute the cache with `precompute_teacher_logits` to have every row checked."
        )
    num_teachers = len(metadata.get("teachers") or [])
    if num_teachers > 1:
        cached_recipe = (metadata.get("ensemble_reduction"), metadata.get("teacher_weights"))
        run_recipe = (args.ensemble_reduction, args.teacher_weights)
        if cached_recipe[0] != run_recipe[0] or not _same_weights(cached_recipe[1], run_recipe[1], num_teachers):
            raise ValueError(
                f"The train_dataset's cached teacher outputs were computed by an ensemble of {num_teachers} teachers "
                f"with ensemble_reduction={cached_recipe[0]!r}, teacher_weights={cached_recipe[1]}, but this run's "
                f"arguments say ensemble_reduction={run_recipe[0]!r}, teacher_weights={run_recipe[1]} (weights are "
                "compared normalised to sum to 1; None is uniform). The run would train on the cache's targets while "
                "its model card reported the arguments'. Set `ensemble_reduction` and `teacher_weights` to the "
                "cache's, or recompute the cache with `precompute_teacher_logits(..., ensemble_reduction=..., "
                "teacher_weights=...)`."
            )
    if metadata.get("temperature") is not None and (
        args.temperature_schedule != "constant" or metadata["temperature"] != args.temperature
    ):
        raise ValueError(
            f"The cached ensemble targets were computed at temperature {metadata['temperature']} (an arithmetic "
            f"mean depends on T) but this run uses temperature={args.temperature}"
            f"{' with a schedule' if args.temperature_schedule != 'constant' else ''}. Recompute them with "
            "`precompute_teacher_logits(..., temperature=...)`, or use ensemble_reduction='mean_log_probs'."
        )
    if teacher is not None:
        expected = [teacher_fingerprint(t) for t in ensemble_members(teacher)]
        cached = [t["fingerprint"] for t in metadata["teachers"]]
        if expected != cached:
            raise ValueError(
                f"The train_dataset's cached teacher outputs come from teacher(s) "
                f"{[t['name'] for t in metadata['teachers']]} (fingerprints {cached}), not from the `teacher_model` "
                f"given (fingerprints {expected}). Pass the teacher that made the cache, teacher_model=None to use "
                "the cache alone, or recompute it with `precompute_teacher_logits`."
            )


def _same_weights(cached, run, num_teachers: int) -> bool:
    """Whether two ``teacher_weights`` (None: uniform) are equal once normalised to sum to 1."""

    def normalised(weights):
        weights = [1.0] * num_teachers if weights is None else [float(w) for w in weights]
        return [w / sum(weights) for w in weights]

    cached, run = normalised(cached), normalised(run)
    return len(cached) == len(run) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(cached, run))


def check_input_hashes(features: list[dict]) -> None:
    """Refuse rows whose ``input_ids`` no longer hash to the ``teacher_input_hash`` their outputs were cached with."""
    stale = [i for i, f in enumerate(features) if input_hash(f["input_ids"]) != int(f[TEACHER_INPUT_HASH])]
    if stale:
        first = np.asarray(features[stale[0]]["input_ids"]).ravel().tolist()
        raise ValueError(
            f"{len(stale)} of {len(features)} rows of this batch (positions {stale} in it; the first starts with "
            f"input_ids {first[:8]}) have input_ids that changed since their teacher outputs were cached: their "
            f"`{TEACHER_INPUT_HASH}` no longer matches, so the cached outputs are stale targets for them (e.g. the "
            "dataset was re-tokenised after `precompute_teacher_logits`). Recompute the cache with "
            "`precompute_teacher_logits` on the current dataset (remove the old teacher columns first)."
        )


class TeacherColumnsCollator:
    """Wraps a data collator: batches the cached teacher columns itself, so any collator (padding ones included)
    works unchanged. Classification rows ``[C]`` are stacked to ``[B, C]``; token-level rows ``[n_i, V]`` are
    concatenated to ``[Σ n_i, V]``, the counted positions of the batch in row-major order.

    Rows carrying ``teacher_input_hash`` are checked against their ``input_ids`` (`check_input_hashes`) and the hash
    is dropped: it never reaches the batch."""

    def __init__(self, data_collator):
        self.data_collator = data_collator

    def __call__(self, features):
        if not features or not isinstance(features[0], dict) or not any(c in features[0] for c in TEACHER_COLUMNS):
            return self.data_collator(features)
        if TEACHER_INPUT_HASH in features[0] and "input_ids" in features[0]:
            check_input_hashes(features)
        cached = {c: [torch.as_tensor(f[c]) for f in features] for c in TEACHER_OUTPUT_COLUMNS if c in features[0]}
        batch = self.data_collator([{k: v for k, v in f.items() if k not in TEACHER_COLUMNS} for f in features])
        for column, rows in cached.items():
            batch[column] = torch.stack(rows) if rows[0].dim() == 1 else torch.cat(rows)
        return batch
