"""The model card of a distilled student: how it was made, and how it compares with its teacher.

`DistillationTrainer.create_model_card` (and so `push_to_hub`) writes it to ``output_dir/README.md``. It fills the
template ``model_cards/distillation_model_card.md`` (shipped inside the package) with:

* the teacher — Hub id (or local directory name), commit hash when it was loaded from the Hub, architecture — and
  both models' parameter counts and the compression ratio;
* the loss: ``distillation_loss``, ``temperature``, ``alpha`` and, for ``"jsd"``, ``jsd_beta``;
* student and teacher results side by side on the same evaluation set, every ``eval_*`` metric, computed by the same
  `DistillationTrainer.evaluate` code;
* training data, hyperparameters and results, and framework versions (reusing `transformers.modelcard`, as
  `Trainer.create_model_card` does), the hf-distill version, intended use, and the BibTeX of Hinton et al. (2015).

Metadata, built with `huggingface_hub.ModelCardData`: ``library_name: transformers``; ``tags`` with
``knowledge-distillation`` and ``hf-distill``; ``datasets``, ``metrics`` and a ``model-index`` of the student's results
(as transformers infers them: the model-index needs a Hub dataset id, given as ``dataset_tags=``/``dataset=``, or
read from a `datasets.Dataset` loaded from the Hub); and the lineage under a custom ``distillation:`` key::

    distillation:
      teacher: google-bert/bert-base-uncased      # Hub id, or the directory name of a local teacher
      teacher_revision: 86b5e0934494bd15c9632b12f734a8a67f723594   # commit the teacher was loaded at, when known
      teacher_architecture: BertForSequenceClassification
      teacher_parameters: 109483778
      student_parameters: 4386178
      compression_ratio: 24.96
      loss: kl
      temperature: 2.0
      alpha: 0.9

Why not ``base_model``: on the Hub, ``base_model`` declares that *this model's weights derive from* that model
(fine-tune, adapter, merge, quantization) and puts the model in the base model's model tree. A distilled student's
weights do not derive from the teacher's — the teacher only supplied training targets — so listing the teacher there
would misstate the lineage (and the Hub would list the student as a fine-tune of its teacher). ``base_model`` keeps its
meaning: the checkpoint the *student* was initialised from, if any (as `Trainer`'s card infers it).
"""

from __future__ import annotations

import dataclasses
import contextlib
import importlib.resources
import inspect
import os
import platform
import random
import re
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.modelcard import TrainingSummary, make_markdown_table

from . import __version__
from .models import accepted_arguments


TEMPLATE_PATH = importlib.resources.files("hf_distill") / "model_cards" / "distillation_model_card.md"
DISTILLATION_TAGS = ("knowledge-distillation", "hf-distill")
# Throughput figures of an evaluation, which say nothing about the model.
_EVAL_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")

_OBJECTIVES = {
    "kl": "alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · label_loss",
    "reverse_kl": "alpha · T² · KL(student_T ‖ teacher_T) + (1 − alpha) · label_loss",
    "jsd": "alpha · T² · JSD_β(teacher_T, student_T) + (1 − alpha) · label_loss",
    "mse": "alpha · ½ · mean_i (z̃_i − ṽ_i)² + (1 − alpha) · label_loss",
}
_LOSS_DESCRIPTIONS = {
    "kl": "forward KL(teacher_T ‖ student_T), Hinton et al.'s soft-target loss",
    "reverse_kl": "reverse KL(student_T ‖ teacher_T), mode seeking",
    "jsd": "generalized Jensen–Shannon divergence, mixture m = β·teacher_T + (1 − β)·student_T",
    "mse": "logit matching: mean squared difference of the zero-centred student (z̃) and teacher (ṽ) logits, the "
    "paper's high-temperature limit (does not depend on T)",
}

# Teacher results per trainer and evaluation set: the teacher is frozen, so one evaluation serves every card.
_TEACHER_RESULTS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def count_parameters(model: nn.Module | None) -> int | None:
    """Number of parameters, each shared (tied) tensor counted once; None for a teacher known only by its outputs."""
    return None if model is None else sum(parameter.numel() for parameter in model.parameters())


def _cached_commit(repo_id: str, from_pretrained_kwargs: Mapping[str, Any]) -> str | None:
    """The commit `repo_id` was loaded at, read offline from the local Hub cache, or None.

    Loading resolves the requested revision (default: main) to a commit, records that in the cache's ``refs/`` and
    reads the files from ``snapshots/<commit>/`` — so the snapshot holding the config names the commit. (Older
    transformers versions kept it as ``config._commit_hash``, checked first.)
    """
    try:
        path = try_to_load_from_cache(
            repo_id,
            "config.json",
            cache_dir=from_pretrained_kwargs.get("cache_dir"),
            revision=from_pretrained_kwargs.get("revision"),
        )
    except ValueError:  # not a repo id
        return None
    if not isinstance(path, str):
        return None
    commit = Path(path).parent.name
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def describe_teacher(
    teacher: nn.Module | None,
    teacher_model_init_kwargs: Mapping[str, Any] | None = None,
    cache_metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The teacher's lineage: ``teacher`` (Hub id, or directory name when loaded from disk), ``teacher_source``
    (``"local"`` for the latter), ``teacher_revision`` (the commit it was loaded at, for a Hub teacher), and
    ``teacher_architecture``. Unknown ones are omitted.

    An ensemble is described member by member (``teachers``) and named by its members joined with " + ". A teacher
    known only by cached outputs (`precompute_teacher_logits`, no teacher model given) is named from the cache's
    metadata, with ``teacher_source: cached outputs``.

    A local path is reduced to its last component: the card is published, and the full path says nothing to a reader
    but may say something about the author's machine.
    """
    members = getattr(teacher, "teachers", None)  # an `EnsembleTeacher`
    if teacher is None or members is not None:
        if teacher is None:
            described = [{"teacher": os.path.basename(os.path.normpath(t["name"]))} for t in
                         (cache_metadata or {}).get("teachers", [])]
            lineage = {"teacher_source": "cached outputs", "teacher_architecture": "unknown (cached outputs)"}
        else:
            described = [describe_teacher(member, teacher_model_init_kwargs) for member in members]
            lineage = {"teacher_architecture": f"ensemble of {len(described)}: " + ", ".join(
                d["teacher_architecture"] for d in described)}
        names = [d.get("teacher", d.get("teacher_architecture", "?")) for d in described]
        if names:
            lineage["teacher"] = " + ".join(names)
        if len(described) > 1:
            lineage["teachers"] = described
        return lineage
    config = getattr(teacher, "config", None)
    name_or_path = getattr(config, "_name_or_path", None) or getattr(teacher, "name_or_path", None) or ""
    lineage: dict[str, Any] = {}
    if name_or_path:
        if os.path.isdir(name_or_path):
            lineage["teacher"] = os.path.basename(os.path.normpath(name_or_path))
            lineage["teacher_source"] = "local"
        else:
            lineage["teacher"] = name_or_path
            revision = getattr(config, "_commit_hash", None) or _cached_commit(
                name_or_path, teacher_model_init_kwargs or {}
            )
            if revision:
                lineage["teacher_revision"] = revision
    architectures = getattr(config, "architectures", None)
    lineage["teacher_architecture"] = architectures[0] if architectures else type(teacher).__name__
    return lineage


def latest_eval_results(log_history: list[dict[str, Any]]) -> tuple[dict[str, float], int | None]:
    """The ``eval_*`` metrics of the latest evaluation in `log_history`, and its step.

    Evaluations logged at the same step (several eval sets, or an explicit `evaluate()` after the last periodic one)
    are merged, later entries winning. Throughput figures (runtime, samples/s) are dropped.
    """
    evaluations = [entry for entry in log_history if any(key.startswith("eval_") for key in entry)]
    if not evaluations:
        return {}, None
    step = evaluations[-1].get("step")
    results: dict[str, float] = {}
    for entry in evaluations:
        if entry.get("step") == step:
            results.update(
                {
                    key: value
                    for key, value in entry.items()
                    if key.startswith("eval_") and not key.endswith(_EVAL_TIMING_KEYS)
                }
            )
    return results, step


def _silent_copy_of_args(args, output_dir: str):
    """`trainer.args` for a side evaluation: same batch size, precision, collation and seeds; no logging, reporting,
    saving or pushing, so it leaves no trace in the trainer's state, callbacks or `output_dir`."""
    return dataclasses.replace(
        args,
        output_dir=output_dir,
        report_to="none",
        push_to_hub=False,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=True,
    )


class _AsTrainerModel(nn.Module):
    """A plain-module teacher seen as a model `Trainer` can evaluate: its bare logits tensor returned as
    ``{"logits": ...}`` (Trainer's prediction step would slice a bare tensor as if it were a tuple of outputs), and
    only the inputs its `forward` takes passed on (the trainer hands a student every column, labels included)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        accepted = accepted_arguments(model)

        def forward(**inputs):
            if accepted is not None:
                inputs = {key: value for key, value in inputs.items() if key in accepted}
            outputs = model(**inputs)
            return {"logits": outputs} if isinstance(outputs, torch.Tensor) else outputs

        # Trainer keeps the dataset columns that `forward`'s signature names: show it the wrapped model's.
        forward.__signature__ = inspect.signature(model.forward)
        self.forward = forward


@contextlib.contextmanager
def _random_state_preserved():
    """`Trainer.__init__` reseeds Python's, NumPy's and torch's generators (`set_seed(args.seed)`): a card written in
    the middle of a run must not change the run's random stream."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def evaluate_on_eval_set(trainer: Trainer, model: nn.Module) -> dict[str, float]:
    """``evaluate()`` `model` in the place of `trainer`'s student — same evaluation set(s), collator, metrics,
    teacher and evaluation code — without touching `trainer`. Returns the ``eval_*`` metrics, timing dropped.

    Used for the teacher (a `DistillationTrainer` whose student *is* the teacher: every metric, including the
    distillation ones, is computed exactly as for the student) and for a student whose latest evaluation predates its
    final weights.
    """
    eval_datasets = trainer.eval_dataset if isinstance(trainer.eval_dataset, Mapping) else {None: trainer.eval_dataset}
    with tempfile.TemporaryDirectory(prefix="hf-distill-card-eval-") as scratch, _random_state_preserved():
        side_trainer = type(trainer)(
            model=model if isinstance(model, PreTrainedModel) else _AsTrainerModel(model),
            teacher_model=trainer.teacher_model,
            args=_silent_copy_of_args(trainer.args, scratch),
            data_collator=trainer.data_collator,
            processing_class=trainer.processing_class,
            compute_metrics=trainer.compute_metrics,
            preprocess_logits_for_metrics=trainer.preprocess_logits_for_metrics,
            compute_loss_func=trainer.compute_loss_func,
        )
        # Its default callbacks would print this side evaluation's metrics as if they were the run's.
        side_trainer.callback_handler.callbacks = []
        # Trainer infers label names from the model's `forward`; keep the student's so both are scored on the same.
        side_trainer.label_names = trainer.label_names
        results = {}
        for name, dataset in eval_datasets.items():
            prefix = "eval" if name is None else f"eval_{name}"
            results.update(side_trainer.evaluate(dataset, metric_key_prefix=prefix))
    return {key: value for key, value in results.items() if not key.endswith(_EVAL_TIMING_KEYS) and key != "epoch"}


def student_and_teacher_results(
    trainer: Trainer, teacher_eval_results: Mapping[str, float] | None = None
) -> tuple[dict[str, float], dict[str, float], str]:
    """Student and teacher ``eval_*`` metrics on the trainer's evaluation set, and a note on where they come from.

    Student: its latest evaluation in `trainer.state.log_history` when that was at the final step; otherwise (never
    evaluated, or trained further since) it is evaluated now, in single-process runs. Teacher: `teacher_eval_results` when given (keys as
    `evaluate()` returns them), otherwise evaluated once per trainer and evaluation set and cached. Both empty when
    the trainer has no evaluation set.
    """
    if trainer.eval_dataset is None:
        return {}, {}, "no evaluation set"
    # Cards are written on process zero alone: a side evaluation there would wait forever for the other processes,
    # and would set up DeepSpeed/FSDP a second time.
    can_evaluate = trainer.args.world_size == 1 and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
    student_results, step = latest_eval_results(trainer.state.log_history)
    if step != trainer.state.global_step or not student_results:
        if can_evaluate:
            student_results = evaluate_on_eval_set(trainer, trainer.accelerator.unwrap_model(trainer.model))
        else:
            student_results = {}
    if teacher_eval_results is not None:
        teacher_results = dict(teacher_eval_results)
        source = "the student by `DistillationTrainer.evaluate`, the teacher's results given by the user"
    elif trainer.teacher_model is None:
        teacher_results = {}
        source = "the teacher is known only by its cached outputs; pass `teacher_eval_results` for its column"
    elif not can_evaluate:
        teacher_results = {}
        source = "the teacher is not evaluated in distributed or DeepSpeed/FSDP runs; pass `teacher_eval_results`"
    else:
        cache = _TEACHER_RESULTS_CACHE.setdefault(trainer, {})
        key = id(trainer.eval_dataset)
        if key not in cache:
            cache[key] = evaluate_on_eval_set(trainer, trainer.teacher_model)
        teacher_results = cache[key]
        source = "`DistillationTrainer.evaluate`, with the teacher in the student's place for its column"
    return student_results, teacher_results, source


def _format_metric(value: Any) -> str:
    # Significant digits, not decimals: a KD loss of 3e-5 must not print as 0.0000.
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _results_table(student: Mapping[str, float], teacher: Mapping[str, float]) -> str:
    names = list(student) + [name for name in teacher if name not in student]
    rows = [
        {
            "Metric": name,
            "Student": _format_metric(student[name]) if name in student else "—",
            "Teacher": _format_metric(teacher[name]) if name in teacher else "—",
        }
        for name in names
    ]
    return make_markdown_table(rows)


def _key_value_table(header: tuple[str, str], items: Mapping[str, Any]) -> str:
    return make_markdown_table([{header[0]: key, header[1]: value} for key, value in items.items()])


def _human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _size_comparison(teacher_parameters: int, student_parameters: int) -> str:
    if not student_parameters or not teacher_parameters:
        return ""
    if teacher_parameters >= student_parameters:
        return f"It has **{teacher_parameters / student_parameters:.2f}× fewer parameters** than its teacher."
    return f"It has **{student_parameters / teacher_parameters:.2f}× more parameters** than its teacher."


def _describe_dataset(dataset: Any, name: str | None) -> str:
    if dataset is None:
        return "none"
    if isinstance(dataset, Mapping):
        return "; ".join(f"`{key}`: {_describe_dataset(value, None)}" for key, value in dataset.items())
    parts = [f"`{name}`"] if name else []
    split = getattr(dataset, "split", None)
    if split is not None:
        parts.append(f"split `{split}`")
    try:
        parts.append(f"{len(dataset):,} examples")
    except TypeError:  # an iterable dataset
        parts.append("streamed")
    columns = getattr(dataset, "column_names", None)
    if columns:
        parts.append("columns " + ", ".join(f"`{column}`" for column in columns))
    return ", ".join(parts)


def _framework_versions() -> str:
    import accelerate
    import huggingface_hub
    import torch
    import transformers

    versions = {
        "hf-distill": __version__,
        "Transformers": transformers.__version__,
        "PyTorch": torch.__version__,
        "Accelerate": accelerate.__version__,
        "huggingface_hub": huggingface_hub.__version__,
    }
    try:
        import datasets

        versions["Datasets"] = datasets.__version__
    except ImportError:
        pass
    versions["Python"] = platform.python_version()
    return "\n".join(f"- {name} {version}" for name, version in versions.items())


def _student_base_model(student: nn.Module) -> str:
    """The Hub checkpoint the student was initialised from ('' if built from a config, or loaded from disk), as
    `TrainingSummary.from_trainer` infers `finetuned_from` — done here because it assumes a `config`."""
    name_or_path = getattr(getattr(student, "config", None), "_name_or_path", "") or ""
    return "" if os.path.isdir(name_or_path) else name_or_path


def build_distillation_model_card(
    trainer: Trainer,
    *,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    teacher_eval_results: Mapping[str, float] | None = None,
) -> ModelCard:
    """The distillation model card of `trainer`'s student (a `DistillationTrainer`), as a `huggingface_hub.ModelCard`.

    Arguments are those of `Trainer.create_model_card` (`finetuned_from` is the checkpoint the *student* started from,
    the card's `base_model`; never the teacher), plus `teacher_eval_results`: the teacher's ``eval_*`` metrics on the
    trainer's evaluation set, to skip evaluating it (e.g. in a distributed run, where the card is built on one process).
    """
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.teacher_model
    args = trainer.args
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags += [tag for tag in DISTILLATION_TAGS if tag not in tags]

    # Trainer's own summary gives task, dataset, hyperparameter and training-results inference; `finetuned_from` is
    # passed explicitly ("" for none) because its inference assumes the student has a `config`.
    summary = TrainingSummary.from_trainer(
        trainer,
        language=language,
        license=license,
        tags=tags,
        model_name=model_name,
        finetuned_from=finetuned_from if finetuned_from is not None else _student_base_model(student),
        tasks=tasks,
        dataset_tags=dataset_tags,
        dataset=dataset,
        dataset_args=dataset_args,
    )
    # `from_trainer` records a dataset's config and split even when it has none (as "None"); keep only real ones.
    summary.dataset_metadata = [
        {key: value for key, value in entry.items() if value not in (None, "None")}
        for entry in summary.dataset_metadata or []
    ] or None
    student_results, teacher_results, results_source = student_and_teacher_results(trainer, teacher_eval_results)
    # The model-index reports the student's final results, named as Trainer names them ("eval_accuracy" -> "Accuracy").
    summary.eval_results = {
        " ".join(part.capitalize() for part in key.removeprefix("eval_").split("_")): value
        for key, value in student_results.items()
    } or None

    student_parameters, teacher_parameters = count_parameters(student), count_parameters(teacher)
    compression_ratio = (
        round(teacher_parameters / student_parameters, 2) if student_parameters and teacher_parameters else None
    )
    cache_metadata = getattr(trainer, "teacher_cache_metadata", None)
    lineage = describe_teacher(teacher, args.teacher_model_init_kwargs, cache_metadata)
    loss_settings: dict[str, Any] = {
        "loss": args.distillation_loss,
        "temperature": args.temperature,
        "alpha": args.alpha,
    }
    if args.distillation_loss == "jsd":
        loss_settings["jsd_beta"] = args.jsd_beta
    for name in ("temperature", "alpha"):  # schedules: the start value above, then how it moved
        if getattr(args, f"{name}_schedule") != "constant":
            loss_settings[f"{name}_schedule"] = getattr(args, f"{name}_schedule")
            loss_settings[f"{name}_end"] = getattr(args, f"{name}_end")
    if getattr(teacher, "teachers", None) is not None or len((cache_metadata or {}).get("teachers", [])) > 1:
        loss_settings["ensemble_reduction"] = args.ensemble_reduction
    if cache_metadata and cache_metadata.get("top_k"):
        loss_settings["teacher_top_k"] = cache_metadata["top_k"]
    distillation = {
        **lineage,
        "teacher_parameters": teacher_parameters,
        "student_parameters": student_parameters,
        "compression_ratio": compression_ratio,
        **loss_settings,
    }
    metadata = summary.create_metadata()
    metadata["distillation"] = {key: value for key, value in distillation.items() if value is not None}
    card_data = ModelCardData(**metadata)

    teacher_name = lineage.get("teacher")
    if teacher_name and lineage.get("teacher_source") != "local":
        teacher_link = f"the teacher [{teacher_name}](https://huggingface.co/{teacher_name})"
    elif teacher_name:
        teacher_link = f"the teacher `{teacher_name}` (a local checkpoint)"
    else:
        teacher_link = f"a `{lineage['teacher_architecture']}` teacher"
    models = {
        "Model": (f"`{teacher_name}`" if teacher_name else "—", f"`{summary.model_name}`"),
        "Architecture": (lineage["teacher_architecture"], type(student).__name__),
        "Revision": (f"`{lineage['teacher_revision']}`" if "teacher_revision" in lineage else "—", "—"),
        "Parameters": (
            f"{teacher_parameters:,} ({_human_count(teacher_parameters)})" if teacher_parameters else "—",
            f"{student_parameters:,} ({_human_count(student_parameters)})",
        ),
    }
    models_table = make_markdown_table([{"": key, "Teacher": t, "Student": s} for key, (t, s) in models.items()])
    if compression_ratio is not None:
        models_table += f"\nCompression ratio (teacher / student parameters): **{compression_ratio}×**\n"
    loss_rows = {"distillation_loss": f"`{args.distillation_loss}`: {_LOSS_DESCRIPTIONS[args.distillation_loss]}"}
    loss_rows["temperature (T)"] = args.temperature
    loss_rows["alpha"] = f"{args.alpha} (label loss weight {round(1 - args.alpha, 6)})"
    if args.distillation_loss == "jsd":
        loss_rows["jsd_beta (β)"] = args.jsd_beta

    task = summary.tasks if isinstance(summary.tasks, str) else None
    dataset_name = summary.dataset if isinstance(summary.dataset, str) else None
    hyperparameters = {**summary.hyperparameters, **{f"distillation_{key}": v for key, v in loss_settings.items()}}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=summary.model_name,
        teacher_link=teacher_link,
        alpha=args.alpha,
        size_comparison=_size_comparison(teacher_parameters, student_parameters),
        hf_distill_version=__version__,
        base_model=summary.finetuned_from or None,
        models_table=models_table,
        objective=_OBJECTIVES[args.distillation_loss],
        loss_table=_key_value_table(("Setting", "Value"), loss_rows),
        results_table=_results_table(student_results, teacher_results) if student_results else "",
        results_source=results_source,
        eval_set_size=_len_or_none(trainer.eval_dataset),
        intended_use=(
            f"A stand-in for its teacher on the teacher's task{f' ({task})' if task else ''}, for the same kind of "
            "inputs. Compare the two columns above before replacing the teacher: check that the metrics that matter "
            "for your use are close enough."
        ),
        data_description=(
            f"Transfer (training) set: {_describe_dataset(trainer.train_dataset, dataset_name)}.\n\n"
            f"Evaluation set: {_describe_dataset(trainer.eval_dataset, dataset_name)}."
        ),
        hyperparameters="The following hyperparameters were used during training:\n\n"
        + "\n".join(f"- {name}: {value}" for name, value in hyperparameters.items()),
        training_results=make_markdown_table(summary.eval_lines) if summary.eval_lines else "",
        framework_versions=_framework_versions(),
    )


def _len_or_none(dataset: Any) -> int | None:
    try:
        return len(dataset) if dataset is not None and not isinstance(dataset, Mapping) else None
    except TypeError:
        return None


def write_distillation_model_card(trainer: Trainer, **create_model_card_kwargs) -> ModelCard | None:
    """Build the card (`build_distillation_model_card`) and write it to ``trainer.args.output_dir/README.md``, on the
    main process only, as `Trainer.create_model_card` does: tags of a README already there are kept, and a PEFT
    student's adapter card (written by its `save_pretrained`) gets PEFT's own metadata added back."""
    if not trainer.is_world_process_zero():
        return None
    path = os.path.join(trainer.args.output_dir, "README.md")
    is_peft_card = False
    if os.path.exists(path):
        existing = ModelCard.load(path, ignore_metadata_errors=True).data
        is_peft_card = existing.get("library_name") == "peft"
        tags = create_model_card_kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        create_model_card_kwargs["tags"] = tags + [tag for tag in existing.tags or [] if tag not in tags]
    card = build_distillation_model_card(trainer, **create_model_card_kwargs)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    card.save(path)
    if is_peft_card:  # as Trainer does; not exercised by hf-distill's tests (no peft installed)
        trainer.accelerator.unwrap_model(trainer.model).create_or_update_model_card(trainer.args.output_dir)
        card = ModelCard.load(path)
    return card
