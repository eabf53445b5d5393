"""Digit data (IDX reader, splits, fallback), batched jitter, and `examples/distill_mnist.py` end to end."""

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import MNIST_DIR, REPO_ROOT
from mnist_data import ImageTensorDataset, jitter_images, load_digit_splits, read_idx


requires_mnist = pytest.mark.skipif(not MNIST_DIR.exists(), reason=f"MNIST IDX files not found in {MNIST_DIR}")


# ----------------------------------------------------------------------------------------------------- IDX reading


def write_idx(path, array: np.ndarray, dtype_code: int) -> None:
    header = bytes([0, 0, dtype_code, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trips_uint8_plain_and_gzipped(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / name, array, 0x08)
    loaded = read_idx(tmp_path / name)
    assert loaded.dtype == torch.uint8 and tuple(loaded.shape) == (3, 4, 5)
    assert np.array_equal(loaded.numpy(), array)


def test_read_idx_decodes_big_endian_int32(tmp_path):
    array = np.array([-2, 70000, 3], dtype=">i4")
    write_idx(tmp_path / "values.idx", array, 0x0C)
    assert read_idx(tmp_path / "values.idx").tolist() == [-2, 70000, 3]


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "not-idx").write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "not-idx")
    write_idx(tmp_path / "short", np.zeros((2, 3), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header announces shape"):
        read_idx(tmp_path / "short")


@requires_mnist
def test_mnist_idx_files_load_with_the_documented_counts_and_order():
    labels = read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(labels.long()).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert tuple(read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz").shape) == (10000, 28, 28)


@requires_mnist
def test_digit_splits_hold_out_validation_from_train():
    splits = load_digit_splits(MNIST_DIR, validation_size=5000, seed=0)
    assert splits.source.startswith("MNIST from the IDX files")
    assert (len(splits.train), len(splits.validation), len(splits.test), splits.image_size) == (55000, 5000, 10000, 28)
    assert splits.train.pixel_values.shape == (55000, 1, 28, 28) and splits.train.pixel_values.dtype == torch.float32
    assert 0.0 <= splits.train.pixel_values.min() and splits.train.pixel_values.max() <= 1.0
    # The two parts of the training file partition it: class counts add up to the file's.
    counts = torch.bincount(splits.train.labels, minlength=10) + torch.bincount(splits.validation.labels, minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # Same seed, same split: a saved teacher's validation images are not in a later run's training set.
    again = load_digit_splits(MNIST_DIR, validation_size=5000, seed=0)
    assert torch.equal(again.validation.labels, splits.validation.labels)


def test_offline_without_data_dir_falls_back_to_sklearn_digits_and_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    splits = load_digit_splits(None, validation_size=0.1)
    assert splits.source.startswith("NOT MNIST") and "scikit-learn" in splits.source
    assert splits.image_size == 8 and splits.train.pixel_values.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 1797


def test_without_label_removes_exactly_that_class():
    dataset = ImageTensorDataset(torch.rand(10, 1, 4, 4), torch.tensor([0, 3, 1, 3, 2, 3, 0, 1, 2, 9]))
    kept = dataset.without_label(3)
    assert kept.labels.tolist() == [0, 1, 2, 0, 1, 2, 9]
    assert torch.equal(kept.pixel_values, dataset.pixel_values[dataset.labels != 3])


# ----------------------------------------------------------------------------------------------------------- jitter


def find_shift(original: torch.Tensor, shifted: torch.Tensor, max_shift: int):
    """The (down, right) translation that maps `original` (content away from the border) onto `shifted`."""
    matches = [
        (dy, dx)
        for dy in range(-max_shift, max_shift + 1)
        for dx in range(-max_shift, max_shift + 1)
        if torch.equal(torch.roll(original, shifts=(dy, dx), dims=(-2, -1)), shifted)
    ]
    assert len(matches) == 1, f"not a single translation within ±{max_shift}: {matches}"
    return matches[0]


def images_with_empty_border(batch_size: int, size: int = 12, border: int = 2, channels: int = 1) -> torch.Tensor:
    images = torch.zeros(batch_size, channels, size, size)
    inner = size - 2 * border
    images[..., border:-border, border:-border] = torch.rand(batch_size, channels, inner, inner)
    return images


def test_jitter_translates_each_image_by_its_own_offset_within_bounds():
    torch.manual_seed(0)
    images = images_with_empty_border(400)
    jittered = jitter_images(images, max_shift=2)
    assert jittered.shape == images.shape and jittered.dtype == images.dtype
    shifts = [find_shift(images[i], jittered[i], 2) for i in range(len(images))]
    # Offsets are drawn per image (all 25 occur in 400 draws) and uniformly (each ~16 times; 5 would be absurd).
    counts = torch.tensor([shifts.count((dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3)])
    assert counts.min() >= 5 and counts.sum() == 400


def test_jitter_fills_uncovered_pixels_with_background_and_keeps_bounds_for_full_images():
    torch.manual_seed(0)
    images = torch.ones(50, 1, 10, 10)
    jittered = jitter_images(images, max_shift=2)
    # A shift of (dy, dx) uncovers |dy| rows and |dx| columns, which become 0; the rest stays 1.
    ones_per_image = jittered.sum(dim=(1, 2, 3))
    assert ones_per_image.min() >= 8 * 8 and ones_per_image.max() <= 100
    assert set(jittered.unique().tolist()) <= {0.0, 1.0}


def test_jitter_shares_the_offset_across_channels_and_accepts_3d_batches():
    torch.manual_seed(0)
    images = images_with_empty_border(20, channels=3)
    jittered = jitter_images(images, max_shift=1)
    for image, moved in zip(images, jittered):
        assert find_shift(image, moved, 1) == find_shift(image[0], moved[0], 1)
    flat_batch = images[:, 0]
    assert jitter_images(flat_batch, max_shift=1).shape == flat_batch.shape


def test_jitter_is_reproducible_with_a_generator_and_identity_at_zero():
    images = images_with_empty_border(16)
    first = jitter_images(images, 2, generator=torch.Generator().manual_seed(7))
    second = jitter_images(images, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert jitter_images(images, 0) is images


def test_dataset_jitters_whole_batches_only_when_asked():
    torch.manual_seed(0)
    images = images_with_empty_border(64)
    dataset = ImageTensorDataset(images, torch.arange(64) % 10)
    batch = dataset.__getitems__(list(range(0, 64, 2)))
    assert [example["labels"].item() for example in batch] == [i % 10 for i in range(0, 64, 2)]
    assert all(torch.equal(example["pixel_values"], images[2 * k]) for k, example in enumerate(batch))
    jittered = dataset.with_jitter(2).__getitems__(list(range(64)))
    shifts = {find_shift(images[i], example["pixel_values"], 2) for i, example in enumerate(jittered)}
    assert len(shifts) > 5  # one random offset per image, not one per batch
    assert torch.equal(dataset.with_jitter(2).pixel_values, images)  # shared, never modified


# ------------------------------------------------------------------------------------------------------ end to end


def load_example():
    spec = importlib.util.spec_from_file_location("distill_mnist", REPO_ROOT / "examples" / "distill_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = [
    "--teacher_hidden_sizes", "64", "64", "--teacher_epochs", "3", "--teacher_learning_rate", "0.05",
    "--student_hidden_sizes", "16", "--num_train_epochs", "3", "--learning_rate", "0.01",
    "--per_device_train_batch_size", "32", "--temperature", "4", "--use_cpu", "true",
]  # fmt: skip


@requires_mnist
@pytest.mark.slow
def test_example_end_to_end_on_a_few_hundred_mnist_rows(tmp_path, capsys):
    example = load_example()
    argv = [
        "--data_dir", str(MNIST_DIR), "--output_dir", str(tmp_path), "--max_train_samples", "600",
        "--validation_size", "200", "--max_test_samples", "300", *TINY_RUN,
    ]  # fmt: skip
    results = example.main([*argv, "--omit_digit", "3"])
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "results_without_3.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert (saved["train_size"], saved["validation_size"], saved["test_size"]) == (600, 200, 300)
    png = (tmp_path / "results_without_3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    assert [row["name"] for row in saved["models"]] == ["teacher", "baseline", "distilled"]
    for row in saved["models"]:
        assert 0 <= row["test_errors"] <= 300
        assert row["test_errors"] == round(row["test_error_percent"] * 300 / 100)
        assert 0.0 <= row["agreement_with_teacher"] <= 1.0
        assert len(row["learning_curve"]) == 3  # one validation point per epoch
        assert f"| {row['test_errors']} / 300 | {row['test_error_percent']:.2f} |" in printed
    assert saved["models"][0]["agreement_with_teacher"] == 1.0
    assert saved["models"][0]["kl_from_teacher"] == pytest.approx(0.0, abs=1e-9)  # the fidelity metric module
    assert all(row["kl_from_teacher"] >= 0 and 0 <= row["expected_calibration_error"] <= 1 for row in saved["models"])
    assert [row["paper_test_errors"] for row in saved["models"]] == [67, None, None]  # no-3s students: see below
    assert [row["hidden_sizes"] for row in saved["models"]] == [[64, 64], [16], [16]]
    assert "| teacher | 2×64 |" in printed and "| distilled | 1×16 |" in printed

    omitted = saved["omit_digit"]
    number_of_threes = omitted["digit_test_count"]
    test_labels = example.load_digit_splits(MNIST_DIR).test.labels[:300]
    assert omitted["digit"] == 3 and number_of_threes == int((test_labels == 3).sum())
    assert omitted["errors"] == saved["models"][2]["test_errors"]  # "as trained" is the distilled row
    assert 0 <= omitted["corrected_errors_on_digit"] <= omitted["corrected_errors"] <= 300
    assert 0 <= omitted["errors_on_digit"] <= number_of_threes
    assert f"| as trained | {omitted['errors']} | {omitted['errors_on_digit']} |" in printed

    # The plain experiment in the same output_dir reuses the saved teacher and writes its own files next to these.
    plain = example.main(argv)
    assert not results["teacher_reused"] and plain["teacher_reused"]
    assert "omit_digit" not in plain and (tmp_path / "results.json").exists() and (tmp_path / "results.png").exists()
    assert [row["paper_test_errors"] for row in plain["models"]] == [67, 146, 74]
    assert plain["models"][0]["test_errors"] == saved["models"][0]["test_errors"]
    assert plain["models"][0]["learning_curve"] == saved["models"][0]["learning_curve"]
    assert (tmp_path / "distilled" / "config.json").exists()
    assert (tmp_path / "distilled_without_3" / "config.json").exists()
