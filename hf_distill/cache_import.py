"""Teacher caches from an inference server: top-k log-probabilities computed elsewhere (e.g. vLLM's
``prompt_logprobs``), imported into the columns `precompute_teacher_logits` writes.

Format: one JSON value per line (JSONL), one line per row of the dataset, in the dataset's row order. A line is
either the list of per-token entries itself, or an object holding it under ``"prompt_logprobs"`` (optionally with
``"prompt_token_ids"``, which are then checked against the row's ``input_ids``). Entry ``j`` is the teacher's
distribution over token ``j`` of the row given tokens ``0 … j − 1``: ``null`` for ``j = 0`` (nothing predicts the
first token), else a dict from token id (a JSON string key) to its log-probability at T = 1 — a number, or an object
with a ``"logprob"`` field as vLLM's OpenAI-compatible server writes it::

    {"prompt_token_ids": [5, 17, 9], "prompt_logprobs": [null, {"17": -0.3, "4": -1.9}, {"9": {"logprob": -0.7,
     "rank": 1, "decoded_token": "x"}, "2": {"logprob": -1.2, "rank": 2, "decoded_token": "y"}}]}

(each dict holding at least ``top_k`` entries; vLLM's hold ``top_k``, plus the prompt token itself when it is not
among them: the ``top_k`` largest are kept).

Positions: the cache of a causal LM holds one line per *counted* position ``t`` of the shifted logits (the logit at
``t`` predicts token ``t + 1``; counted when ``labels[t + 1] != -100``, or, without labels, when
``attention_mask[t + 1] == 1``). That line is entry ``j = t + 1`` of the row: the same distribution. Entries at
positions that are not counted are ignored (they may be ``null``); a counted position needs its entry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from torch import nn

from . import cache_storage
from .models import counted_positions, output_size
from .teacher_cache import (
    INPUT_HASH,
    METADATA_KEY,
    TEACHER_COLUMNS,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
    TEACHER_TOPK_TAIL,
    _CacheWriter,
    _raise_if_nonfinite,
    input_hash,
)
from .teachers import model_name, teacher_fingerprint


def import_teacher_logprobs(
    dataset: datasets.Dataset,
    logprobs: str | os.PathLike | Iterable[Any],
    *,
    top_k: int,
    top_k_tail: bool = False,
    dtype: str = "float16",
    vocab_size: int | None = None,
    teacher: nn.Module | None = None,
    teacher_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    rows_per_write: int = 256,
) -> datasets.Dataset:
    """Add a server's top-k log-probabilities to a causal-LM `dataset` as a teacher cache (the columns and metadata of
    ``precompute_teacher_logits(..., top_k=top_k)``), written to Arrow files as the lines are read.

    Args:
        dataset: the transfer set, tokenised as the server saw it: ``input_ids`` and the ``labels`` (or
            ``attention_mask``) that choose the counted positions, one row per line of `logprobs`.
        logprobs: a JSONL file (path) or an iterable of already-parsed lines, in the module docstring's format.
        top_k: the k largest log-probabilities kept per position (vLLM: the ``prompt_logprobs=k`` it was asked for).
        top_k_tail: also store the log of the mass outside the kept k, ``log(1 − Σ_k exp(lp))`` (computed in float64;
            ``-inf`` when the kept entries hold all the mass): the KD term then uses a rest bucket, as with
            ``precompute_teacher_logits(top_k_tail=True)``. Exact only if the server's log-probabilities are the
            teacher's full-vocabulary log-softmax at T = 1 (vLLM's default raw log-probabilities are).
        dtype: storage of the values: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        vocab_size: the teacher's vocabulary size, when known: ids are stored as uint16 up to 65,535 entries (else
            int32) and checked to lie below it. Unknown: uint16 until an id needs more, then int32 for the cache.
        teacher: the model the server ran, if you have its weights here: its fingerprint is recorded, so a trainer
            given the same `teacher_model` accepts the cache. Without it the trainer accepts the cache only with
            ``teacher_model=None`` (nothing shows that the server ran the given teacher).
        teacher_name: the name the metadata and the model card give the teacher, e.g. the Hub id the server ran
            (default: `teacher`'s, else none: the card then says "imported log-probabilities" only).
        cache_dir: where the Arrow file goes, as for `precompute_teacher_logits`.
        rows_per_write: rows per Arrow record batch.

    Returns:
        `dataset` with ``teacher_topk_logprobs``, ``teacher_topk_ids`` (and ``teacher_topk_tail_logprob``) and
        ``teacher_input_hash`` added; metadata ``origin: "import_teacher_logprobs"``.

    Raises:
        ValueError: a line count that differs from the rows, a counted position without its entry or with fewer
            than `top_k` entries, ``prompt_token_ids`` that differ from the row's ``input_ids``, an id outside
            `vocab_size`, or non-finite log-probabilities (naming the rows; nothing is returned then).
    """
    if dtype not in cache_storage.STORAGE_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(cache_storage.STORAGE_DTYPES)}, got {dtype!r}.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty: there are no rows to import teacher log-probabilities for.")
    if "input_ids" not in dataset.column_names:
        raise ValueError("`dataset` needs `input_ids`: the tokens whose log-probabilities the server returned.")
    if any(column in dataset.column_names for column in TEACHER_COLUMNS):
        raise ValueError(
            f"`dataset` already has teacher columns {[c for c in TEACHER_COLUMNS if c in dataset.column_names]}; "
            "remove them (`dataset.remove_columns(...)`) before importing new ones."
        )
    if vocab_size is None and teacher is not None:
        vocab_size = output_size(teacher)

    state = PartialState()
    directory, run_id = cache_storage.shard_directory(dataset, cache_dir, state)
    path = cache_storage.shard_path(directory, run_id, 0, 1)
    summary = None
    if state.is_main_process:  # reading a file is no work to share: one process writes, every process maps it
        summary = _write(dataset, logprobs, path, top_k, top_k_tail, dtype, vocab_size, rows_per_write)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        (summary,) = broadcast_object_list([summary], from_process=0)
    nonfinite_rows, overflow_rows, num_positions, ids_dtype = summary
    if nonfinite_rows or overflow_rows:
        _raise_if_nonfinite(nonfinite_rows, overflow_rows, dtype)

    with_cache = datasets.concatenate_datasets([dataset, cache_storage.load_shards([path])], axis=1)
    metadata = {
        "origin": "import_teacher_logprobs",
        "source": os.path.basename(os.fspath(logprobs)) if isinstance(logprobs, (str, os.PathLike)) else "rows",
        "teachers": [
            {
                "name": teacher_name or (model_name(teacher) if teacher is not None else None),
                "fingerprint": teacher_fingerprint(teacher) if teacher is not None else None,
            }
        ],
        "ensemble_reduction": None,
        "teacher_weights": None,
        "temperature": None,
        "top_k": top_k,
        "top_k_tail": bool(top_k_tail),
        "dtype": dtype,
        "ids_dtype": ids_dtype,
        "vocab_size": vocab_size,
        "token_level": True,
        "num_rows": len(dataset),
        "num_positions": num_positions,
        "input_hash": INPUT_HASH,
    }
    with_cache.info.description = json.dumps({METADATA_KEY: metadata})
    return with_cache


def _lines(logprobs) -> Iterator[Any]:
    if isinstance(logprobs, (str, os.PathLike)):
        with open(logprobs, encoding="utf-8") as source:
            for line in source:
                if line.strip():
                    yield json.loads(line)
    else:
        for line in logprobs:
            yield json.loads(line) if isinstance(line, (str, bytes)) else line


def _entries(record, row: int) -> tuple[list, list | None]:
    if isinstance(record, Mapping):
        if "prompt_logprobs" not in record:
            raise ValueError(
                f"Line {row} of the log-probabilities is an object without `prompt_logprobs` (keys: "
                f"{sorted(record)[:8]}); expected the list of per-token entries, or an object holding it."
            )
        return record["prompt_logprobs"], record.get("prompt_token_ids")
    if isinstance(record, list):
        return record, None
    raise ValueError(f"Line {row} of the log-probabilities is a {type(record).__name__}, not a list or an object.")


def _top_k(entry, k: int, row: int, position: int) -> tuple[list[int], list[float]]:
    """The k largest ``(id, log-probability)`` of one entry, descending (ties keep the entry's order)."""
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"Row {row}, token {position}: a counted position needs the teacher's log-probabilities, got {entry!r}."
        )
    if len(entry) < k:
        raise ValueError(
            f"Row {row}, token {position}: {len(entry)} log-probabilities where top_k={k} are needed (ask the server "
            f"for at least {k} per token, or import with a smaller top_k)."
        )
    pairs = []
    for token, value in entry.items():
        logprob = value["logprob"] if isinstance(value, Mapping) else value
        pairs.append((int(token), float(logprob)))
    pairs.sort(key=lambda pair: -pair[1])
    ids, values = zip(*pairs[:k])
    return list(ids), list(values)


def _log_rest(values: np.ndarray) -> np.ndarray:
    """``log(1 − Σ exp(values))`` per row of float64 log-probabilities, stable near both ends; -inf for no rest."""
    log_kept = np.logaddexp.reduce(values, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(
            log_kept > -math.log(2.0), np.log(-np.expm1(np.minimum(log_kept, 0.0))), np.log1p(-np.exp(log_kept))
        )
    return np.where(log_kept >= 0.0, -np.inf, rest)


def _write(dataset, logprobs, path, top_k, top_k_tail, dtype, vocab_size, rows_per_write):
    """Read the lines next to the rows and write the cache file; returns what every process needs to know."""
    columns = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    writer = _CacheWriter(path, token_level=True, dtype=dtype, hashed=True)
    ids_dtype = cache_storage.ids_dtype_for(vocab_size) if vocab_size is not None else "uint16"
    nonfinite_rows, overflow_rows, num_positions = [], [], 0
    pending: dict[str, list] = {"ids": [], "values": [], "lengths": [], "hashes": []}

    def flush():
        nonlocal ids_dtype
        if not pending["lengths"]:
            return
        ids = np.concatenate(pending["ids"]).reshape(-1, top_k)
        values = torch.from_numpy(np.concatenate(pending["values"]).reshape(-1, top_k))
        if ids.size and ids_dtype == "uint16" and ids.max() > np.iinfo(np.uint16).max:
            ids_dtype = "int32"  # a vocabulary beyond uint16, found out now: the column is widened (rewritten)
        encoded = {
            TEACHER_TOPK_LOGPROBS: cache_storage.encode_values(values, dtype),
            TEACHER_TOPK_IDS: ids.astype(ids_dtype),
        }
        if top_k_tail:
            encoded[TEACHER_TOPK_TAIL] = cache_storage.encode_values(
                torch.from_numpy(_log_rest(values.numpy())), dtype
            )
        if not (nonfinite_rows or overflow_rows):
            writer.add(encoded, np.asarray(pending["lengths"], dtype=np.int64), list(pending["hashes"]))
        for values_list in pending.values():
            values_list.clear()

    lines = _lines(logprobs)
    try:
        for row, example in enumerate(rows):
            try:
                record = next(lines)
            except StopIteration:
                raise ValueError(
                    f"The log-probabilities have {row} lines for a dataset of {len(rows)} rows: one line per row, "
                    "in the dataset's order."
                ) from None
            entries, token_ids = _entries(record, row)
            input_ids = list(example["input_ids"])
            if token_ids is not None and list(token_ids) != input_ids[: len(token_ids)]:
                raise ValueError(
                    f"Row {row}: the server's prompt_token_ids {list(token_ids)[:8]}… differ from the row's "
                    f"input_ids {input_ids[:8]}…: the lines are not in the dataset's order, or it was tokenised "
                    "differently."
                )
            inputs = {name: torch.as_tensor([example[name]]) for name in columns if name != "input_ids"}
            inputs["input_ids"] = torch.as_tensor([input_ids])
            mask = counted_positions(inputs, token_level=True, shift=True, main_input_name="input_ids")[0]
            counted = (torch.nonzero(mask).flatten() + 1).tolist()  # entry j = t + 1 of logit position t
            row_ids, row_values = [], []
            for position in counted:
                if position >= len(entries):
                    raise ValueError(
                        f"Row {row} counts token {position} but its line has {len(entries)} entries: the server saw a "
                        "shorter prompt than the row's input_ids."
                    )
                ids, values = _top_k(entries[position], top_k, row, position)
                row_ids.extend(ids)
                row_values.extend(values)
            ids = np.asarray(row_ids, dtype=np.int64)
            values = np.asarray(row_values, dtype=np.float64)
            if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(
                    f"Row {row}: token ids {ids.min()}…{ids.max()} outside the vocabulary ({vocab_size})."
                )
            if not np.isfinite(values).all():
                nonfinite_rows.append(row)
            elif not torch.isfinite(cache_storage.stored(torch.from_numpy(values), dtype)).all():
                overflow_rows.append(row)
            pending["ids"].append(ids)
            pending["values"].append(values)
            pending["lengths"].append(len(counted))
            pending["hashes"].append(input_hash(input_ids))
            num_positions += len(counted)
            if len(pending["lengths"]) >= rows_per_write:
                flush()
        flush()
        if next(lines, None) is not None:
            raise ValueError(
                f"The log-probabilities have more lines than the dataset's {len(rows)} rows: one line per row."
            )
        if nonfinite_rows or overflow_rows:
            writer.discard()
        else:
            writer.close()
    except BaseException:
        writer.discard()
        raise
    return nonfinite_rows, overflow_rows, num_positions, ids_dtype
