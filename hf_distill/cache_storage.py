"""How teacher caches are stored: Arrow column types, value encodings, and shards written to disk as they are computed.

`precompute_teacher_logits` and `import_teacher_logprobs` append each batch's outputs to an Arrow file (one per
process, IPC stream format, as `datasets` writes its own cache files) instead of holding them in memory, then return a
`datasets.Dataset` memory-mapped on those files, joined to the input dataset's columns: peak memory does not grow with
the dataset.

Column types (``k`` the top-k width, ``V`` the vocabulary or number of classes, ``n_i`` a row's counted positions):

============================  =====================================  ===================================
column                        token level (per row)                  classification (per row)
============================  =====================================  ===================================
``teacher_topk_logprobs``     ``list<fixed_size_list<VAL, k>>``       ``fixed_size_list<VAL, k>``
``teacher_topk_ids``          ``list<fixed_size_list<ID, k>>``        ``fixed_size_list<ID, k>``
``teacher_topk_tail_logprob`` ``list<VAL>`` (``n_i`` values)          ``VAL``
``teacher_logits``            ``Array2D((None, V), VAL)``             ``list<VAL>``
``teacher_input_hash``        ``int64``                               ``int64``
============================  =====================================  ===================================

``VAL`` is ``float16`` (default), ``float32``, or — for ``dtype="bfloat16"``, which Arrow has no type for — ``uint16``
holding the raw bfloat16 bits (the upper half of the float32 bit pattern; :func:`decode_values` turns them back).
``ID`` is ``uint16`` when the vocabulary has at most 65,535 entries, else ``int32``. Fixed-size inner lists carry no
per-position offsets, so a top-k 32 position costs 32 × 2 + 32 × 2 = 128 bytes of values and ids (plus a few bytes
per *row*: list offsets and the hash).

Readers (`hf_distill.teacher_cache.TeacherColumnsCollator`) decode: ids to int64, bfloat16 bits to float32; float16
and float32 values arrive as `datasets` formats them (Python floats, hence float32 tensors, in the default format).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping

import datasets
import numpy as np
import pyarrow as pa
import torch


STORAGE_DTYPES = ("float16", "bfloat16", "float32")
UINT16_MAX_VOCAB = 65_535  # ids are stored as uint16 for vocabularies up to this size, else int32
# The Arrow value type (as a `datasets.Value` name) that holds each storage dtype.
_VALUE_TYPES = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
# Rows of one Arrow record batch of a dense token-level cache stay below this many elements (int32 list offsets).
_MAX_ELEMENTS_PER_RECORD_BATCH = 1 << 30


def ids_dtype_for(vocab_size: int | None) -> str:
    """``"uint16"`` for a vocabulary of at most 65,535 entries, else (or unknown) ``"int32"``."""
    return "uint16" if vocab_size is not None and vocab_size <= UINT16_MAX_VOCAB else "int32"


def value_type(dtype: str) -> str:
    """The `datasets.Value` dtype that stores values of storage dtype `dtype` (bfloat16: its bits as uint16)."""
    return _VALUE_TYPES[dtype]


def stored(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """`values` rounded to the storage dtype (as a torch tensor of that dtype): what the cache will hold."""
    return values.to(getattr(torch, dtype))


def encode_values(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU numpy array of `values` in storage dtype `dtype`; bfloat16 as its raw bits (uint16)."""
    values = stored(values, dtype).cpu()
    if dtype == "bfloat16":
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def decode_values(values: torch.Tensor) -> torch.Tensor:
    """Cached values as a float tensor: float ones unchanged, integer ones read as bfloat16 bits (to float32).

    The bits arrive as whatever integer type the dataset's format gives (uint16, or int64 from Python ints); the
    bfloat16 ``b`` is exactly the float32 whose bit pattern is ``b << 16``.
    """
    if values.is_floating_point():
        return values
    bits = values.to(torch.int32).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return bits.view(torch.float32)


def decode_ids(ids: torch.Tensor) -> torch.Tensor:
    """Cached top-k ids (uint16 or int32, or int64 from Python ints) as int64."""
    return ids.long()


# ---- Arrow arrays of one batch ----


def _offsets(row_lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(row_lengths) + 1, dtype=np.int32)
    np.cumsum(row_lengths, out=offsets[1:])
    return pa.array(offsets)


def per_position_rows(flat: np.ndarray, row_lengths: np.ndarray) -> pa.Array:
    """``[P, W]`` positions grouped into rows of ``row_lengths`` positions: ``list<fixed_size_list<T, W>>``; a 1-D
    ``[P]`` array: ``list<T>``."""
    inner = pa.array(flat.reshape(-1))
    if flat.ndim == 2:
        inner = pa.FixedSizeListArray.from_arrays(inner, flat.shape[1])
    return pa.ListArray.from_arrays(_offsets(row_lengths), inner)


def per_row_vectors(flat: np.ndarray, fixed: bool) -> pa.Array:
    """``[B, W]`` as one vector per row: ``fixed_size_list<T, W>`` (`fixed`) or ``list<T>``; ``[B]``: scalars."""
    if flat.ndim == 1:
        return pa.array(flat)
    width = flat.shape[1]
    values = pa.array(flat.reshape(-1))
    if fixed:
        return pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32)), values)


def array2d_rows(flat: np.ndarray, row_lengths: np.ndarray, feature: datasets.Array2D) -> pa.Array:
    """``[P, V]`` positions as a `datasets.Array2D` ``(None, V)`` column (storage ``list<list<T>>``)."""
    width = flat.shape[1]
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32)), pa.array(flat.reshape(-1))
    )
    return pa.ExtensionArray.from_storage(feature(), pa.ListArray.from_arrays(_offsets(row_lengths), inner))


def row_groups(row_lengths: np.ndarray, width: int):
    """``(row slice, position slice)`` pairs covering a batch in order, each under the per-record-batch element limit
    (the inner list offsets of a dense ``[P, V]`` column are int32)."""
    start_row, start_position, elements, position = 0, 0, 0, 0
    for row, length in enumerate(row_lengths.tolist()):
        if elements and elements + length * width > _MAX_ELEMENTS_PER_RECORD_BATCH:
            yield slice(start_row, row), slice(start_position, position)
            start_row, start_position, elements = row, position, 0
        elements += length * width
        position += length
    yield slice(start_row, len(row_lengths)), slice(start_position, position)


# ---- shards on disk ----


class ShardWriter:
    """Appends record batches to one Arrow IPC stream file (the format `datasets.Dataset.from_file` maps)."""

    def __init__(self, path: str):
        self.path = path
        self.features: datasets.Features | None = None
        self._sink = None
        self._writer = None
        self.num_rows = 0

    def write(self, columns: Mapping[str, pa.Array], features: datasets.Features) -> None:
        if self._writer is None:
            self.features = features
            self._sink = pa.OSFile(self.path, "wb")
            self._writer = pa.ipc.new_stream(self._sink, features.arrow_schema)
        table = pa.table(dict(columns), schema=self.features.arrow_schema)
        self._writer.write_table(table)
        self.num_rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def discard(self) -> None:
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def recast(self, column: str, feature) -> None:
        """Rewrite what was written so far with `column` cast to `feature` (e.g. ids widened from uint16 to int32),
        one record batch at a time, and keep writing with the new type."""
        self.close()
        if self.features is None:
            return
        features = datasets.Features({**self.features, column: feature})
        previous = self.path + ".previous"
        os.replace(self.path, previous)
        self.features = features
        self._sink = pa.OSFile(self.path, "wb")
        self._writer = pa.ipc.new_stream(self._sink, features.arrow_schema)
        with pa.memory_map(previous) as source:
            for batch in pa.ipc.open_stream(source):
                self._writer.write_table(pa.Table.from_batches([batch]).cast(features.arrow_schema))
        os.remove(previous)


def _writable(directory: str) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def shard_directory(dataset, cache_dir: str | os.PathLike | None, state) -> tuple[str, str]:
    """Where this run's shard files go, and the run's id (both the same in every process).

    `cache_dir` when given (created if needed; the files stay: they are the returned dataset's storage); else the
    directory of `dataset`'s own cache files when it has writable ones (as `datasets.Dataset.map` does); else a
    temporary directory that the main process removes at exit (an in-memory dataset: save the result with
    `save_to_disk` to keep it).
    """
    if cache_dir is not None:
        directory = os.fspath(cache_dir)
    else:
        cache_files = getattr(dataset, "cache_files", None) or []
        directory = os.path.dirname(cache_files[0]["filename"]) if cache_files else None
        if directory is None or not _writable(directory):
            directory = None
    run_id = uuid.uuid4().hex[:16]
    if directory is None and state.is_main_process:
        directory = tempfile.mkdtemp(prefix="hf_distill_teacher_cache_")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        directory, run_id = broadcast_object_list([directory, run_id], from_process=0)
    os.makedirs(directory, exist_ok=True)
    return directory, run_id


def shard_path(directory: str, run_id: str, index: int, count: int) -> str:
    # "cache-" like the files of `datasets` itself, so `Dataset.cleanup_cache_files` knows them.
    return os.path.join(directory, f"cache-teacher-{run_id}-{index:05d}-of-{count:05d}.arrow")


def load_shards(paths: list[str]) -> datasets.Dataset:
    """The shards, memory-mapped and concatenated in order (a missing file names the shared-filesystem requirement)."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"Teacher cache shards {missing} written by other processes are not visible here: the cache directory "
            "must be on a filesystem shared by all processes (multi-node runs: pass `cache_dir=` on shared storage)."
        )
    parts = [datasets.Dataset.from_file(path) for path in paths]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
