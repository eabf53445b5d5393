# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""
Handwritten-digit data for `examples/distill_mnist.py`: loading, splits and jitter.

This module belongs to the example, not to the `hf_distill` library (which neither ships it nor imports
scikit-learn or matplotlib). `distill_mnist.py` imports it as a sibling module: `from mnist_data import ...`.

Everything is kept in memory as torch tensors (MNIST is 188 MB as float32), and batches are cut with one indexing
operation per batch instead of one Python call per example, so the data pipeline costs little next to the matmuls
of even a small MLP on CPU.

Sources, tried in this order by [`load_digit_splits`]:

1. `data_dir`: the four IDX files of MNIST (`train-images-idx3-ubyte[.gz]`, ...), gzipped or not;
2. the Hub dataset `ylecun/mnist`, skipped at once when offline (`HF_HUB_OFFLINE=1` or the Hub unreachable within a
   few seconds) rather than waiting on network time-outs;
3. the 8×8 digits bundled with scikit-learn (1,797 images), so that the example still runs offline without data.

Pixels are floats in [0, 1] (0 = background), so that zero-padding is the background colour for [`jitter_images`].
"""

import gzip
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


logger = logging.getLogger(__name__)

MNIST_HUB_ID = "ylecun/mnist"
MNIST_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Element types of the IDX format (third byte of the magic number).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """
    Read one IDX file (the format MNIST is distributed in), gzipped or not, into a tensor of its stored shape.

    The format is a 4-byte magic number `0x00 0x00 <dtype> <ndim>`, then `ndim` big-endian uint32 dimensions, then the
    data in C order.
    """
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {raw[:4].hex()}).")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header announces shape {shape} but holds {data.size} values.")
    return torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=True).reshape(shape))


def _find_idx_file(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"Neither {stem}.gz nor {stem} found in {data_dir}.")


def load_mnist_idx(data_dir: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load MNIST from its four IDX files: `{"train": (images, labels), "test": ...}`, images uint8 `(N, 28, 28)`."""
    data_dir = Path(data_dir)
    return {
        split: (read_idx(_find_idx_file(data_dir, images)), read_idx(_find_idx_file(data_dir, labels)).long())
        for split, (images, labels) in MNIST_IDX_FILES.items()
    }


def _hub_is_reachable(timeout: float = 5.0) -> bool:
    """False at once when offline mode is on, else whether the Hub answers an HTTP request within `timeout` s."""
    from huggingface_hub import constants

    # The environment is read too: `constants` is frozen when huggingface_hub is first imported.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # an HTTP error status still means the server answered
    except (OSError, ValueError):
        return False
    return True


def load_mnist_hub(hub_id: str = MNIST_HUB_ID) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """
    Load MNIST from the Hub (`ylecun/mnist`), in the same layout as [`load_mnist_idx`].

    Raises `ConnectionError` within seconds when the Hub cannot be reached, instead of waiting on retries.
    """
    if not _hub_is_reachable():
        raise ConnectionError(f"The Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set): cannot load {hub_id}")
    from datasets import load_dataset

    dataset = load_dataset(hub_id)
    return {
        split: (
            torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in dataset[split]["image"]])),
            torch.tensor(dataset[split]["label"], dtype=torch.long),
        )
        for split in ("train", "test")
    }


def load_sklearn_digits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """
    The 1,797 8×8 digits bundled with scikit-learn (pixel values 0-16), split into train and test at random
    (`test_fraction`, fixed `seed`), as uint8 images rescaled to 0-255 so they look like the MNIST layout.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    num_test = int(round(test_fraction * len(labels)))
    return {
        "train": (images[order[num_test:]], labels[order[num_test:]]),
        "test": (images[order[:num_test]], labels[order[:num_test]]),
    }


def jitter_images(pixel_values: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None):
    """
    Translate every image of a batch by its own random integer offset of up to `max_shift` pixels along each axis
    (the paper's "jittered by up to two pixels in any direction"), filling uncovered pixels with 0 (background).

    One pad and one gather for the whole batch, so the cost does not grow with Python-level work per image.

    Args:
        pixel_values: `(..., height, width)` images, e.g. `(batch, channels, height, width)`; the shift is drawn
            independently for each index of the leading dimension and shared across any channels.
        max_shift: largest shift in pixels; offsets are uniform on `{-max_shift, ..., max_shift}`² (25 when 2).
        generator: optional `torch.Generator` for reproducible offsets.

    Returns:
        A new tensor with the shape, dtype and device of `pixel_values`.
    """
    if max_shift == 0:
        return pixel_values
    batch_size, height, width = pixel_values.shape[0], pixel_values.shape[-2], pixel_values.shape[-1]
    device = pixel_values.device
    images = pixel_values.reshape(batch_size, -1, height, width)
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift)).flatten(2)
    padded_width = width + 2 * max_shift
    # Offsets of each crop's top-left corner in the padded image: (max_shift, max_shift) is "no shift". Drawn on the
    # CPU, where a default `generator` lives, then moved: 2 × batch integers, a negligible copy.
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch_size), generator=generator).to(device)
    # One flat `gather` per batch (several times faster on CPU than 4-D advanced indexing): position (i, j) of image b
    # reads padded pixel (offset_row[b] + i, offset_col[b] + j).
    crop = (torch.arange(height, device=device)[:, None] * padded_width + torch.arange(width, device=device)).flatten()
    index = (offsets[0] * padded_width + offsets[1])[:, None] + crop
    shifted = padded.gather(2, index[:, None, :].expand(-1, padded.shape[1], -1))
    return shifted.reshape(pixel_values.shape)


class ImageTensorDataset(Dataset):
    """
    In-memory image classification dataset yielding `{"pixel_values", "labels"}` examples for `Trainer`.

    It implements `__getitems__`, which PyTorch's `DataLoader` calls with a whole batch of indices: the batch is cut
    with one tensor indexing operation and, when `max_shift > 0`, jittered with one call to [`jitter_images`]. The
    jitter belongs to the dataset (not the collator) so that a `Trainer` augments only its training set: evaluation
    and prediction datasets are built with `max_shift=0`.

    Args:
        pixel_values: float images `(N, channels, height, width)` in [0, 1].
        labels: int64 class indices `(N,)`.
        max_shift: jitter applied to every batch read from this dataset (0 = none).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, max_shift: int = 0):
        if len(pixel_values) != len(labels):
            raise ValueError(f"{len(pixel_values)} images but {len(labels)} labels.")
        self.pixel_values = pixel_values
        self.labels = labels
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        indices = torch.as_tensor(indices, dtype=torch.long)
        pixel_values = jitter_images(self.pixel_values[indices], self.max_shift)
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixel_values, self.labels[indices])]

    def with_jitter(self, max_shift: int) -> "ImageTensorDataset":
        """The same examples (shared memory), read with a different jitter."""
        return ImageTensorDataset(self.pixel_values, self.labels, max_shift=max_shift)

    def without_label(self, label: int) -> "ImageTensorDataset":
        """A copy holding every example except those of class `label` (e.g. a transfer set without any 3s)."""
        keep = self.labels != label
        return ImageTensorDataset(self.pixel_values[keep], self.labels[keep], max_shift=self.max_shift)

    def take(self, num_examples: int | None) -> "ImageTensorDataset":
        """The first `num_examples` examples (all when None), for quick runs."""
        if num_examples is None:
            return self
        return ImageTensorDataset(self.pixel_values[:num_examples], self.labels[:num_examples], self.max_shift)


@dataclass
class DigitSplits:
    """Train / validation / test datasets of one digit source, and a sentence saying where they came from."""

    train: ImageTensorDataset
    validation: ImageTensorDataset
    test: ImageTensorDataset
    source: str
    image_size: int
    num_labels: int = 10

    @property
    def is_mnist(self) -> bool:
        """False for the scikit-learn fallback, whose numbers must not be compared with MNIST results."""
        return self.source.startswith("MNIST")


def _to_dataset(images: torch.Tensor, labels: torch.Tensor) -> ImageTensorDataset:
    return ImageTensorDataset(images.float().div_(255.0).unsqueeze(1), labels)


def load_digit_splits(
    data_dir: str | os.PathLike | None = None,
    validation_size: int | float = 5000,
    seed: int = 0,
    use_hub: bool = True,
) -> DigitSplits:
    """
    Load handwritten digits as train / validation / test [`ImageTensorDataset`]s, from the first source that works:
    `data_dir` (MNIST IDX files), the Hub's `ylecun/mnist` (if `use_hub`), then scikit-learn's 8×8 digits.

    The validation split is held out of the training images at random (fixed `seed`) and is what any model selection
    or bias correction must use; the test split is only for reporting. `validation_size` is a count, or a fraction of
    the training set when below 1.

    A `data_dir` that is given but unreadable is an error (a typo should not silently switch datasets); the fallbacks
    are only for when no `data_dir` is given.
    """
    if data_dir is not None:
        splits, source = load_mnist_idx(data_dir), f"MNIST from the IDX files in {data_dir}"
    else:
        splits = None
        if use_hub:
            try:
                splits, source = load_mnist_hub(), f"MNIST from the Hugging Face Hub ({MNIST_HUB_ID})"
            except Exception as error:  # offline, Hub down, `datasets` cache problems: all mean "use the fallback"
                logger.warning("Could not load %s from the Hub (%s).", MNIST_HUB_ID, error)
        if splits is None:
            splits = load_sklearn_digits(seed=seed)
            source = (
                "NOT MNIST: no --data_dir was given and the Hub was unreachable, so this run uses the 1,797 8x8 "
                "digits bundled with scikit-learn; its numbers are not comparable with the paper's"
            )

    train_images, train_labels = splits["train"]
    num_validation = int(round(validation_size * len(train_labels))) if validation_size < 1 else int(validation_size)
    if not 0 < num_validation < len(train_labels):
        logger.warning(
            "validation_size=%s does not fit %d training images; holding out 10%% instead.",
            validation_size,
            len(train_labels),
        )
        num_validation = max(1, len(train_labels) // 10)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    validation_index, train_index = order[:num_validation], order[num_validation:]
    return DigitSplits(
        train=_to_dataset(train_images[train_index], train_labels[train_index]),
        validation=_to_dataset(train_images[validation_index], train_labels[validation_index]),
        test=_to_dataset(*splits["test"]),
        source=source,
        image_size=train_images.shape[-1],
    )
