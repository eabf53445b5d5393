"""hf-distill: knowledge distillation as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0"

from .arguments import DistillationTrainingArguments
from .losses import DISTILLATION_LOSSES, distillation_divergence
from .trainer import DistillationTrainer

__all__ = ["DISTILLATION_LOSSES", "DistillationTrainer", "DistillationTrainingArguments", "distillation_divergence"]
