"""hf-distill: knowledge distillation as a drop-in `transformers.Trainer`."""

__version__ = "0.1.0"
