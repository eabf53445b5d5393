"""`DistillationTrainer`: a drop-in `transformers.Trainer` that distils a teacher into the student it trains.

The trainer only wires; the math lives in `hf_distill.losses` (intermediate matches: `hf_distill.intermediate`). Hooks
overridden, smallest first:

* `compute_loss` — runs the teacher, mixes the distillation and label losses, records the unweighted terms;
* `get_batch_samples` — counts the positions of the whole accumulated (and, in DDP, all-process) batch, so the loss is
  normalised once per optimizer step and gradient accumulation is exact;
* `training_step` — names the step when the teacher produced NaN/inf, before that step's update;
* `prediction_step` — evaluation batches without labels still get the KD terms (Trainer computes no loss for them);
* `log` / `evaluation_loop` — add `loss_kd`, `loss_ce`, `teacher_agreement` (and `loss_match_*`) next to Trainer's keys;
* `get_eval_dataloader` — refuses evaluation data that cannot be evaluated (empty, string labels, unverifiable cache);
* `create_optimizer` — adds the learned projections of `intermediate_matches` (`hf_distill.intermediate`);
* `train` — `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint (and restores the projections).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_pt_utils import nested_detach
from transformers.utils import logging

from . import losses
from .arguments import DistillationTrainingArguments
from .checkpoints import last_complete_checkpoint
from .chunked import chunked_distillation_loss
from .data_checks import (
    check_cache_has_metadata,
    check_dataset,
    check_labels_available,
    check_metric_for_best_model,
    eval_datasets,
)
from .distributed import check_teacher_placement, needs_late_placement, place_teacher
from .evaluation import cached_teacher_evaluation
from .fused import fused_linear_distillation_loss, head_reproduces_logits, linear_head
from .hub import push_errors_explained
from .intermediate import PROJECTIONS_FILE, IntermediateMatchesCallback, build_intermediate_matcher
from .model_card import write_distillation_model_card
from .models import accepted_arguments, counted_positions, is_encoder_decoder, is_token_level, logits_of, shifts_labels
from .private_apis import prepare_inputs
from .teacher_cache import (
    TEACHER_COLUMNS,
    TEACHER_LOGITS,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
    TEACHER_TOPK_TAIL,
    TeacherColumnsCollator,
    check_cache_fits_divergence,
    check_cache_matches_run,
    read_cache_metadata,
)
from .teachers import (
    EnsembleTeacher,
    TeacherSignal,
    align_teacher_signal,
    build_teacher,
    check_output_sizes,
    teacher_forward,
    teacher_last_hidden_state,
)


logger = logging.get_logger(__name__)

# Above this many elements in the token-level KD logits, `kd_chunk_size=None` chunks the loss (the naive loss holds ~5
# float32 copies of them for backward). Measured (`benchmarks/bench_kd_crossover.py`, float32 fwd+bwd, one thread of a
# busy 2-core CPU, two runs, chunked / naive time): 1.0-1.8 up to 4M elements (per-call overhead, small tensors),
# 0.9-1.0 at 6.3M (768 × 8192), 0.6-0.95 at 8.2M-8.3M (1016 × 8192: 0.70-0.87), 0.35 at 16M, 0.25-0.28 from 33M.
CHUNKED_KD_THRESHOLD = 6 << 20
# From this many elements in the student's logits [B, L, V], `kd_fuse_lm_head=None` fuses its output head with the loss
# (`hf_distill.fused`) on training steps. Same script (H = 256, online teacher, KD + label term; fused / logits): 0.8-1.2
# up to 4M (its fixed per-chunk memory then exceeds the logits'), 0.7-1.0 at 6.3M with 0.64× the peak memory,
# 0.65-0.85 from 8M to 65M, the peak memory ≈ 1× at 8M, 0.34× at 33M, 0.15× at 65M.
FUSED_LM_HEAD_THRESHOLD = 6 << 20


class _DistillationStats:
    """Device-side running sums behind `loss_kd`, `loss_ce`, `teacher_agreement` and each intermediate match's
    `loss_match_...` (its sum under its name, over `match_count` positions); read (one sync) when logged."""

    _FIELDS = ("kd_sum", "kd_count", "ce_sum", "ce_count", "agree", "agree_count")

    def __init__(self, match_names: Sequence[str] = ()):
        self.totals: torch.Tensor | None = None
        self.match_names = tuple(match_names)
        self._fields = self._FIELDS + (self.match_names + ("match_count",) if self.match_names else ())

    def add(self, device: torch.device, **values: torch.Tensor | float) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        update = torch.stack(
            [torch.as_tensor(values.get(name, 0.0), dtype=dtype, device=device).detach() for name in self._fields]
        )
        self.totals = update if self.totals is None else self.totals + update

    def pop_means(self, accelerator, prefix: str = "") -> dict[str, float]:
        """Means over everything added since the last call, summed over processes; then reset."""
        totals = self.totals
        self.totals = None
        if accelerator.num_processes > 1:
            # Every process must join the reduction, even one that saw no batch.
            totals = (
                totals
                if totals is not None
                else torch.zeros(len(self._fields), dtype=torch.float64, device=accelerator.device)
            )
            totals = accelerator.reduce(totals, reduction="sum")
        if totals is None:
            return {}
        values = totals.tolist()
        kd_sum, kd_count, ce_sum, ce_count, agree, agree_count = values[: len(self._FIELDS)]
        metrics = {}
        if kd_count > 0:
            metrics[f"{prefix}loss_kd"] = kd_sum / kd_count
        if agree_count > 0:
            metrics[f"{prefix}teacher_agreement"] = agree / agree_count
        if ce_count > 0:
            metrics[f"{prefix}loss_ce"] = ce_sum / ce_count
        if self.match_names and values[-1] > 0:
            for name, match_sum in zip(self.match_names, values[len(self._FIELDS) : -1]):
                metrics[f"{prefix}{name}"] = match_sum / values[-1]
        return metrics


class DistillationTrainer(Trainer):
    """[`~transformers.Trainer`] that trains `model` (the student) to match `teacher_model` (Hinton et al., 2015).

    The loss of each optimizer step is

        alpha * mean_over_counted_positions(T² · D(teacher_T ‖ student_T)) + (1 − alpha) * label_loss

    with `D`, `T` and `alpha` from [`DistillationTrainingArguments`] (T and alpha may follow a schedule) and the label
    loss being the student's own (its `outputs.loss`, Trainer's label smoother when `label_smoothing_factor > 0`, or
    `compute_loss_func`). A counted position is a row of a classifier, or a token whose label is not -100 (causal LMs:
    shifted exactly as their loss). `args.intermediate_matches` adds ``Σ weight · match`` terms over the same positions
    (hidden states / attention maps of chosen layers, `hf_distill.intermediate`).

    Args:
        model: the student, as for `Trainer`.
        teacher_model: a `PreTrainedModel`, a plain `nn.Module` returning logits (or an output with `.logits`), a
            path / Hub id loaded with the `AutoModelFor...` class of the student's task head and
            `args.teacher_model_init_kwargs`, or a list of these (an ensemble, see `args.ensemble_reduction`). May be
            None when the datasets carry teacher outputs from `precompute_teacher_logits`. Its logits must have the
            student's last-axis size, except for causal LMs whose vocabularies are padded past the tokenizer
            (`processing_class`), which are compared on the tokenizer's `len()` real entries.
        args: [`DistillationTrainingArguments`].
        **kwargs: every other `Trainer.__init__` argument, unchanged.

    The teacher is put in eval mode, frozen, moved to the student's device, run under the same autocast as the student,
    never wrapped in DDP, never saved, never given to the optimizer. Batches that carry cached teacher columns use them
    instead of running the teacher.
    """

    # `compute_loss` divides by the counted positions of the whole accumulated batch (`get_batch_samples`), so
    # `training_step` must not divide again by the number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | Sequence[PreTrainedModel | nn.Module | str] | None = None,
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
        self.teacher_cache_metadata = read_cache_metadata(kwargs.get("train_dataset"))
        check_cache_has_metadata(kwargs.get("train_dataset"), "train_dataset")
        if teacher_model is None and self.teacher_cache_metadata is None:
            raise ValueError(
                "DistillationTrainer needs a `teacher_model` (a model, an nn.Module returning logits, a path/Hub id, or a"
                " list of them) or a train_dataset with cached teacher outputs from `precompute_teacher_logits`. For "
                "training on labels alone use transformers.Trainer (or alpha=0)."
            )
        super().__init__(model=model, args=args, **kwargs)

        student = self.accelerator.unwrap_model(self.model)
        self._shift_labels, self._token_level = shifts_labels(student), is_token_level(student)
        self._is_encoder_decoder = is_encoder_decoder(student)
        self._student_arguments = accepted_arguments(student)
        if teacher_model is not None:
            check_teacher_placement(self)
        self._teacher_prepared = not needs_late_placement(self)
        self.teacher_model = build_teacher(
            teacher_model, student, self.args, device=self.args.device if self._teacher_prepared else None
        )
        self._is_ensemble = isinstance(self.teacher_model, EnsembleTeacher)
        self._intermediate = self._build_intermediate_matcher()
        self._teacher_arguments = accepted_arguments(self.teacher_model) if self.teacher_model is not None else None
        tokenizer_size = len(self.processing_class) if hasattr(self.processing_class, "__len__") else None
        self._kd_vocab_size = check_output_sizes(
            student, self.teacher_model, shift_labels=self._shift_labels, tokenizer_size=tokenizer_size
        )
        # The fused lm_head path (`hf_distill.fused`): why it cannot serve this run, and which heads were checked.
        self._fused_obstacle, self._fused_heads_checked = self._fused_lm_head_obstacle(), {}
        check_dataset(self.train_dataset, "train_dataset", self.label_names, self._needs_online_teacher)
        for eval_dataset in eval_datasets(self.eval_dataset):
            check_dataset(eval_dataset, "eval_dataset", self.label_names, self._needs_online_teacher)
        check_labels_available(self.train_dataset, self.args, self.label_names, self.data_collator)
        check_metric_for_best_model(
            self.args, self.eval_dataset, has_teacher=self.teacher_model is not None, label_names=self.label_names
        )
        check_cache_matches_run(self.train_dataset, self.args, self.teacher_model)
        check_cache_fits_divergence(self.train_dataset, self.args, "train_dataset")
        for eval_dataset in eval_datasets(self.eval_dataset):
            check_cache_fits_divergence(eval_dataset, self.args, "eval_dataset")

        # Cached teacher columns are batched by this wrapper, whatever the collator (see `_set_signature_columns_...`).
        if not isinstance(self.data_collator, TeacherColumnsCollator):
            self.data_collator = TeacherColumnsCollator(self.data_collator, token_level=self._token_level)

        self._train_stats = self._new_stats()
        self._eval_stats = self._new_stats()
        # Sticky device-side flags: set when teacher logits held NaN/inf, computed online or read from a cache (which
        # no teacher weights are to blame for); read together, only at points that sync anyway.
        self._teacher_nonfinite = torch.zeros((), dtype=torch.bool, device=self.args.device)
        self._cached_teacher_nonfinite = torch.zeros((), dtype=torch.bool, device=self.args.device)
        # Set by `evaluation_loop`: evaluate() runs the teacher on batches without labels, predict() does not.
        self._distill_unlabeled = False

    # ---- construction helpers ----

    def _build_intermediate_matcher(self):
        """`args.intermediate_matches` resolved against the two models (`hf_distill.intermediate`), or None."""
        if self.args.intermediate_matches is None:
            return None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "`intermediate_matches` are not supported with DeepSpeed or FSDP (their learned projections live "
                "outside the wrapped student and its optimizer). Train with DDP or on one device, or drop them."
            )
        student = self.accelerator.unwrap_model(self.model)
        matcher = build_intermediate_matcher(self.args.intermediate_matches, student, self.teacher_model)
        matcher.to(self.args.device)
        self.add_callback(IntermediateMatchesCallback(matcher))
        return matcher

    @property
    def _needs_online_teacher(self) -> str | None:
        """Why cached teacher columns cannot serve this run, or None."""
        if self._intermediate is None:
            return None
        return "`intermediate_matches` need the teacher's hidden states, which only an online teacher forward gives"

    def _new_stats(self) -> _DistillationStats:
        return _DistillationStats(self._intermediate.names if self._intermediate is not None else ())

    def _set_signature_columns_if_needed(self):  # a private Trainer hook: see `hf_distill.private_apis`
        """Trainer's columns to keep (the student's inputs and labels), plus the cached teacher columns."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in TEACHER_COLUMNS if c not in self._signature_columns]

    # ---- schedules ----

    def current_temperature_and_alpha(self, step: int | None = None) -> tuple[float, float]:
        """T and alpha at optimizer step `step` (default: the current one), from their schedules (constant by default).

        Derived from the step alone, so a run resumed from a checkpoint continues the schedule exactly.
        """
        args = self.args
        step = self.state.global_step if step is None else step
        progress = step / self.state.max_steps if self.state.max_steps else 0.0
        return (
            losses.scheduled_value(args.temperature, args.temperature_end, args.temperature_schedule, progress),
            losses.scheduled_value(args.alpha, args.alpha_end, args.alpha_schedule, progress),
        )

    # ---- the loss ----

    def _counted_positions(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return counted_positions(
            inputs,
            token_level=self._token_level,
            shift=self._shift_labels,
            main_input_name=getattr(self.model, "main_input_name", "input_ids"),
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one optimizer step's micro-batches, counting their positions (all processes)."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples:
            return batch_samples, None
        num_items_in_batch = sum(self._counted_positions(batch).sum().to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items_in_batch = self.accelerator.gather(num_items_in_batch).sum()
        return batch_samples, num_items_in_batch

    def _teacher_logits(self, inputs: Mapping[str, Any], temperature: float) -> torch.Tensor:
        if self.teacher_model is None:
            raise ValueError(
                "This batch carries no cached teacher outputs and no `teacher_model` was given (e.g. an eval_dataset "
                "without `precompute_teacher_logits` columns): pass the teacher, or precompute this dataset too."
            )
        if not self._teacher_prepared:  # DeepSpeed/FSDP: placed at first use, once their configuration is final
            self.teacher_model = place_teacher(self.teacher_model, self)
            self._teacher_prepared = True
        return teacher_forward(
            self.teacher_model,
            inputs,
            accepted=self._teacher_arguments,
            keep_labels=self._is_encoder_decoder and "decoder_input_ids" not in inputs,  # builds the decoder inputs
            temperature=temperature if self._is_ensemble else None,
            autocast=self.accelerator.autocast,
        )

    def _teacher_signal(self, student_logits, inputs, cached, mask, temperature) -> TeacherSignal:
        return align_teacher_signal(
            student_logits,
            mask,
            cached_teacher_outputs=cached.get(TEACHER_LOGITS, cached.get(TEACHER_TOPK_LOGPROBS)),
            cached_top_k_ids=cached.get(TEACHER_TOPK_IDS),
            online_teacher_logits=lambda: self._teacher_logits(inputs, temperature),
            shift_labels=self._shift_labels,
            token_level=self._token_level,
            vocab_size=self._kd_vocab_size,
            cached_top_k_tail=cached.get(TEACHER_TOPK_TAIL),
            temperature=temperature,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``alpha · KD + (1 − alpha) · label loss (+ Σ weight · match)``, normalised by the counted positions of the
        optimizer step.

        In training `num_items_in_batch` (from `get_batch_samples`) is the count over all micro-batches of the step
        and all processes; each micro-batch contributes its *sum* divided by it. In evaluation the loss is the
        micro-batch mean, as Trainer reports it.
        """
        temperature, alpha = self.current_temperature_and_alpha()
        cached = {column: inputs[column] for column in TEACHER_COLUMNS if column in inputs}
        inputs = {key: value for key, value in inputs.items() if key not in TEACHER_COLUMNS}
        mask = self._counted_positions(inputs)
        labels = inputs.get("labels")
        training = model.training
        if labels is None and alpha < 1.0 and training:
            raise ValueError(
                f"alpha={alpha} needs labels for the label loss, but this batch has none. Add a 'labels' column, or set "
                "alpha=1.0 to train on the teacher's soft targets alone."
            )

        # alpha = 0 trains on labels alone (no teacher pass). Evaluation reports both terms whatever alpha; a trainer
        # that has only cached teacher outputs evaluates/predicts on other data without the KD term.
        use_kd = (alpha > 0 or not training) and (training or bool(cached) or self.teacher_model is not None)
        need_label = labels is not None and (alpha < 1.0 or not training or not use_kd)
        if self._fuses_lm_head(mask, training and not return_outputs and use_kd):
            loss = self._fused_loss(model, inputs, cached, mask, labels if need_label else None, temperature, alpha)
            if loss is not None:  # None: a head the fused path cannot reproduce, found on the first batch
                return self._share_of_step(loss, mask.sum(), num_items_in_batch)

        student_inputs = dict(inputs)
        # The student computes its own label loss only when that loss is used (at alpha = 1 in training it would be a
        # wasted cross-entropy over the whole vocabulary), and only if it takes labels at all.
        own_label_loss = need_label and self.label_smoother is None and self.compute_loss_func is None
        if not own_label_loss or (self._student_arguments is not None and "labels" not in self._student_arguments):
            student_inputs.pop("labels", None)
        # Intermediate matches: each model's matched layers are hooked for its one forward (`hf_distill.intermediate`).
        matching = self._intermediate is not None and (use_kd or training)
        with self._capturing(model, "student", matching) as student_states:
            outputs = model(**student_inputs)
        student_logits = logits_of(outputs)

        count = mask.sum()
        stats = {}
        with self._capturing(self.teacher_model, "teacher", matching) as teacher_states:
            if use_kd:
                signal = self._teacher_signal(student_logits, inputs, cached, mask, temperature)
                kd_sum = self._kd_sum(signal.student_logits, signal.teacher_logits, signal.mask, temperature)
                # One float32 reduction instead of an elementwise `isfinite` (NaN/inf anywhere make the sum non-finite).
                nonfinite = ~torch.isfinite(signal.teacher_logits.sum(dtype=torch.float32))
                if cached:
                    self._cached_teacher_nonfinite |= nonfinite
                else:
                    self._teacher_nonfinite |= nonfinite
                stats.update(kd_sum=kd_sum, kd_count=count)
                if not training:  # two argmaxes over [..., V]: an evaluation metric, not paid on every training step
                    stats.update(agree=signal.agreement(), agree_count=count)
            elif matching:  # alpha = 0: the teacher runs for the matches alone
                teacher_logits = self._teacher_logits(inputs, temperature)
                self._teacher_nonfinite |= ~torch.isfinite(teacher_logits.sum(dtype=torch.float32))
        if matching:
            match_sums = self._intermediate.match_sums(
                student_states, teacher_states, mask, inputs.get("attention_mask"), shift=self._shift_labels
            )
            stats.update(zip(self._intermediate.names, match_sums), match_count=count)
        if need_label:
            label_mean = self._label_loss(outputs, student_logits, labels)
            # The student's loss is a mean over exactly these positions. Over none (a micro-batch of SFT rows that are
            # all prompt) it is 0/0 = NaN, and the sum is exactly 0: never NaN · 0.
            label_sum = torch.where(count > 0, label_mean * count, 0.0)
            stats.update(ce_sum=label_sum, ce_count=count)
        (self._train_stats if training else self._eval_stats).add(count.device, **stats)

        if not use_kd:
            # alpha = 0: the student's own loss (times a scale that is exactly 1 without accumulation), so Trainer bit
            # for bit for classifiers; causal LMs: the mean over predicted tokens (docs/losses.md). Evaluation
            # without a teacher: the label loss alone.
            loss = label_mean if need_label else student_logits.new_zeros(())
        elif alpha == 1.0 or not need_label:  # evaluation without labels: the KD term alone
            loss = kd_sum / count.clamp(min=1)
        else:
            loss = (alpha * kd_sum + (1.0 - alpha) * label_sum) / count.clamp(min=1)
        if matching:  # + Σ weight · match, a mean over the same counted positions
            loss = loss + self._intermediate.weighted_total(match_sums) / count.clamp(min=1)

        if training:
            loss = self._share_of_step(loss, count, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _share_of_step(self, loss, count, num_items_in_batch):
        """A training micro-batch's mean loss over its `count` positions, as its share of the step's mean."""
        if num_items_in_batch is None:
            return loss
        # The ratio is formed first so it is exactly 1.0 when the step is one micro-batch on one process. A micro-batch
        # that counts nothing adds exactly 0 (its label mean is NaN), with a gradient of 0 even when no micro-batch of
        # the step counts anything.
        num_items = torch.as_tensor(num_items_in_batch, device=count.device).clamp(min=1)
        loss = torch.where(count > 0, loss * (count / num_items), 0.0)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients
        return loss

    def _capturing(self, model, role: str, matching: bool):
        """The matched layers of `model` (`role`: "student" or "teacher") captured during the block, or nothing."""
        if not matching:
            return contextlib.nullcontext()
        return self._intermediate.capture(self.accelerator.unwrap_model(model), role)

    def _kd_sum(self, student_logits, teacher_logits, mask, temperature) -> torch.Tensor:
        """``Σ_counted T²·D``: chunked (bounded memory, same value and gradient) for large token-level logits.

        Token level means the student's kind: online ``[B, L', V]`` logits, or the ``[N, V]`` / ``[N, k]`` counted
        positions of a cache alike."""
        chunk_size = self.args.kd_chunk_size
        chunked = (
            chunk_size != 0
            and (student_logits.dim() > 2 or self._token_level and student_logits.dim() == 2)
            and (chunk_size is not None or student_logits.numel() > CHUNKED_KD_THRESHOLD)
        )
        if chunked:
            return chunked_distillation_loss(
                student_logits,
                teacher_logits,
                mask,
                temperature=temperature,
                loss_type=self.args.distillation_loss,
                jsd_beta=self.args.jsd_beta,
                chunk_size=chunk_size,
            )
        per_position = losses.distillation_divergence(
            student_logits,
            teacher_logits,
            temperature=temperature,
            loss_type=self.args.distillation_loss,
            jsd_beta=self.args.jsd_beta,
        )
        return losses.masked_sum(per_position, mask)

    # ---- the fused lm_head path (hf_distill.fused) ----

    def _fused_lm_head_obstacle(self) -> str | None:
        """Why training steps cannot use the fused path, or None; with `kd_fuse_lm_head=True`, raised here."""
        student = self.accelerator.unwrap_model(self.model)
        online = self.teacher_cache_metadata is None  # the training batches run the teacher
        reasons = []
        if not self._shift_labels:
            reasons.append(f"the student ({type(student).__name__}) is not a causal LM")
        if self._intermediate is not None:
            reasons.append("`intermediate_matches` need the student's and teacher's full forward")
        if self.compute_loss_func is not None or self.label_smoother is not None:
            reasons.append("a custom `compute_loss_func` or label smoothing needs the student's logits")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            reasons.append("DeepSpeed/FSDP gather the head's weight only inside the student's forward")
        models = [("student", student)] + ([("teacher", self.teacher_model)] if online else [])
        for role, model in models:
            if isinstance(model, EnsembleTeacher):
                reasons.append("an ensemble teacher's combined logits have no single output head")
                continue
            head = linear_head(model) if self._shift_labels else None
            if isinstance(head, str):
                reasons.append(f"the {role}: {head}")
            if self._shift_labels and "logits_to_keep" not in (accepted_arguments(model) or ()):
                reasons.append(f"the {role}'s forward takes no `logits_to_keep` (it would compute the full logits)")
        obstacle = "; ".join(reasons) or None
        if obstacle is not None and self.args.kd_fuse_lm_head:
            raise ValueError(
                f"`kd_fuse_lm_head=True` cannot apply: {obstacle}. Set kd_fuse_lm_head=None (automatic) or False."
            )
        return obstacle

    def _fuses_lm_head(self, mask: torch.Tensor, kd_training_step: bool) -> bool:
        """Whether this micro-batch's loss takes the fused path: a training step with a KD term, and, in automatic
        mode, student logits of at least `FUSED_LM_HEAD_THRESHOLD` elements."""
        setting = self.args.kd_fuse_lm_head
        if setting is False or not kd_training_step or self._fused_obstacle is not None:
            return False
        if False in self._fused_heads_checked.values():
            return False
        vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        return setting is True or mask.numel() * vocab >= FUSED_LM_HEAD_THRESHOLD

    def _head_checked(self, role: str, model, head, last_hidden, last_logits) -> bool:
        """On the first batch, whether `head` on `hidden_states[-1]` reproduces the model's own (last) logits."""
        if role not in self._fused_heads_checked:
            ok = last_hidden is not None and head_reproduces_logits(head, last_hidden[:, -1:], last_logits)
            self._fused_heads_checked[role] = ok
            if not ok:
                why = (
                    f"the {role}'s output head applied to its `hidden_states[-1]` does not give its logits "
                    f"({type(model).__name__} transforms them in a way `hf_distill.fused` does not know)"
                )
                if self.args.kd_fuse_lm_head:
                    raise ValueError(f"`kd_fuse_lm_head=True` cannot apply: {why}. Set kd_fuse_lm_head=None or False.")
                logger.warning(f"Not using the fused lm_head path: {why}; computing the logits instead.")
        return self._fused_heads_checked[role]

    def _fused_loss(self, model, inputs, cached, mask, labels, temperature, alpha) -> torch.Tensor | None:
        """This micro-batch's mean loss (alpha · KD + (1 − alpha) · CE over its counted positions) from the two models'
        last hidden states and heads, without their logits; records `loss_kd`/`loss_ce` as `compute_loss` does."""
        student_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**student_inputs, output_hidden_states=True, logits_to_keep=1)
        student = self.accelerator.unwrap_model(model)
        head, hidden = linear_head(student), (outputs.hidden_states or [None])[-1]
        if not self._head_checked("student", student, head, hidden, outputs.logits):
            return None
        count = mask.sum()
        if cached:  # the counted positions, in order (`align_teacher_signal` checks the same)
            rows = cached.get(TEACHER_LOGITS, cached.get(TEACHER_TOPK_LOGPROBS)).shape[0]
            if rows != int(count):
                raise ValueError(
                    f"Cached teacher outputs hold {rows} positions for a batch that counts {int(count)}: they were "
                    "computed with other labels/attention masks or for other rows. Recompute them with "
                    "`precompute_teacher_logits` on this dataset."
                )
            teacher = dict(
                teacher_logits=cached.get(TEACHER_LOGITS),
                top_k_ids=cached.get(TEACHER_TOPK_IDS),
                top_k_logprobs=cached.get(TEACHER_TOPK_LOGPROBS) if TEACHER_TOPK_IDS in cached else None,
                top_k_tail=cached.get(TEACHER_TOPK_TAIL),
            )
        else:
            if self.teacher_model is None:
                self._teacher_logits(inputs, temperature)  # raises: no cached outputs and no teacher
            teacher_hidden, teacher_last_logits = teacher_last_hidden_state(
                self.teacher_model, inputs, accepted=self._teacher_arguments, autocast=self.accelerator.autocast
            )
            teacher_head = linear_head(self.teacher_model)
            if not self._head_checked(
                "teacher", self.teacher_model, teacher_head, teacher_hidden, teacher_last_logits
            ):
                return None
            teacher = dict(
                teacher_hidden=teacher_hidden[:, :-1][mask],
                teacher_weight=teacher_head.weight,
                teacher_bias=teacher_head.bias,
                teacher_logit_scale=teacher_head.logit_scale,
                teacher_softcap=teacher_head.softcap,
                vocab_size=self._kd_vocab_size,
            )
        result = fused_linear_distillation_loss(
            hidden[:, :-1][mask],
            head.weight,
            head.bias,
            labels=None if labels is None else labels[:, 1:][mask],
            kd_weight=alpha,
            ce_weight=0.0 if labels is None else 1.0 - alpha,
            temperature=temperature,
            loss_type=self.args.distillation_loss,
            jsd_beta=self.args.jsd_beta,
            student_logit_scale=head.logit_scale,
            student_softcap=head.softcap,
            chunk_size=self.args.kd_chunk_size or None,
            **teacher,
        )
        if cached:
            self._cached_teacher_nonfinite |= result.teacher_nonfinite
        else:
            self._teacher_nonfinite |= result.teacher_nonfinite
        stats = dict(kd_sum=result.kd_sum, kd_count=count)
        if labels is not None:
            stats.update(ce_sum=result.ce_sum, ce_count=count)
        self._train_stats.add(count.device, **stats)
        return result.loss / count.clamp(min=1)

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
        online, cached = torch.stack([self._teacher_nonfinite, self._cached_teacher_nonfinite]).tolist()  # one sync
        problems = []
        if cached:
            problems.append(
                f"The cached teacher outputs (the dataset's `{TEACHER_LOGITS}` or `{TEACHER_TOPK_LOGPROBS}` column) "
                f"hold NaN or inf {where}; no teacher ran for those batches. Recompute the cache with "
                "`precompute_teacher_logits`, which refuses to store non-finite outputs and names the rows."
            )
        if online:
            problems.append(
                f"The teacher produced NaN or inf logits {where}. Check the teacher's weights and dtype (fp16 overflows "
                "are common: load it in bfloat16 or float32 via `teacher_model_init_kwargs`) and the inputs of that step."
            )
        if problems:
            raise ValueError(" ".join(problems))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        where = f"at optimizer step {self.state.global_step + 1} (before its update)"
        if self.args.logging_nan_inf_filter:
            # Trainer reads this loss on the host right after (its NaN filter), so looking at it adds no device sync.
            if not torch.isfinite(loss):
                self._raise_if_teacher_nonfinite(where)
        elif self.accelerator.sync_gradients:
            # Without the filter nothing reads the loss before the update: one sync per optimizer step, on the last
            # micro-batch (Trainer sets `sync_gradients` before each), so no NaN teacher reaches the weights.
            self._raise_if_teacher_nonfinite(where)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's step. Without labels Trainer computes no loss; evaluate() (and any batch with cached teacher
        outputs) still gets the KD terms (`loss`, `loss_kd`, `teacher_agreement`) and the student's predictions."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        cached = any(column in inputs for column in TEACHER_COLUMNS)
        online = self._distill_unlabeled and self.teacher_model is not None
        if has_labels or not self.label_names or not (cached or online):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = prepare_inputs(self, inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        # The predictions exactly as Trainer returns them for a batch without labels.
        if ignore_keys is None:
            config = getattr(self.model, "config", None)
            ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config is not None else []
        logits = tuple(v for k, v in outputs.items() if k not in ignore_keys) if isinstance(outputs, dict) else outputs
        logits = nested_detach(logits)
        return loss, logits[0] if len(logits) == 1 else logits, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry `eval_loss`)
            self._raise_if_teacher_nonfinite(f"by optimizer step {self.state.global_step}")
            logs.update(self._train_stats.pop_means(self.accelerator))
            # The values the last optimizer step was trained with.
            logs["temperature"], logs["alpha"] = self.current_temperature_and_alpha(self.state.global_step - 1)
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_stats = self._new_stats()
        # Batches without labels: evaluate() runs the teacher for the KD terms; predict() runs only the student
        # (unless they carry cached teacher outputs), as Trainer would.
        self._distill_unlabeled = description == "Evaluation"
        empty = ValueError(
            "`eval_dataset` is empty: evaluation saw no rows, so it has no metrics to report. Check the filtering or "
            "streaming that produced it, and pass a dataset with at least one row."
        )
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        except ValueError as error:  # accelerate's dispatcher, on an iterable dataset that yields no batch
            if description == "Evaluation" and "does not contain any data" in str(error):
                raise empty from error
            raise
        finally:
            self._distill_unlabeled = False
        if output.num_samples == 0 and description == "Evaluation":
            raise empty
        self._raise_if_teacher_nonfinite(f"during {description.lower()}")
        output.metrics.update(self._eval_stats.pop_means(self.accelerator, prefix=f"{metric_key_prefix}_"))
        return output

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        check_dataset(
            dataset if dataset is not None else self.eval_dataset,
            "eval_dataset",
            self.label_names,
            self._needs_online_teacher,
        )
        for checked in eval_datasets(dataset if dataset is not None else self.eval_dataset):
            check_cache_fits_divergence(checked, self.args, "eval_dataset")
        return super().get_eval_dataloader(eval_dataset)

    # ---- optimizer and resuming ----

    def create_optimizer(self, model=None):
        """`Trainer.create_optimizer`, plus the learned projections of `intermediate_matches` (their own parameter
        groups, same optimizer and learning-rate schedule as the student)."""
        optimizer = super().create_optimizer(model)
        if self._intermediate is not None:
            self._intermediate.add_to_optimizer(optimizer, self.args.weight_decay)
        return optimizer

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint in
        `output_dir` (one whose `trainer_state.json`, which Trainer writes last, reads back), skipping a save that was
        interrupted, and logs the checkpoints it skipped."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(
                self.args.output_dir,
                # the projections are written after Trainer's files: a checkpoint without them is incomplete too
                also_needs=PROJECTIONS_FILE
                if self._intermediate is not None and len(self._intermediate.projections)
                else None,
            )
        if resume_from_checkpoint and self._intermediate is not None:
            self._intermediate.load(resume_from_checkpoint)  # the projections; Trainer restores their optimizer state
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # ---- Hub ----

    def evaluate_teacher(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        Evaluate the teacher in the student's place, exactly as [`~Trainer.evaluate`] evaluates the student: same
        evaluation set(s), collator, batch size, precision, `compute_metrics` and loss, so the two sets of results can
        be compared key by key (the model card's student-vs-teacher table). The distillation metrics are computed too,
        the teacher against itself: `loss_kd` is 0, `teacher_agreement` 1 and `loss` is `(1 - alpha) * loss_ce`.

        The evaluation runs in a separate trainer: it logs, reports, prints and saves nothing, leaves this trainer's
        state and the run's random number generators untouched, and can be called at any time (also mid-training,
        from a callback). The teacher is frozen, so the results are computed once per evaluation set and metric
        prefix, and returned from a cache afterwards.

        Args:
            eval_dataset (`Dataset`, `dict[str, Dataset]` or `str`, *optional*):
                The evaluation set, as for [`~Trainer.evaluate`]: defaults to `self.eval_dataset`; a dict is evaluated
                set by set with the set's name in the metric prefix; a name picks one of `self.eval_dataset`'s sets.
            metric_key_prefix (`str`, *optional*, defaults to `"eval"`):
                The prefix of the metric names ("eval_accuracy", "eval_loss_kd", ...).

        Returns:
            `dict[str, float]`: the teacher's metrics, named as [`~Trainer.evaluate`] names the student's, without the
            throughput figures (runtime, samples per second), which a cached result would misreport.

        Raises:
            `ValueError`: when the trainer has no teacher model (it learns from cached teacher outputs only), or
            neither `eval_dataset` nor `self.eval_dataset` is set.
        """
        return cached_teacher_evaluation(self, eval_dataset, metric_key_prefix)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        teacher_eval_results=None,
    ):
        """`Trainer.create_model_card`, writing the distillation card (`hf_distill.model_card`): teacher lineage, loss
        settings, student vs teacher results (the teacher's from `evaluate_teacher`, or `teacher_eval_results`, its
        `eval_*` metrics on the eval set, which spares evaluating it); `finetuned_from` is the student's starting
        checkpoint, never the teacher."""
        write_distillation_model_card(
            self,
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
            teacher_eval_results=teacher_eval_results,
        )

    def push_to_hub(
        self, commit_message="End of training", blocking=True, token=None, revision=None, private=None, **kwargs
    ):
        """`Trainer.push_to_hub` (the student, its config, card and processor; never the teacher). A failed upload
        raises `hf_distill.hub.PushToHubError` and leaves the trained student saved in `output_dir`."""
        with push_errors_explained(self):
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
