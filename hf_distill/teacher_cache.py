"""Cached (offline) teacher outputs: run the teacher once over a transfer set that is not augmented.

`precompute_teacher_logits` adds the teacher's outputs to a `datasets.Dataset` as columns, one entry per row, so the
cache follows its row through shuffling, `select`, `save_to_disk` and sharding (a cache keyed by step index serves the
wrong teacher as soon as the order changes). `DistillationTrainer` uses the columns whenever a batch carries them.
`hf_distill.cache_import.import_teacher_logprobs` builds the same columns from an inference server's log-probabilities.

Columns:

* ``teacher_logits`` — classification: ``[C]`` per row. Token level: ``[n_i, V]`` per row, one line per *counted*
  position of the row (label not -100, causal LMs shifted: exactly the trainer's positions, in order).
* ``teacher_topk_logprobs`` + ``teacher_topk_ids`` — with ``top_k=k``: the teacher's k largest log-probabilities at
  T = 1 (descending) and their class/token ids, ``[k]`` or ``[n_i, k]`` per row. The KD term is then computed on the
  teacher's top-k support, both distributions renormalised there: ``D(softmax(lp_topk / T) ‖ softmax(z[ids] / T))``.
  Log-probabilities at T = 1 differ from logits by a per-position constant, so the renormalised tempered distribution
  is the same for every T (the cache is temperature-free); what is approximated is the mass outside the top k, which
  the student is no longer asked to match.
* ``teacher_topk_tail_logprob`` — with ``top_k_tail=True``: per position, the log of the teacher's probability mass
  outside its top k at T = 1 (``-inf`` when k = V). The KD term is then the divergence over k + 1 categories, the k
  kept entries plus one "rest" bucket (`hf_distill.losses.top_k_tail_logits`): at T = 1 a lower bound of the full
  divergence (data-processing inequality), equal to it at k = V. At T ≠ 1 the teacher's rest mass is re-tempered as
  if spread uniformly over the V − k entries outside its top k (see `top_k_tail_logits`).
* ``teacher_input_hash`` — int64 per row: ``blake2b(input_ids as int64 little-endian bytes, digest_size=8)`` read as
  a signed little-endian integer, the ids the outputs were computed on (before padding). The trainer's collator
  recomputes it for every row it batches and refuses a row whose ``input_ids`` changed since (a dataset re-tokenised
  to the same lengths keeps its counted positions, so nothing else would notice stale targets): ~30 µs per batch of
  16 × 64 ids, < 0.1 % of a tiny GPT-2's cached training step. Only ``input_ids`` are hashed: rows without them (images, feature vectors) get no column, since
  comparing floating-point inputs exactly would refuse harmless re-preprocessing and cost a hash over every pixel.
  A cache without the column (written before rows were hashed) is accepted with a warning that stale rows cannot be
  detected.

Storage (`hf_distill.cache_storage`): values in float16 (default), bfloat16 (stored as its raw bits in uint16: Arrow
has no bfloat16) or float32; top-k ids as uint16 for vocabularies up to 65,535 entries, else int32; top-k rows as
fixed-size lists (no per-position offsets): 128 bytes per counted position at k = 32 plus a few bytes per row. The
outputs are written to Arrow files batch by batch and the returned dataset is memory-mapped on them, so memory does not
grow with the dataset.

Outputs are checked before they are stored: NaN/inf (in float32, or from float16 overflow, ``|x| > 65504``) at a
stored position is refused with the rows it came from, so a cache never holds non-finite targets (the tail's ``-inf``,
an empty rest bucket, is the one exception).

The metadata (origin, teacher names and weight fingerprints, the ensemble's reduction and weights, top_k, the tail,
dtype, vocabulary size, counted positions, and the temperature when an arithmetic ensemble makes the cache depend on it)
is stored in ``dataset.info.description`` as JSON under ``hf_distill_teacher_cache``. The trainer checks it
(`check_cache_matches_run`): the fingerprints against a given teacher, an ensemble cache's reduction and normalised
weights against the arguments', and an arithmetic ensemble's temperature.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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

from . import cache_storage, losses
from .models import accepted_arguments, counted_positions, is_token_level, logits_of, shifts_labels
from .teachers import EnsembleTeacher, as_teacher_list, ensemble_members, teacher_fingerprint, teacher_identity


logger = logging.get_logger(__name__)

TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
TEACHER_TOPK_IDS = "teacher_topk_ids"
TEACHER_TOPK_TAIL = "teacher_topk_tail_logprob"
TEACHER_INPUT_HASH = "teacher_input_hash"
# The teacher's outputs, batched by `TeacherColumnsCollator`; with the row hash: every column a cache adds, which the
# trainer keeps through `remove_unused_columns` and takes out of the batch before the student sees it.
TEACHER_OUTPUT_COLUMNS = (TEACHER_LOGITS, TEACHER_TOPK_LOGPROBS, TEACHER_TOPK_IDS, TEACHER_TOPK_TAIL)
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


def teacher_top_k(
    logits: torch.Tensor, k: int, tail: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The k largest log-probabilities of ``softmax(logits)`` (T = 1, descending), their ids, and optionally the log of
    the mass outside them (``logsumexp`` of the other log-probabilities: exact however small, ``-inf`` when k = V).

    `logits` is ``[..., V]``; returns float32 ``[..., k]``, int64 ``[..., k]`` and float32 ``[...]`` (or None).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    rest = None
    if tail:
        rest = log_probs.scatter_(-1, ids, float("-inf")).logsumexp(-1)  # log_probs is ours: overwritten in place
    return values, ids, rest


@torch.no_grad()
def precompute_teacher_logits(
    teacher: nn.Module | str | Sequence[nn.Module | str],
    dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    top_k: int | None = None,
    top_k_tail: bool = False,
    dtype: str = "float16",
    data_collator=None,
    ensemble_reduction: str = "mean_probs",
    teacher_weights: Sequence[float] | None = None,
    temperature: float | None = None,
    teacher_model_init_kwargs: dict | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Run the teacher (or an ensemble) once over `dataset` and return it with the outputs as columns.

    The outputs are written to Arrow files as they are computed (one per process) and the returned dataset is
    memory-mapped on them, so peak memory stays that of one batch whatever the dataset's size.

    Args:
        teacher: a model, a path/Hub id, or a list of them (an ensemble, combined with `ensemble_reduction` and
            `teacher_weights` exactly as the trainer combines them online).
        dataset: the transfer set. Its rows must hold what the teacher's forward takes (plus ``labels`` for token
            level tasks, which choose the counted positions); other columns are carried through untouched.
        batch_size: rows per teacher forward.
        top_k: keep only the k largest log-probabilities per position (and their ids) instead of full logits.
        top_k_tail: with `top_k`, also store the log of the teacher's mass outside its top k (at T = 1) per position:
            the KD term becomes the divergence over the k kept entries plus one "rest" bucket. Exact at T = 1 (a lower
            bound of the full divergence); at T ≠ 1 the rest mass is re-tempered as if uniform over the V − k entries
            outside the top k (`hf_distill.losses.top_k_tail_logits` states the approximation).
        dtype: ``"float16"`` (half the space; logits rarely need more), ``"bfloat16"`` (float32's range at float16's
            size, 3 significant digits; stored as its raw bits in a uint16 column, since Arrow has no bfloat16) or
            ``"float32"`` (bit-exact with online KD). Values beyond float16's range (``|x| > 65504``) are refused
            rather than stored as inf: use ``"bfloat16"`` or ``"float32"``.
        data_collator: batches rows for the teacher (e.g. `DataCollatorWithPadding`); default `default_data_collator`.
        temperature: required for an arithmetic-mean ensemble (``"mean_probs"``), whose soft targets depend on T;
            the trainer then refuses another temperature.
        device: where the teacher runs; default the accelerate process's device. When launched on several
            processes, each computes a contiguous shard of rows into its own file, and every process returns the
            same dataset: the shards in row order.
        cache_dir: where the Arrow files go (created if needed; they stay, as the returned dataset's storage, until
            you delete them). Default: the directory of `dataset`'s own cache files when it has writable ones (as
            `datasets.Dataset.map` does), else a temporary directory removed when the (main) process exits — save
            the result with `save_to_disk` to keep it. Several processes (`accelerate launch`) must all see it: on
            several machines pass a directory on shared storage.

    Returns:
        `dataset` with ``teacher_logits`` (or ``teacher_topk_logprobs`` and ``teacher_topk_ids``, and
        ``teacher_topk_tail_logprob`` with `top_k_tail`) added, and ``teacher_input_hash`` when its rows have
        ``input_ids``.

    Raises:
        ValueError: when an output to be stored is NaN/inf, in float32 or once cast to `dtype` (naming the rows of
            `dataset`, and ``dtype="float32"`` for a float16 overflow); nothing is returned then, and the files
            written so far are removed.
    """
    if dtype not in cache_storage.STORAGE_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(cache_storage.STORAGE_DTYPES)}, got {dtype!r}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}.")
    if top_k_tail and not top_k:
        raise ValueError("`top_k_tail=True` stores the mass outside the top k: it needs `top_k`.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty: there are no rows to compute teacher outputs for.")
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
    # Contiguous shards, one file each, concatenated in process order: row order.
    per_process = -(-len(rows) // state.num_processes)
    shards = [
        range(index * per_process, min(len(rows), (index + 1) * per_process)) for index in range(state.num_processes)
    ]
    shard = shards[state.process_index]
    collate = data_collator or default_data_collator

    def collate_and_hash(features):  # the rows' hashes from the features, before the collator pads them
        return [input_hash(f["input_ids"]) for f in features] if hashed else None, collate(features)

    loader = DataLoader(rows.select(shard), batch_size=batch_size, collate_fn=collate_and_hash)
    directory, run_id = cache_storage.shard_directory(dataset, cache_dir, state)
    paths = [cache_storage.shard_path(directory, run_id, i, state.num_processes) for i in range(len(shards))]
    writer = _CacheWriter(paths[state.process_index], token_level=token_level, dtype=dtype, hashed=hashed)

    nonfinite_rows, overflow_rows, first_row, num_positions, vocab_size = [], [], shard.start, 0, None
    try:
        for hashes, batch in logging.tqdm(loader, desc="Teacher logits", disable=not state.is_local_main_process):
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            teacher_inputs = {k: v for k, v in batch.items() if k in accepted and k != "labels"}
            logits = logits_of(teacher(**teacher_inputs)).float()
            mask = counted_positions(batch, token_level=token_level, shift=shift, main_input_name=main_input_name)
            if shift:
                logits = logits[..., :-1, :]
            vocab_size = logits.shape[-1]
            if top_k:
                values, ids, tail = teacher_top_k(logits, top_k, top_k_tail)
                outputs = {TEACHER_TOPK_LOGPROBS: values, TEACHER_TOPK_IDS: ids}
                if tail is not None:
                    outputs[TEACHER_TOPK_TAIL] = tail
            else:
                values, outputs = logits, {TEACHER_LOGITS: logits}
            # Rows with a non-finite value at a stored position: in float32 already, or only once stored (overflow).
            finite = torch.isfinite(values).all(-1)
            stored_finite = torch.isfinite(cache_storage.stored(values, dtype)).all(-1)
            if top_k_tail:  # the tail may be -inf (an empty rest bucket), never NaN or +inf
                finite &= ~torch.isnan(tail) & (tail != float("inf"))
            finite, stored_finite = finite | ~mask, stored_finite | ~mask
            if token_level:
                finite, stored_finite = finite.flatten(1).all(-1), stored_finite.flatten(1).all(-1)
            for offset, (ok, stored_ok) in enumerate(zip(finite.tolist(), stored_finite.tolist())):
                if not ok:
                    nonfinite_rows.append(first_row + offset)
                elif not stored_ok:
                    overflow_rows.append(first_row + offset)
            first_row += len(mask)
            if token_level:
                row_lengths = mask.sum(-1).cpu().numpy()
                outputs = {name: tensor[mask] for name, tensor in outputs.items()}
            else:
                row_lengths = None
            num_positions += int(mask.sum())
            if nonfinite_rows or overflow_rows:
                continue  # nothing will be returned: only the rows to name are still collected
            writer.add(_encoded(outputs, dtype, vocab_size), row_lengths, hashes)
        writer.close()
    except BaseException:
        writer.discard()
        raise

    summaries = [(nonfinite_rows, overflow_rows, num_positions, vocab_size)]
    if state.num_processes > 1:
        summaries = gather_object(summaries)  # also the barrier after which every shard file is complete
    nonfinite_rows = [row for summary in summaries for row in summary[0]]
    overflow_rows = [row for summary in summaries for row in summary[1]]
    if nonfinite_rows or overflow_rows:
        writer.discard()
        _raise_if_nonfinite(nonfinite_rows, overflow_rows, dtype)

    columns = cache_storage.load_shards([path for path, rows_of in zip(paths, shards) if len(rows_of)])
    with_cache = datasets.concatenate_datasets([dataset, columns], axis=1)
    vocab_size = next(summary[3] for summary in summaries if summary[3] is not None)
    metadata = {
        "origin": "precompute_teacher_logits",
        "teachers": teacher_identity(teachers),
        "ensemble_reduction": ensemble_reduction if len(teachers) > 1 else None,
        "teacher_weights": list(teacher_weights) if teacher_weights is not None else None,
        # Only an arithmetic ensemble's soft targets depend on T (logits and top-k log-probs do not).
        "temperature": temperature if len(teachers) > 1 and ensemble_reduction == "mean_probs" else None,
        "top_k": top_k,
        "top_k_tail": bool(top_k_tail),
        "dtype": dtype,
        "ids_dtype": cache_storage.ids_dtype_for(vocab_size) if top_k else None,
        "vocab_size": vocab_size,
        "token_level": token_level,
        "num_rows": len(dataset),
        "num_positions": sum(summary[2] for summary in summaries),
        "input_hash": INPUT_HASH if hashed else None,
    }
    with_cache.info.description = json.dumps({METADATA_KEY: metadata})
    return with_cache


def _encoded(outputs: dict[str, torch.Tensor], dtype: str, vocab_size: int) -> dict[str, np.ndarray]:
    """The outputs of one batch as numpy arrays of their storage types (values in `dtype`, ids in uint16/int32)."""
    encoded = {}
    for name, tensor in outputs.items():
        if name == TEACHER_TOPK_IDS:
            encoded[name] = tensor.to(torch.int32).cpu().numpy().astype(cache_storage.ids_dtype_for(vocab_size))
        else:
            encoded[name] = cache_storage.encode_values(tensor, dtype)
    return encoded


class _CacheWriter:
    """Writes the Arrow columns of one kind of cache (token level or not, top-k or dense, tail, hash) to one shard file.

    Batches are buffered into record batches of up to `ROWS_PER_RECORD_BATCH` rows (or `BYTES_PER_RECORD_BATCH`
    bytes): reading a memory-mapped stream touches each record batch's header, and the kernel maps the pages around
    it (fault-around, 64 kB) into the reader's resident set, so a record batch per teacher batch would make the
    returned dataset's resident pages grow with the number of batches.

    The column types (`hf_distill.cache_storage`) are fixed by the first record batch (k, V, the ids' type); a later
    one whose ids need int32 where uint16 was chosen (imports without a known vocabulary size) widens the column.
    """

    ROWS_PER_RECORD_BATCH = 1000  # as `datasets`' own writer
    BYTES_PER_RECORD_BATCH = 32 << 20

    def __init__(self, path: str, *, token_level: bool, dtype: str, hashed: bool):
        self.writer = cache_storage.ShardWriter(path)
        self.token_level, self.dtype, self.hashed = token_level, dtype, hashed
        self._pending: list[tuple[dict[str, np.ndarray], Any, Any]] = []
        self._pending_rows = self._pending_bytes = 0

    def add(self, encoded: dict[str, np.ndarray], row_lengths, hashes) -> None:
        """Append one batch: `encoded` arrays of the storage types, ``[P, W]``/``[P]`` (token level: the batch's
        counted positions, `row_lengths` per row) or ``[B, W]``/``[B]``; `hashes` per row (or None)."""
        self._pending.append((encoded, row_lengths, hashes))
        self._pending_rows += len(row_lengths) if self.token_level else len(next(iter(encoded.values())))
        self._pending_bytes += sum(array.nbytes for array in encoded.values())
        if self._pending_rows >= self.ROWS_PER_RECORD_BATCH or self._pending_bytes >= self.BYTES_PER_RECORD_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows, self._pending_bytes = self._pending, [], 0, 0
        encoded = {name: np.concatenate([batch[0][name] for batch in pending]) for name in pending[0][0]}
        row_lengths = np.concatenate([batch[1] for batch in pending]) if self.token_level else None
        hashes = [h for batch in pending for h in batch[2]] if self.hashed else None
        self._write(encoded, row_lengths, hashes)

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def discard(self) -> None:
        self._pending = []
        self.writer.discard()

    def features(self, encoded: dict[str, np.ndarray]) -> datasets.Features:
        value = cache_storage.value_type(self.dtype)
        features = {}
        for name, array in encoded.items():
            element = str(array.dtype) if name == TEACHER_TOPK_IDS else value
            if name == TEACHER_TOPK_TAIL:
                feature = datasets.List(datasets.Value(element)) if self.token_level else datasets.Value(element)
            elif name == TEACHER_LOGITS:
                width = array.shape[-1]
                feature = (
                    datasets.Array2D(shape=(None, width), dtype=element)
                    if self.token_level
                    else datasets.List(datasets.Value(element))
                )
            else:  # top-k values and ids: fixed-size rows, no per-position offsets
                fixed = datasets.List(datasets.Value(element), length=array.shape[-1])
                feature = datasets.List(fixed) if self.token_level else fixed
            features[name] = feature
        if self.hashed:
            features[TEACHER_INPUT_HASH] = datasets.Value("int64")
        return datasets.Features(features)

    def _write(self, encoded: dict[str, np.ndarray], row_lengths, hashes) -> None:
        writer = self.writer
        features = writer.features or self.features(encoded)
        if TEACHER_TOPK_IDS in encoded and writer.features is not None:
            written = features[TEACHER_TOPK_IDS]
            written = (written.feature if self.token_level else written).feature.dtype
            if written != str(encoded[TEACHER_TOPK_IDS].dtype):  # uint16 ids, and a batch that needs int32
                writer.recast(TEACHER_TOPK_IDS, self.features(encoded)[TEACHER_TOPK_IDS])
                features = writer.features
        if not self.token_level:
            columns = {
                name: cache_storage.per_row_vectors(array, fixed=name != TEACHER_LOGITS)
                for name, array in encoded.items()
            }
            if self.hashed:
                columns[TEACHER_INPUT_HASH] = pa.array(hashes, type=pa.int64())
            writer.write(columns, features)
            return
        width = max(array.shape[-1] if array.ndim == 2 else 1 for array in encoded.values())
        for row_slice, position_slice in cache_storage.row_groups(row_lengths, width):
            lengths = row_lengths[row_slice]
            columns = {}
            for name, array in encoded.items():
                part = array[position_slice]
                if name == TEACHER_LOGITS:
                    columns[name] = cache_storage.array2d_rows(part, lengths, features[name])
                else:
                    columns[name] = cache_storage.per_position_rows(part, lengths)
            if self.hashed:
                columns[TEACHER_INPUT_HASH] = pa.array(hashes[row_slice], type=pa.int64())
            writer.write(columns, features)


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
        largest = FLOAT16_MAX if dtype == "float16" else torch.finfo(getattr(torch, dtype)).max
        problems.append(
            f"The teacher's outputs for rows {listed(overflow_rows)} of `dataset` are finite in float32 but overflow "
            f'{dtype} (|x| > {largest:g}) and would be stored as inf: pass `dtype="float32"`.'
        )
    if problems:
        raise ValueError(" ".join(problems) + " Nothing was cached.")


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
        if any(fingerprint is None for fingerprint in cached):
            raise ValueError(
                f"The train_dataset's teacher outputs were imported (`import_teacher_logprobs`, from "
                f"{metadata.get('source')!r}) without the teacher's weights, so nothing shows that they come from the "
                "`teacher_model` given: the run would train on them while its model card named that teacher. Pass "
                "teacher_model=None to train on the imported outputs alone, or, if the server ran exactly these "
                "weights, record them at import: `import_teacher_logprobs(..., teacher=model)`."
            )
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


def check_cache_fits_divergence(dataset, args, name: str = "train_dataset") -> None:
    """Refuse a top-k cache with a rest bucket (``top_k_tail``) under logit matching (``"mse"``): the bucket holds a
    probability mass, not a logit, and its tempered value depends on T, which logit matching claims not to."""
    metadata = read_cache_metadata(dataset)
    if metadata is None or not metadata.get("top_k_tail"):
        return
    from .divergences import get_distillation_loss

    if get_distillation_loss(args.distillation_loss).name == "mse":
        raise ValueError(
            f"`{name}` carries top-k teacher outputs with a rest bucket (`top_k_tail=True`), which the KD term treats "
            "as one more category of a distribution over k + 1 entries; distillation_loss='mse' matches logits, and "
            "the rest bucket has none. Use a divergence between distributions ('kl', 'reverse_kl', 'jsd', or one you "
            "registered), or a cache without the tail (`top_k_tail=False`)."
        )


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
    works unchanged. Classification rows ``[C]`` (or ``[k]``, a scalar tail) are stacked to ``[B, C]`` (``[B]``);
    token-level rows ``[n_i, V]`` (``[n_i]`` tails) are concatenated to ``[Σ n_i, V]``, the counted positions of the
    batch in row-major order.

    Decoded from their storage types (`hf_distill.cache_storage`): top-k ids to int64, bfloat16 bits to float32;
    float16/float32 values come as the dataset's format gives them (float32 tensors from the default Python format).

    Rows carrying ``teacher_input_hash`` are checked against their ``input_ids`` (`check_input_hashes`) and the hash
    is dropped: it never reaches the batch. `token_level` (the trainer passes its student's) tells the two layouts
    apart even for a batch whose rows count no position; None tells them from the rows' shapes."""

    def __init__(self, data_collator, token_level: bool | None = None):
        self.data_collator = data_collator
        self.token_level = token_level  # the student's kind; None: told from the rows' shapes

    def __call__(self, features):
        if not features or not isinstance(features[0], dict) or not any(c in features[0] for c in TEACHER_COLUMNS):
            return self.data_collator(features)
        if TEACHER_INPUT_HASH in features[0] and "input_ids" in features[0]:
            check_input_hashes(features)
        cached = {c: [torch.as_tensor(f[c]) for f in features] for c in TEACHER_OUTPUT_COLUMNS if c in features[0]}
        batch = self.data_collator([{k: v for k, v in f.items() if k not in TEACHER_COLUMNS} for f in features])
        # Token level when the outputs have a position axis ([n_i, W] rows; an empty row may read back as [0]).
        token_level = self.token_level
        if token_level is None:
            token_level = any(
                row.dim() == 2 for column, rows in cached.items() if column != TEACHER_TOPK_TAIL for row in rows
            )
        for column, rows in cached.items():
            decode = cache_storage.decode_ids if column == TEACHER_TOPK_IDS else cache_storage.decode_values
            batch[column] = decode(_batched(rows, token_level, per_position_width=column != TEACHER_TOPK_TAIL))
        return batch


def _batched(rows: list[torch.Tensor], token_level: bool, per_position_width: bool) -> torch.Tensor:
    if not token_level:
        return torch.stack(rows)
    counted = [row for row in rows if row.numel()]  # rows without counted positions add nothing
    if not counted:
        return rows[0].reshape((0, 0) if per_position_width else (0,))
    return torch.cat(counted)
