"""The package as users install it: a wheel built from this tree holds the model card template (reached through the
``hf_distill/model_cards -> ../model_cards`` symlink) and every module, and a card is written from the installed copy.

Built and installed offline (``--no-index``, no build isolation: the installed setuptools builds it) from a copy of the
files the build reads, so no ``build/`` or ``*.egg-info`` is left in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from huggingface_hub import ModelCard


pytestmark = pytest.mark.slow

TEMPLATE = "hf_distill/model_cards/distillation_model_card.md"
FIDELITY_METRIC = "hf_distill/metrics/distillation_fidelity/distillation_fidelity.py"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

# Run in a fresh process whose PYTHONPATH puts the installed wheel ahead of the editable install.
WRITE_CARD = """
import os, sys
import hf_distill

site, output_dir = sys.argv[1], sys.argv[2]
assert os.path.realpath(hf_distill.__file__).startswith(os.path.realpath(site) + os.sep), hf_distill.__file__

import datasets, torch
from transformers import BertConfig, BertForSequenceClassification
from hf_distill import DistillationTrainer, DistillationTrainingArguments


def bert(hidden_size):
    config = BertConfig(vocab_size=40, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config)


torch.manual_seed(0)
student, teacher = bert(24), bert(48)
generator = torch.Generator().manual_seed(0)
eval_set = datasets.Dataset.from_dict({
    "input_ids": torch.randint(1, 40, (8, 6), generator=generator).tolist(),
    "labels": torch.randint(0, 3, (8,), generator=generator).tolist(),
})
args = DistillationTrainingArguments(output_dir=output_dir, report_to=[], use_cpu=True, disable_tqdm=True,
                                     per_device_eval_batch_size=8, temperature=2.0, alpha=0.5)
DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=eval_set).create_model_card()
"""


def copy_build_inputs(destination: Path) -> Path:
    """The top-level files (pyproject.toml, README.md, ...), the package and the card templates, symlinks kept."""
    destination.mkdir()
    for path in REPO_ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, destination / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("hf_distill", "model_cards"):
        shutil.copytree(REPO_ROOT / folder, destination / folder, symlinks=True, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, folder it is installed in), built and installed offline."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools installed")
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_build_inputs(tmp / "source")
    built = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("hf_distill-*.whl")
    site = tmp / "site"
    installed = subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return wheel, site


def test_wheel_holds_the_card_template_and_every_module(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    assert TEMPLATE in names
    if (REPO_ROOT / FIDELITY_METRIC).exists():
        assert FIDELITY_METRIC in names
    # Every Python file of the package, including folders without __init__.py (evaluate metric modules).
    sources = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "hf_distill").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sources <= names, sorted(sources - names)
    assert (REPO_ROOT / "model_cards" / "distillation_model_card.md").read_bytes() == zipfile.ZipFile(wheel).read(
        TEMPLATE
    )


def test_installed_wheel_writes_a_card(installed_wheel, tmp_path):
    _, site = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    output_dir = tmp_path / "tiny-student"
    result = subprocess.run(
        [sys.executable, "-c", WRITE_CARD, str(site), str(output_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    text = (output_dir / "README.md").read_text()
    for section in (
        "# tiny-student",
        "## Teacher and student",
        "## Distillation",
        "## Evaluation: student vs teacher",
        "## Intended uses & limitations",
        "## Training and evaluation data",
        "## Training procedure",
        "## Citation",
    ):
        assert section in text, section
    assert "alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · label_loss" in text
    assert "| eval_teacher_agreement" in text and "arXiv:1503.02531" in text
    distillation = ModelCard(text).data.distillation
    assert distillation["loss"] == "kl" and distillation["temperature"] == 2.0 and distillation["alpha"] == 0.5
    assert distillation["teacher_parameters"] > distillation["student_parameters"]
