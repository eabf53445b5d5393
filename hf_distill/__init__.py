"""hf-distill: knowledge distillation as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0"

from .arguments import DistillationTrainingArguments
from .cache_import import import_teacher_logprobs
from .chunked import chunked_distillation_loss
from .divergences import DISTILLATION_LOSSES, Divergence, get_distillation_loss, register_distillation_loss
from .hub import PushToHubError
from .intermediate import IntermediateMatch
from .losses import distillation_divergence, ensemble_teacher_logits
from .modeling_mlp import MaxNormCallback, MLPConfig, MLPForImageClassification
from .student_init import init_student_from_teacher
from .teacher_cache import precompute_teacher_logits
from .teachers import EnsembleTeacher, TeacherSignal
from .trainer import DistillationTrainer


__all__ = [
    "DISTILLATION_LOSSES",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "Divergence",
    "EnsembleTeacher",
    "IntermediateMatch",
    "MLPConfig",
    "MLPForImageClassification",
    "MaxNormCallback",
    "PushToHubError",
    "TeacherSignal",
    "chunked_distillation_loss",
    "distillation_divergence",
    "ensemble_teacher_logits",
    "get_distillation_loss",
    "import_teacher_logprobs",
    "init_student_from_teacher",
    "precompute_teacher_logits",
    "register_distillation_loss",
]
