"""Evaluation modules shipped with hf-distill, loadable offline with `evaluate.load(path)`.

```python
import evaluate
from hf_distill.metrics import DISTILLATION_FIDELITY

fidelity = evaluate.load(DISTILLATION_FIDELITY)
```
"""

from __future__ import annotations

from pathlib import Path

import evaluate


# `evaluate.load` takes a folder holding a script of the same name: distillation_fidelity/distillation_fidelity.py.
DISTILLATION_FIDELITY = str(Path(__file__).resolve().parent / "distillation_fidelity")


def load_distillation_fidelity(**load_kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load(DISTILLATION_FIDELITY, **load_kwargs)`: the distillation fidelity metric (see its description).

    `load_kwargs` go to `evaluate.load` unchanged, e.g. `num_process` / `process_id` / `experiment_id` for distributed
    evaluation, or `cache_dir`.
    """
    return evaluate.load(DISTILLATION_FIDELITY, **load_kwargs)


__all__ = ["DISTILLATION_FIDELITY", "load_distillation_fidelity"]
