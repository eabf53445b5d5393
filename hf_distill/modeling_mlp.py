"""A multilayer perceptron image classifier as a first-class Hugging Face model.

These are the networks of Hinton, Vinyals & Dean (2015), §3 ("Preliminary experiments on MNIST"): fully connected
ReLU layers on flattened pixels, optionally regularised with dropout and a max-norm constraint on the incoming weight
vector of every unit (Srivastava et al., 2014). Because `MLPConfig` / `MLPForImageClassification` are registered with
the Auto classes when `hf_distill` is imported, a trained student saves, pushes and loads like any other checkpoint:

```python
>>> import hf_distill  # registers "hf_distill_mlp"
>>> from transformers import AutoModelForImageClassification
>>> model = AutoModelForImageClassification.from_pretrained("outputs/distill_mnist/distilled")
```

The max-norm constraint is a projection applied after each optimizer step, not part of the loss. Training code applies
it by adding `MaxNormCallback()` to a `Trainer` (or by calling `model.apply_max_norm_()` after `optimizer.step()` in a
custom loop). It is a no-op when `config.max_norm` is `None`.
"""

from dataclasses import field

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    TrainerCallback,
)
from transformers.modeling_outputs import ImageClassifierOutput


class MLPConfig(PretrainedConfig):
    r"""
    Configuration of [`MLPForImageClassification`].

    Args:
        image_size (`int`, *optional*, defaults to 28):
            Height and width of the (square) input images, in pixels.
        num_channels (`int`, *optional*, defaults to 1):
            Number of input channels. The input layer has `num_channels * image_size**2` units.
        hidden_sizes (`list[int]`, *optional*, defaults to `[1200, 1200]`):
            Width of each hidden ReLU layer, input side first. An empty list gives a linear (softmax regression) model.
        input_dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability on the input pixels (the paper's teacher uses 0.2).
        hidden_dropout (`float`, *optional*, defaults to 0.0):
            Dropout probability after every hidden layer (the paper's teacher uses 0.5).
        max_norm (`float`, *optional*):
            Upper bound on the L2 norm of the incoming weight vector of every unit, enforced by
            [`~MLPForImageClassification.apply_max_norm_`] after each optimizer step. `None` disables the constraint.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Unused by the default initialisation (PyTorch's Kaiming-uniform, which suits ReLU layers); kept so that
            generic tooling that reads it finds a value.
        num_labels (`int`, *optional*, defaults to 10):
            Number of classes.

    Example:

    ```python
    >>> from hf_distill import MLPConfig, MLPForImageClassification
    >>> config = MLPConfig(hidden_sizes=[800, 800], num_labels=10)
    >>> model = MLPForImageClassification(config)
    ```
    """

    model_type = "hf_distill_mlp"

    image_size: int = 28
    num_channels: int = 1
    hidden_sizes: list[int] = field(default_factory=lambda: [1200, 1200])
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0
    max_norm: float | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Ten digits is the reason this model exists; other label counts still come through `num_labels`/`id2label`.
        if self.id2label is None and "num_labels" not in kwargs:
            kwargs["num_labels"] = 10
        self.hidden_sizes = list(self.hidden_sizes)
        super().__post_init__(**kwargs)

    @property
    def input_size(self) -> int:
        """Number of input features: the flattened image."""
        return self.num_channels * self.image_size * self.image_size


class MLPPreTrainedModel(PreTrainedModel):
    config: MLPConfig
    config_class = MLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module):
        # PyTorch's default Linear init (Kaiming-uniform with a=sqrt(5)) trains ReLU MLPs well from scratch; the
        # library-wide N(0, 0.02) default makes deep-ish ReLU stacks start with vanishing activations.
        if isinstance(module, nn.Linear):
            module.reset_parameters()


class MLPForImageClassification(MLPPreTrainedModel):
    """
    Fully connected ReLU network on flattened pixels with a linear classification head.

    `forward(pixel_values, labels=None)` accepts images of shape `(batch, channels, height, width)`, `(batch, height,
    width)` or already flattened `(batch, channels * height * width)`, and returns an [`ImageClassifierOutput`] whose
    `loss` is the model's own label loss (cross-entropy for single-label classification) when `labels` are given.
    """

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(config.input_dropout)]
        in_features = config.input_size
        for hidden_size in config.hidden_sizes:
            layers += [nn.Linear(in_features, hidden_size), nn.ReLU(), nn.Dropout(config.hidden_dropout)]
            in_features = hidden_size
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_features, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        # `Flatten` keeps the batch dimension, so 2-D (already flat), 3-D and 4-D inputs all become (batch, features).
        logits = self.classifier(self.mlp(pixel_values))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def apply_max_norm_(self) -> None:
        """
        Project every unit's incoming weight vector (a row of each `nn.Linear.weight`) back onto the L2 ball of radius
        `config.max_norm`, in place. Rows already inside the ball are unchanged. No-op when `config.max_norm` is None.
        """
        if self.config.max_norm is None:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                norms = module.weight.norm(dim=1, keepdim=True)
                module.weight.mul_(norms.clamp(max=self.config.max_norm) / norms.clamp(min=1e-12))


class MaxNormCallback(TrainerCallback):
    """
    Enforce the max-norm constraint of an [`MLPForImageClassification`] after every optimizer step of a `Trainer`.

    Add it with `Trainer(..., callbacks=[MaxNormCallback()])`. The projection runs right after `optimizer.step()`
    (the `on_optimizer_step` event), so gradient accumulation and gradient clipping are unaffected, and it does
    nothing for models without `apply_max_norm_` or with `config.max_norm=None`.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # DDP/accelerate may hand us a wrapped module; the parameters are shared, so projecting the inner one suffices.
        model = getattr(model, "module", model)
        if hasattr(model, "apply_max_norm_"):
            model.apply_max_norm_()


AutoConfig.register(MLPConfig.model_type, MLPConfig)
AutoModelForImageClassification.register(MLPConfig, MLPForImageClassification)
