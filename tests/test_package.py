"""What `import hf_distill` brings in: the library only, not the MNIST example's data code or its optional deps."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

import hf_distill


@pytest.mark.slow
def test_importing_hf_distill_does_not_import_sklearn_or_matplotlib():
    code = "import hf_distill, sys; assert not {'sklearn','matplotlib'} & set(sys.modules)"
    # A fresh interpreter: this one may already have imported both (the MNIST example's tests do).
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_mnist_data_code_is_not_part_of_the_package():
    assert not hasattr(hf_distill, "load_digit_splits")
    assert importlib.util.find_spec("hf_distill.mnist") is None
    assert (REPO_ROOT / "examples" / "mnist_data.py").is_file()
