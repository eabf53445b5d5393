"""`DistillationTrainer`: a drop-in `transformers.Trainer` that distils a teacher into the student it trains.

The trainer only wires; the math lives in `hf_distill.losses`. Hooks overridden, smallest first:

* `compute_loss` — runs the teacher, mixes the distillation and label losses, records the unweighted terms;
* `get_batch_samples` — counts the positions of the whole accumulated (and, in DDP, all-process) batch, so the loss is
  normalised once per optimizer step and gradient accumulation is exact;
* `training_step` — names the step when the teacher produced NaN/inf;
* `log` / `evaluation_loop` — add `loss_kd`, `loss_ce` and `teacher_agreement` next to Trainer's own keys.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    Trainer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import find_batch_size
from transformers.utils import logging

from . import losses
from .arguments import DistillationTrainingArguments
from .hub import push_errors_explained
from .model_card import write_distillation_model_card

logger = logging.get_logger(__name__)

# Auto classes tried, in order, to load a teacher given as a path or Hub id with the student's task head.
_TASK_AUTO_CLASSES = (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    AutoModelForSequenceClassification,
    AutoModelForImageClassification,
)


def _logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a `ModelOutput`/dict with ``logits``, or a bare tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    raise TypeError(
        f"Cannot find logits in a model output of type {type(outputs).__name__}: return a tensor of logits, a dict with "
        "a 'logits' key, or a transformers `ModelOutput`."
    )


def _auto_class_for(model: nn.Module):
    """The `AutoModelFor...` class whose mapping holds `type(model)`, or None."""
    for auto_class in _TASK_AUTO_CLASSES:
        mapping = auto_class._model_mapping
        names = set()
        for value in mapping._model_mapping.values():
            names.update(value if isinstance(value, (tuple, list)) else (value,))
        if type(model).__name__ in names or type(model) in mapping._extra_content.values():
            return auto_class
    return None


def _output_size(model: nn.Module) -> int | None:
    """Size of the last axis of the model's logits (vocabulary or number of labels), if knowable without a forward."""
    if not isinstance(model, PreTrainedModel):
        return None
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and getattr(output_embeddings, "weight", None) is not None:
        return output_embeddings.weight.shape[0]
    return getattr(model.config, "num_labels", None)


def _accepted_arguments(model: nn.Module) -> set[str] | None:
    """Input names `model.forward` takes, or None when it takes any (a plain module with ``**kwargs``).

    A transformers model's ``**kwargs`` carry attention/loss options, not data columns, so only its named parameters
    count.
    """
    parameters = inspect.signature(model.forward).parameters
    if not isinstance(model, PreTrainedModel) and any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return None
    return {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class _DistillationStats:
    """Device-side running sums behind `loss_kd`, `loss_ce` and `teacher_agreement`; read (one sync) when logged."""

    _FIELDS = ("kd_sum", "kd_count", "ce_sum", "ce_count", "agree")

    def __init__(self):
        self.totals: torch.Tensor | None = None

    def add(self, device: torch.device, **values: torch.Tensor | float) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        update = torch.stack([torch.as_tensor(values.get(name, 0.0), dtype=dtype, device=device).detach()
                              for name in self._FIELDS])
        self.totals = update if self.totals is None else self.totals + update

    def pop_means(self, accelerator, prefix: str = "") -> dict[str, float]:
        """Means over everything added since the last call, summed over processes; then reset."""
        totals = self.totals
        self.totals = None
        if accelerator.num_processes > 1:
            # Every process must join the reduction, even one that saw no batch.
            totals = totals if totals is not None else torch.zeros(len(self._FIELDS), dtype=torch.float64,
                                                                   device=accelerator.device)
            totals = accelerator.reduce(totals, reduction="sum")
        if totals is None:
            return {}
        kd_sum, kd_count, ce_sum, ce_count, agree = totals.tolist()
        metrics = {}
        if kd_count > 0:
            metrics[f"{prefix}loss_kd"] = kd_sum / kd_count
            metrics[f"{prefix}teacher_agreement"] = agree / kd_count
        if ce_count > 0:
            metrics[f"{prefix}loss_ce"] = ce_sum / ce_count
        return metrics


class DistillationTrainer(Trainer):
    """[`~transformers.Trainer`] that trains `model` (the student) to match `teacher_model` (Hinton et al., 2015).

    The loss of each optimizer step is

        alpha * mean_over_counted_positions(T² · D(teacher_T ‖ student_T)) + (1 − alpha) * label_loss

    with `D`, `T` and `alpha` from [`DistillationTrainingArguments`] and the label loss being the student's own
    (its `outputs.loss`, Trainer's label smoother when `label_smoothing_factor > 0`, or `compute_loss_func`). A counted
    position is a row of a classifier, or a token whose label is not -100 (causal LMs: shifted exactly as their loss).

    Args:
        model: the student, as for `Trainer`.
        teacher_model: a `PreTrainedModel`, a plain `nn.Module` returning logits (or an output with `.logits`), or a
            path / Hub id loaded with the `AutoModelFor...` class of the student's task head and
            `args.teacher_model_init_kwargs`. Its logits must have the student's last-axis size, except for causal LMs
            whose vocabularies are padded past the tokenizer (`processing_class`), which are compared on the
            tokenizer's `len()` real entries.
        args: [`DistillationTrainingArguments`].
        **kwargs: every other `Trainer.__init__` argument, unchanged.

    The teacher is put in eval mode, frozen, moved to the student's device, run under the same autocast as the student,
    never wrapped in DDP, never saved, never given to the optimizer.
    """

    # `compute_loss` divides by the counted positions of the whole accumulated batch (`get_batch_samples`), so
    # `training_step` must not divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationTrainingArguments | None = None,
        **kwargs,
    ):
        if args is None:
            args = DistillationTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"`args` must be a DistillationTrainingArguments (it carries temperature, alpha, distillation_loss), got"
                f" {type(args).__name__}; build it with `DistillationTrainingArguments(...)` and the same fields."
            )
        if teacher_model is None:
            raise ValueError(
                "DistillationTrainer needs a `teacher_model`: a model, an nn.Module returning logits, or a path/Hub id. "
                "For training on labels alone use transformers.Trainer (or alpha=0)."
            )
        super().__init__(model=model, args=args, **kwargs)

        student = self.accelerator.unwrap_model(self.model)
        if isinstance(teacher_model, str):
            teacher_model = self._load_teacher(teacher_model, student)
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"`teacher_model` must be an nn.Module or a path/Hub id, got {type(teacher_model).__name__}.")
        self.teacher_model = teacher_model

        config = getattr(student, "config", None)
        self._is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # Same test Trainer uses to shift labels for its label smoother.
        self._shift_labels = type(student).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() and (
            not self._is_encoder_decoder
        )
        # Token-level students have one prediction per token, so without labels the attention mask says what counts.
        self._token_level = isinstance(student, PreTrainedModel) and (
            student.get_output_embeddings() is not None or _auto_class_for(student) is AutoModelForTokenClassification
        )
        self._kd_vocab_size = self._check_output_sizes(student, teacher_model)
        self._student_arguments = _accepted_arguments(student)
        self._teacher_arguments = _accepted_arguments(teacher_model)
        self._check_labels_available()

        teacher_model.eval()
        teacher_model.requires_grad_(False)
        self._teacher_prepared = False
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(teacher_model, "hf_device_map", None)):
            teacher_model.to(self.args.device)
            self._teacher_prepared = True

        self._train_stats = _DistillationStats()
        self._eval_stats = _DistillationStats()
        # Sticky device-side flag: set when teacher logits held NaN/inf; read only at points that sync anyway.
        self._teacher_nonfinite = torch.zeros((), dtype=torch.bool, device=self.args.device)

    # ---- construction helpers ----

    def _load_teacher(self, name_or_path: str, student: nn.Module) -> PreTrainedModel:
        auto_class = _auto_class_for(student)
        if auto_class is None:
            raise ValueError(
                f"Cannot tell which AutoModelFor... class loads a teacher for a {type(student).__name__} student; load "
                f"the teacher yourself and pass the model as `teacher_model` instead of {name_or_path!r}."
            )
        init_kwargs = dict(self.args.teacher_model_init_kwargs or {})
        dtype = init_kwargs.get("dtype", init_kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            init_kwargs["dtype" if "dtype" in init_kwargs else "torch_dtype"] = getattr(torch, dtype)
        return auto_class.from_pretrained(name_or_path, **init_kwargs)

    def _check_output_sizes(self, student: nn.Module, teacher: nn.Module) -> int | None:
        """Raise on a teacher/student output-size mismatch; return the vocabulary slice for padded causal LMs."""
        student_size, teacher_size = _output_size(student), _output_size(teacher)
        if student_size is None or teacher_size is None or student_size == teacher_size:
            return None
        tokenizer_size = len(self.processing_class) if hasattr(self.processing_class, "__len__") else None
        if self._shift_labels and tokenizer_size is not None and tokenizer_size <= min(student_size, teacher_size):
            logger.info(
                f"Teacher vocabulary {teacher_size} and student vocabulary {student_size} differ only in padding past "
                f"the tokenizer's {tokenizer_size} entries: distilling over those {tokenizer_size}."
            )
            return tokenizer_size
        raise ValueError(
            f"Teacher and student outputs differ in size: teacher {teacher_size}, student {student_size} "
            "(num_labels or vocabulary size). Use a teacher with the student's label set / tokenizer. (Causal LMs whose "
            "vocabularies only differ by padding are accepted when `processing_class` is their tokenizer.)"
        )

    def _check_labels_available(self) -> None:
        if self.args.alpha == 1.0 or self.train_dataset is None:
            return
        label_columns = set(self.label_names) | {"label", "label_ids"}
        columns = getattr(self.train_dataset, "column_names", None)
        if columns is None:
            try:
                first = self.train_dataset[0]
            except Exception:  # iterable or exotic datasets: checked at the first step instead
                return
            columns = list(first.keys()) if isinstance(first, Mapping) else None
        if columns is not None and not label_columns & set(columns):
            raise ValueError(
                f"alpha={self.args.alpha} gives the label loss a weight of {1 - self.args.alpha:g}, but the training "
                f"dataset has no label column (columns: {sorted(columns)}). Add labels, or set alpha=1.0 to train on "
                "the teacher's soft targets alone."
            )

    def _prepare_teacher(self) -> None:
        """Place the teacher under DeepSpeed/FSDP, once, at its first use (after the engine config is final)."""
        if self.is_deepspeed_enabled:
            self.teacher_model = _deepspeed_inference_engine(self.teacher_model, self.accelerator)
        elif self.is_fsdp_enabled:
            # UNVERIFIED until a multi-GPU run: FSDP shards the frozen teacher like the student; it must not join
            # `accelerator._models`, which `save_state` writes to checkpoints.
            self.teacher_model = self.accelerator.prepare_model(self.teacher_model, evaluation_mode=True)
            if self.teacher_model in self.accelerator._models:
                self.accelerator._models.remove(self.teacher_model)
        self._teacher_prepared = True

    # ---- the loss ----

    def _counted_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Boolean mask ``[B]`` (sequence level) or ``[B, L']`` (token level) of the positions that count."""
        labels = inputs.get("labels")
        if labels is not None:
            mask = labels.ne(losses.IGNORE_INDEX)
        elif self._token_level:
            reference = inputs.get("attention_mask", inputs.get("decoder_attention_mask"))
            if reference is None:
                reference = torch.ones_like(inputs[self.model.main_input_name], dtype=torch.bool)
            mask = reference.bool()
        else:
            batch_size = find_batch_size(inputs)
            mask = torch.ones(batch_size, dtype=torch.bool, device=self.args.device)
        return mask[..., 1:] if self._shift_labels and mask.dim() > 1 else mask

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one optimizer step's micro-batches, counting their positions (all processes)."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples:
            return batch_samples, None
        num_items_in_batch = sum(self._counted_positions(batch).sum().to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items_in_batch = self.accelerator.gather(num_items_in_batch).sum()
        return batch_samples, num_items_in_batch

    def _teacher_logits(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if not self._teacher_prepared:
            self._prepare_teacher()
        keep_labels = self._is_encoder_decoder and "decoder_input_ids" not in inputs  # builds the decoder inputs
        teacher_inputs = {
            key: value
            for key, value in inputs.items()
            if (key != "labels" or keep_labels) and (self._teacher_arguments is None or key in self._teacher_arguments)
        }
        # The student runs under accelerate's autocast (its forward is wrapped at `prepare`); the teacher is never
        # prepared, so it gets the same autocast explicitly.
        with torch.no_grad(), self.accelerator.autocast():
            return _logits_of(self.teacher_model(**teacher_inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``alpha · KD + (1 − alpha) · label loss``, normalised by the counted positions of the optimizer step.

        In training `num_items_in_batch` (from `get_batch_samples`) is the count over all micro-batches of the step
        and all processes; each micro-batch contributes its *sum* divided by it. In evaluation the loss is the
        micro-batch mean, as Trainer reports it.
        """
        alpha = self.args.alpha
        mask = self._counted_positions(inputs)
        labels = inputs.get("labels")
        if labels is None and alpha < 1.0:
            raise ValueError(
                f"alpha={alpha} needs labels for the label loss, but this batch has none. Add a 'labels' column, or set "
                "alpha=1.0 to train on the teacher's soft targets alone."
            )

        student_inputs = dict(inputs)
        external_label_loss = self.label_smoother is not None or self.compute_loss_func is not None
        if external_label_loss or (self._student_arguments is not None and "labels" not in self._student_arguments):
            student_inputs.pop("labels", None)
        outputs = model(**student_inputs)
        student_logits = _logits_of(outputs)

        training = model.training
        run_teacher = alpha > 0 or not training  # alpha=0 trains on labels alone; evaluation still reports agreement
        kd_sum = None
        if run_teacher:
            teacher_logits = self._teacher_logits(inputs)
            kd_student_logits, kd_teacher_logits = student_logits, teacher_logits
            if self._shift_labels:
                kd_student_logits, kd_teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
            if self._kd_vocab_size is not None:
                kd_student_logits = kd_student_logits[..., : self._kd_vocab_size]
                kd_teacher_logits = kd_teacher_logits[..., : self._kd_vocab_size]
            if kd_student_logits.shape != kd_teacher_logits.shape:
                raise ValueError(
                    f"Teacher and student outputs differ: teacher logits {tuple(kd_teacher_logits.shape)}, student "
                    f"logits {tuple(kd_student_logits.shape)} (last axis: num_labels or vocabulary size). Use a teacher "
                    "with the student's label set / tokenizer."
                )
            if mask.shape != kd_student_logits.shape[:-1]:
                raise ValueError(
                    f"Labels of shape {tuple(mask.shape)} do not match logits of shape {tuple(kd_student_logits.shape)}"
                    " (one label per position expected; -100 marks positions to ignore)."
                )
            per_position = losses.distillation_divergence(
                kd_student_logits,
                kd_teacher_logits,
                temperature=self.args.temperature,
                loss_type=self.args.distillation_loss,
                jsd_beta=self.args.jsd_beta,
            )
            kd_sum = losses.masked_sum(per_position, mask)
            self._teacher_nonfinite |= ~torch.isfinite(kd_teacher_logits).all()
            agree = losses.agreement_count(kd_student_logits.detach(), kd_teacher_logits, mask)

        label_sum = None
        count = mask.sum()
        if alpha < 1.0:
            label_mean = self._label_loss(outputs, student_logits, labels)
            label_sum = label_mean * count  # the student's loss is a mean over exactly these positions

        stats = self._train_stats if training else self._eval_stats
        stats.add(
            count.device,
            kd_sum=kd_sum if kd_sum is not None else 0.0,
            kd_count=count if kd_sum is not None else 0.0,
            ce_sum=label_sum if label_sum is not None else 0.0,
            ce_count=count if label_sum is not None else 0.0,
            agree=agree if run_teacher else 0.0,
        )

        if alpha == 0.0:
            # Bit-identical to Trainer: the student's own loss, times a scale that is exactly 1 without accumulation.
            loss = label_mean
        elif alpha == 1.0:
            loss = kd_sum / count.clamp(min=1)
        else:
            loss = (alpha * kd_sum + (1.0 - alpha) * label_sum) / count.clamp(min=1)

        if training and num_items_in_batch is not None:
            # From this micro-batch's mean to its share of the step's mean. The ratio is formed first so it is exactly
            # 1.0 when the step is one micro-batch on one process.
            loss = loss * (count / num_items_in_batch)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients
        return (loss, outputs) if return_outputs else loss

    def _label_loss(self, outputs, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The student's ordinary loss at T = 1, as a mean over its counted positions."""
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels, shift_labels=self._shift_labels)
        if isinstance(outputs, Mapping) and outputs.get("loss") is not None:
            return outputs["loss"]
        if self._shift_labels:
            student_logits, labels = losses.shift_for_causal_lm(student_logits, labels)
        return losses.label_cross_entropy(student_logits, labels)

    # ---- checks and reporting ----

    def _raise_if_teacher_nonfinite(self, where: str) -> None:
        if bool(self._teacher_nonfinite):
            raise ValueError(
                f"The teacher produced NaN or inf logits {where}. Check the teacher's weights and dtype (fp16 overflows "
                "are common: load it in bfloat16 or float32 via `teacher_model_init_kwargs`) and the inputs of that step."
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Trainer reads this loss on the host right after (its `logging_nan_inf_filter` check, on by default), so looking
        # at it here adds no device sync; without that filter the teacher is checked at the next log instead.
        if self.args.logging_nan_inf_filter and not torch.isfinite(loss):
            self._raise_if_teacher_nonfinite(f"at optimizer step {self.state.global_step + 1} (before its update)")
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry `eval_loss`)
            self._raise_if_teacher_nonfinite(f"by optimizer step {self.state.global_step}")
            logs.update(self._train_stats.pop_means(self.accelerator))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_stats = _DistillationStats()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        self._raise_if_teacher_nonfinite(f"during {description.lower()}")
        output.metrics.update(self._eval_stats.pop_means(self.accelerator, prefix=f"{metric_key_prefix}_"))
        return output

    # ---- Hub ----

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, teacher_eval_results=None):
        """`Trainer.create_model_card`, writing the distillation card (`hf_distill.model_card`): teacher lineage, loss
        settings, student vs teacher results. `teacher_eval_results` (the teacher's `eval_*` metrics on the eval set)
        spares evaluating the teacher; `finetuned_from` is the student's starting checkpoint, never the teacher."""
        write_distillation_model_card(
            self, language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            teacher_eval_results=teacher_eval_results,
        )

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, private=None,
                    **kwargs):
        """`Trainer.push_to_hub` (the student, its config, card and processor; never the teacher). A failed upload
        raises `hf_distill.hub.PushToHubError` and leaves the trained student saved in `output_dir`."""
        with push_errors_explained(self):
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)


def _deepspeed_inference_engine(model: nn.Module, accelerator) -> nn.Module:
    """Wrap the frozen teacher in a DeepSpeed inference engine sharing the student's ZeRO config (TRL's approach).

    UNVERIFIED until a multi-GPU DeepSpeed run. Under ZeRO-3 the teacher is partitioned like the student; other stages
    keep a full copy per GPU (stage 0). No optimizer is built for it.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if stage == 3 and hidden_size is not None:
        # "auto" values are filled for the student by Trainer; give the teacher concrete ones from its own width.
        config["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            }
        )
    if stage != 3:
        config.setdefault("zero_optimization", {})["stage"] = 0
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
