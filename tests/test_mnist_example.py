"""Digit data (IDX reader, splits, fallback, variants), augmentations, and `examples/distill_mnist.py` end to end."""

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import MNIST_DIR, REPO_ROOT
from mnist_data import (
    Distortion,
    ImageTensorDataset,
    Jitter,
    is_mnist,
    jitter_images,
    load_digit_splits,
    load_mnist_idx,
    make_variant,
    read_idx,
)


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
    jittered = dataset.with_augmentation(Jitter(2)).__getitems__(list(range(64)))
    shifts = {find_shift(images[i], example["pixel_values"], 2) for i, example in enumerate(jittered)}
    assert len(shifts) > 5  # one random offset per image, not one per batch
    assert torch.equal(dataset.with_augmentation(Jitter(2)).pixel_values, images)  # shared, never modified


# ------------------------------------------------------------------------------------------------------ distortion


def test_distortion_identity_is_a_no_op_and_settings_move_pixels_reproducibly():
    images = torch.rand(8, 1, 28, 28)
    assert Distortion()(images) is images
    distort = Distortion(max_rotation_degrees=12, max_scale=0.1, max_shear=0.1, max_shift_pixels=2, elastic_alpha=1.5)
    first = distort(images, generator=torch.Generator().manual_seed(3))
    second = distort(images, generator=torch.Generator().manual_seed(3))
    assert first.shape == images.shape and torch.equal(first, second)
    assert not torch.allclose(first, images, atol=1e-3)
    # A zero-size transform samples every pixel at its own centre: bilinear sampling returns the image.
    still = Distortion(max_rotation_degrees=1e-9)(images)
    assert torch.allclose(still, images, atol=1e-5)


def test_distortion_fills_with_the_border_so_either_background_polarity_survives():
    # Uniform images of either polarity stay uniform: pixels sampled outside repeat the border, never a fixed fill.
    distort = Distortion(max_shift_pixels=3, max_rotation_degrees=20, elastic_alpha=1.0)
    for background in (torch.ones(4, 1, 28, 28), torch.zeros(4, 1, 28, 28)):
        assert torch.allclose(distort(background), background)


# -------------------------------------------------------------------------------------------------------- variants


@requires_mnist
def test_variants_are_not_mnist_and_keep_labels(tmp_path):
    original = load_mnist_idx(MNIST_DIR)
    assert is_mnist(original["test"][0])
    for variant in ("permuted", "inverted"):
        folder = make_variant(MNIST_DIR, tmp_path / variant, variant)
        built = load_mnist_idx(folder)
        assert torch.equal(built["test"][1], original["test"][1]) and torch.equal(
            built["train"][1], original["train"][1]
        )
        assert not is_mnist(built["test"][0])
        splits = load_digit_splits(folder, validation_size=100)
        assert splits.source.startswith("NOT MNIST") and not splits.is_mnist
    inverted = load_mnist_idx(tmp_path / "inverted")["test"][0]
    assert torch.equal(inverted, 255 - original["test"][0])
    permuted = load_mnist_idx(tmp_path / "permuted")["test"][0]
    assert torch.equal(permuted.flatten(1).sort(-1).values, original["test"][0].flatten(1).sort(-1).values)


# ------------------------------------------------------------------------------------------------------ end to end


def load_example():
    spec = importlib.util.spec_from_file_location("distill_mnist", REPO_ROOT / "examples" / "distill_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = [
    "--teacher_hidden_sizes", "64", "64", "--teacher_epochs", "3", "--teacher_learning_rate", "0.05",
    "--student_hidden_sizes", "16", "--num_train_epochs", "3", "--learning_rate", "0.01",
    "--per_device_train_batch_size", "32", "--temperature", "4", "--use_cpu", "true", "--num_threads", "1",
]  # fmt: skip


def tiny_argv(data_dir, output_dir):
    return [
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--max_train_samples", "600",
        "--validation_size", "200", "--max_test_samples", "300", *TINY_RUN,
    ]  # fmt: skip


def check_rows(saved, printed, names):
    assert [row["name"] for row in saved["models"]] == names
    for row in saved["models"]:
        assert 0 <= row["test_errors"] <= 300
        assert row["test_errors"] == round(row["test_error_percent"] * 300 / 100)
        assert 0.0 <= row["agreement_with_teacher"] <= 1.0
        assert 0 <= row["validation_errors"] <= 200
        assert (
            f"| {row['test_errors']} / 300 | {row['test_error_percent']:.2f} | {row['validation_errors']} |" in printed
        )
    assert saved["models"][0]["agreement_with_teacher"] == 1.0
    assert saved["models"][0]["kl_from_teacher"] == pytest.approx(0.0, abs=1e-9)  # the fidelity metric module
    assert all(row["kl_from_teacher"] >= 0 and 0 <= row["expected_calibration_error"] <= 1 for row in saved["models"])


@requires_mnist
@pytest.mark.slow
def test_example_end_to_end_on_a_few_hundred_mnist_rows(tmp_path, capsys):
    example = load_example()
    argv = tiny_argv(MNIST_DIR, tmp_path)
    results = example.main([*argv, "--omit_digit", "3"])
    printed = capsys.readouterr().out

    saved = json.loads((tmp_path / "results_without_3.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    assert (saved["train_size"], saved["validation_size"], saved["test_size"]) == (600, 200, 300)
    png = (tmp_path / "results_without_3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    check_rows(saved, printed, ["teacher", "baseline", "distilled"])
    # The teacher's augmentation was chosen on validation among the quick preset's candidates.
    assert set(saved["teacher"]["candidates"]) == {"none", "jitter"}
    assert saved["teacher"]["validation_errors"] == min(saved["teacher"]["candidates"].values())
    assert saved["models"][0]["validation_errors"] == saved["teacher"]["validation_errors"]
    assert all(len(row["learning_curve"]) == 3 for row in saved["models"])  # one validation point per epoch
    assert [row["paper_test_errors"] for row in saved["models"]] == [67, None, None]  # no-3s students: see below
    assert [row["hidden_sizes"] for row in saved["models"]] == [[64, 64], [16], [16]]
    train_labels = example.load_digit_splits(MNIST_DIR, validation_size=200).train.labels[:600]
    assert [row["train_images"] for row in saved["models"]] == [600] + [int((train_labels != 3).sum())] * 2
    assert "| teacher | 2×64 |" in printed and "| distilled | 1×16 |" in printed

    correction = saved["bias_correction"]
    test_labels = example.load_digit_splits(MNIST_DIR).test.labels[:300]
    assert correction["unseen_classes"] == [3] and correction["unseen_test_count"] == int((test_labels == 3).sum())
    assert correction["errors"] == saved["models"][2]["test_errors"]  # "as trained" is the distilled row
    assert 0 <= correction["corrected_errors_on_unseen"] <= correction["corrected_errors"] <= 300
    assert 0 <= correction["errors_on_unseen"] <= correction["unseen_test_count"]
    assert f"| as trained | 0 | {correction['errors']} |" in printed
    chosen = correction["rules"]["fewest validation errors"]
    assert (correction["bias"], correction["corrected_errors"]) == (chosen["bias"], chosen["errors"])

    # The plain experiment in the same output_dir reuses the saved teacher and writes its own files next to these.
    plain = example.main(argv)
    assert not results["teacher"]["reused"] and plain["teacher"]["reused"]
    assert (
        "bias_correction" not in plain and (tmp_path / "results.json").exists() and (tmp_path / "results.png").exists()
    )
    assert [row["paper_test_errors"] for row in plain["models"]] == [67, 146, 74]
    assert plain["models"][0]["test_errors"] == saved["models"][0]["test_errors"]
    assert plain["models"][0]["learning_curve"] == saved["models"][0]["learning_curve"]
    assert (tmp_path / "distilled" / "config.json").exists()
    assert (tmp_path / "distilled_without_3" / "config.json").exists()


def test_bias_rules_on_logits_with_a_known_answer():
    """Images of class 2 score 1 below their wrong class 0; other images score 3 above class 2. A bias b on class 2
    fixes the 2s once b > 1 and breaks the others once b > 3: the fewest errors lie in (1, 3], the teacher's rate
    (it predicts 2 for the three 2s) is reached just above 1."""
    example = load_example()
    labels = torch.tensor([0, 1, 2, 2, 2, 0, 1])
    logits = torch.zeros(7, 3)
    logits[torch.arange(7), labels] = 3.0
    logits[labels == 2, 2], logits[labels == 2, 0] = 2.0, 3.0
    bias = example.bias_minimising_errors(logits, labels, unseen=[2])
    assert 1 < bias <= 3 and bias == pytest.approx(2.0, abs=0.05)
    teacher_logits = torch.nn.functional.one_hot(labels, 3).float()
    assert example.bias_matching_teacher_rate(logits, teacher_logits, unseen=[2]) == pytest.approx(1.0, abs=1e-6)


@requires_mnist
@pytest.mark.slow
def test_transfer_digits_and_train_fraction_experiments_end_to_end(tmp_path, capsys):
    example = load_example()
    argv = tiny_argv(MNIST_DIR, tmp_path)
    only = example.main([*argv, "--transfer_digits", "7", "8", "--teacher_augmentations", "none"])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "results_only_7_8.json").read_text())["models"] == json.loads(
        json.dumps(only["models"])
    )
    check_rows(only, printed, ["teacher", "baseline", "distilled"])
    correction = only["bias_correction"]
    assert correction["unseen_classes"] == [0, 1, 2, 3, 4, 5, 6, 9]
    assert "0s, 1s, 2s, 3s, 4s, 5s, 6s and 9s" in printed and "47.3%" in printed  # the paper's figure beside ours
    train_labels = example.load_digit_splits(MNIST_DIR, validation_size=200).train.labels[:600]
    assert only["models"][1]["train_images"] == int(((train_labels == 7) | (train_labels == 8)).sum())

    fraction = example.main([*argv, "--train_fraction", "0.1", "--teacher_augmentations", "none"])
    printed = capsys.readouterr().out
    assert fraction["teacher"]["reused"]
    check_rows(fraction, printed, ["teacher", "baseline", "distilled", "baseline (all images)"])
    assert [row["train_images"] for row in fraction["models"]] == [600, 60, 60, 600]
    # Same number of optimizer steps whatever the transfer set's size: 10x the epochs on a tenth of the images.
    students = fraction["models"][1:]
    assert [len(row["learning_curve"]) for row in students] == [3, 3, 3]
    assert [point[0] for point in students[0]["learning_curve"]] == [
        point[0] for point in students[2]["learning_curve"]
    ]
    assert "§6" in printed and (tmp_path / "results_fraction_0.1.png").exists()
    with pytest.raises(ValueError, match="one experiment at a time"):
        example.main([*argv, "--train_fraction", "0.1", "--omit_digit", "3"])


@requires_mnist
@pytest.mark.slow
def test_a_teacher_that_loses_to_the_baseline_on_validation_is_reported(tmp_path, capsys):
    """A case built to fail the check: a 4-unit teacher for one epoch cannot beat the baseline student."""
    example = load_example()
    argv = [*tiny_argv(make_variant(MNIST_DIR, tmp_path / "inverted", "inverted"), tmp_path / "out")]
    argv += ["--teacher_hidden_sizes", "4", "--teacher_epochs", "1", "--student_hidden_sizes", "64"]
    results = example.main(argv)
    printed = capsys.readouterr().out
    teacher, baseline = results["models"][0]["validation_errors"], results["models"][1]["validation_errors"]
    assert teacher >= baseline
    assert any(
        w.startswith(f"WARNING: the teacher ({teacher} validation errors) does not beat") for w in results["warnings"]
    )
    assert results["warnings"][0] in printed and "--teacher_augmentations none" in printed
    assert json.loads((tmp_path / "out" / "results.json").read_text())["warnings"] == results["warnings"]
    assert results["data_name"] == "not MNIST" and all(row["paper_test_errors"] is None for row in results["models"])
