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

import argparse
import gzip
import hashlib
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


# blake2b-16 of the 10,000 MNIST test images as stored (uint8, C order): tells MNIST from other IDX datasets of its
# format (Fashion-MNIST, KMNIST, or the variants `make_variant` writes), whose numbers must not be set beside the paper's.
MNIST_TEST_IMAGES_BLAKE2B = "b70ae312f9777b9f7603110bd42e5b1c"


def is_mnist(test_images: torch.Tensor) -> bool:
    """Whether `test_images` (uint8 `(10000, 28, 28)`) are MNIST's test images, byte for byte."""
    digest = hashlib.blake2b(test_images.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return digest == MNIST_TEST_IMAGES_BLAKE2B


def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """Write a uint8 tensor as one gzipped IDX file (the inverse of [`read_idx`] for uint8 data)."""
    data = array.contiguous().to(torch.uint8).numpy()
    header = bytes([0, 0, 0x08, data.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())


# Datasets of MNIST's format that are not MNIST, for checking that a recipe is not tuned to MNIST alone.
VARIANTS = {
    "permuted": "every image's pixels reordered by one fixed random permutation (no spatial structure is left)",
    "inverted": "intensities inverted (255 - pixel): white background, dark digits",
    "rotated": "every image rotated by 90 degrees",
    "noisy": "uniform noise of amplitude 0-255 added to a random half of the pixels, clipped: a harder task",
}


def make_variant(data_dir: str | os.PathLike, out_dir: str | os.PathLike, variant: str, seed: int = 0) -> Path:
    """
    Write the four IDX files of a not-MNIST dataset built from MNIST (`VARIANTS`) to `out_dir`: same labels, same
    train/test split, images transformed the same way in both splits. Returns `out_dir`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {sorted(VARIANTS)}.")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(28 * 28, generator=generator)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in load_mnist_idx(data_dir).items():
        if variant == "permuted":
            images = images.reshape(len(images), -1)[:, permutation].reshape(images.shape)
        elif variant == "inverted":
            images = 255 - images
        elif variant == "rotated":
            images = torch.rot90(images, 1, dims=(1, 2))
        else:  # noisy
            noise = torch.randint(0, 256, images.shape, generator=generator) * (
                torch.rand(images.shape, generator=generator) < 0.5
            )
            images = (images.int() + noise).clamp(max=255).to(torch.uint8)
        image_file, label_file = MNIST_IDX_FILES[split]
        write_idx(out_dir / f"{image_file}.gz", images)
        write_idx(out_dir / f"{label_file}.gz", labels)
    (out_dir / "README.md").write_text(
        f"Not MNIST: MNIST with {VARIANTS[variant]} (built by mnist_data.make_variant).\n"
    )
    return out_dir


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


def _gaussian_blur(fields: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `(batch, channels, height, width)` fields (zero padding)."""
    radius = max(1, int(round(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=fields.dtype, device=fields.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    batch, channels, height, width = fields.shape
    flat = fields.reshape(batch * channels, 1, height, width)
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, radius))
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return flat.reshape(batch, channels, height, width)


@dataclass(frozen=True)
class Distortion:
    """
    Random geometric distortion of training images, drawn anew for every image each time it is read.

    An affine map (rotation, scaling, shear, translation) plus an elastic deformation (Simard, Steinkraus & Platt
    2003: a field of uniform random displacements smoothed by a Gaussian of width `elastic_sigma` pixels and scaled by
    `elastic_alpha` pixels), applied with bilinear sampling. Pixels sampled from outside the image repeat the border,
    so the fill is the image's own background whatever its polarity (0 for MNIST, 1 for inverted digits).

    `Distortion()` (all zeros) is the identity. [`Distortion.jitter`] is the paper's integer shift only.
    """

    max_rotation_degrees: float = 0.0
    max_scale: float = 0.0  # zoom factor drawn from [1 - max_scale, 1 + max_scale]
    max_shear: float = 0.0
    max_shift_pixels: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0

    @property
    def is_identity(self) -> bool:
        return not (
            self.max_rotation_degrees
            or self.max_scale
            or self.max_shear
            or self.max_shift_pixels
            or self.elastic_alpha
        )

    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Distort a `(batch, channels, height, width)` float batch; returns a new tensor of the same shape."""
        if self.is_identity:
            return pixel_values
        batch, _, height, width = pixel_values.shape
        device, dtype = pixel_values.device, pixel_values.dtype

        def uniform(*shape):  # on [-1, 1], drawn on the CPU (where a default generator lives), then moved
            return (2 * torch.rand(*shape, generator=generator) - 1).to(device=device, dtype=dtype)

        angle = uniform(batch) * (self.max_rotation_degrees * torch.pi / 180)
        scale = 1 + uniform(batch) * self.max_scale
        shear = uniform(batch) * self.max_shear
        # affine_grid works in normalised coordinates ([-1, 1] across the image): a shift of s pixels is 2s / size.
        shift = uniform(batch, 2) * self.max_shift_pixels * 2 / torch.tensor([width, height], dtype=dtype)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos, -sin + shear * cos, shift[:, 0]], -1),
                torch.stack([sin, cos + shear * sin, shift[:, 1]], -1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
        if self.elastic_alpha:
            displacement = _gaussian_blur(uniform(batch, 2, height, width), self.elastic_sigma)
            # Blurring shrinks the field's amplitude; rescale so `elastic_alpha` is the typical displacement in pixels.
            displacement = displacement / displacement.std().clamp(min=1e-8) * self.elastic_alpha
            scale_to_grid = 2 / torch.tensor([width, height], dtype=dtype, device=device)
            grid = grid + displacement.permute(0, 2, 3, 1) * scale_to_grid
        return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class Jitter:
    """The paper's augmentation: every image shifted by its own random integer offset of up to `max_shift` pixels."""

    max_shift: int = 2

    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return jitter_images(pixel_values, self.max_shift, generator)


class ImageTensorDataset(Dataset):
    """
    In-memory image classification dataset yielding `{"pixel_values", "labels"}` examples for `Trainer`.

    It implements `__getitems__`, which PyTorch's `DataLoader` calls with a whole batch of indices: the batch is cut
    with one tensor indexing operation and, when an `augmentation` is set ([`Jitter`], [`Distortion`]), augmented
    with one call. The augmentation belongs to the dataset (not the collator) so that a `Trainer` augments only its
    training set: evaluation and prediction datasets are built without one.

    Args:
        pixel_values: float images `(N, channels, height, width)` in [0, 1].
        labels: int64 class indices `(N,)`.
        augmentation: applied to every batch read from this dataset (None = none).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, augmentation=None):
        if len(pixel_values) != len(labels):
            raise ValueError(f"{len(pixel_values)} images but {len(labels)} labels.")
        self.pixel_values = pixel_values
        self.labels = labels
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        indices = torch.as_tensor(indices, dtype=torch.long)
        pixel_values = self.pixel_values[indices]
        if self.augmentation is not None:
            pixel_values = self.augmentation(pixel_values)
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixel_values, self.labels[indices])]

    def with_augmentation(self, augmentation) -> "ImageTensorDataset":
        """The same examples (shared memory), read through a different augmentation (None: none)."""
        return ImageTensorDataset(self.pixel_values, self.labels, augmentation)

    def select(self, keep: torch.Tensor) -> "ImageTensorDataset":
        """The examples where the boolean mask (or at the indices) `keep` says so, with the same augmentation."""
        return ImageTensorDataset(self.pixel_values[keep], self.labels[keep], self.augmentation)

    def without_label(self, label: int) -> "ImageTensorDataset":
        """A copy holding every example except those of class `label` (e.g. a transfer set without any 3s)."""
        return self.select(self.labels != label)

    def only_labels(self, labels) -> "ImageTensorDataset":
        """A copy holding only the examples of the classes in `labels` (e.g. a transfer set of 7s and 8s)."""
        return self.select(torch.isin(self.labels, torch.as_tensor(list(labels))))

    def take(self, num_examples: int | None) -> "ImageTensorDataset":
        """The first `num_examples` examples (all when None), for quick runs."""
        if num_examples is None:
            return self
        return self.select(slice(0, num_examples))

    def to_hf_dataset(self):
        """A `datasets.Dataset` of the same examples (no augmentation), e.g. for `precompute_teacher_logits`.

        Pixels are stored flat (`channels × height × width` floats per row): Arrow hands a flat float column to
        torch in one copy, several times faster per batch than nested lists (the MLP flattens its input anyway)."""
        import datasets

        flat = self.pixel_values.reshape(len(self), -1).numpy()
        return datasets.Dataset.from_dict({"pixel_values": flat, "labels": self.labels.numpy()}).with_format("torch")


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
        splits = load_mnist_idx(data_dir)
        if is_mnist(splits["test"][0]):
            source = f"MNIST from the IDX files in {data_dir}"
        else:
            source = f"NOT MNIST: the IDX files in {data_dir} (not MNIST's test images; no paper numbers apply)"
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a not-MNIST dataset of MNIST's format, built from MNIST.")
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--data_dir", default="../shared/datasets/mnist", help="The MNIST IDX files.")
    parser.add_argument("--out_dir", required=True)
    arguments = parser.parse_args()
    print(make_variant(arguments.data_dir, arguments.out_dir, arguments.variant))
