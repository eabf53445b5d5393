"""hf-distill: knowledge distillation as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0"

from .arguments import DistillationTrainingArguments
from .losses import DISTILLATION_LOSSES, distillation_divergence
from .mnist import DigitSplits, ImageTensorDataset, jitter_images, load_digit_splits, read_idx
from .modeling_mlp import MaxNormCallback, MLPConfig, MLPForImageClassification
from .trainer import DistillationTrainer

__all__ = [
    "DISTILLATION_LOSSES",
    "DigitSplits",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "ImageTensorDataset",
    "MLPConfig",
    "MLPForImageClassification",
    "MaxNormCallback",
    "distillation_divergence",
    "jitter_images",
    "load_digit_splits",
    "read_idx",
]
