"""hf-distill: knowledge distillation as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0"

from .arguments import DistillationTrainingArguments
from .losses import DISTILLATION_LOSSES, distillation_divergence
from .mnist import DigitSplits, ImageTensorDataset, jitter_images, load_digit_splits, read_idx
from .modeling_mlp import MaxNormCallback, MLPConfig, MLPForImageClassification
from .hub import PushToHubError
from .losses import ensemble_teacher_logits
from .teacher_cache import precompute_teacher_logits
from .models import EnsembleTeacher
from .trainer import DistillationTrainer

__all__ = [
    "DISTILLATION_LOSSES",
    "DigitSplits",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "EnsembleTeacher",
    "PushToHubError",
    "ensemble_teacher_logits",
    "precompute_teacher_logits",
    "ImageTensorDataset",
    "MLPConfig",
    "MLPForImageClassification",
    "MaxNormCallback",
    "distillation_divergence",
    "jitter_images",
    "load_digit_splits",
    "read_idx",
]
