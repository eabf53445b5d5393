"""The model card of a distilled student: how it was made, and how it compares with its teacher.

`DistillationTrainer.create_model_card` (and so `push_to_hub`) writes it to ``output_dir/README.md``, in three steps:

1. `distillation_card_data` reads what the card says from the trainer into a `DistillationCardData` of plain values:
   the teacher's lineage, both models' sizes, the loss settings, student and teacher results, data, hyperparameters;
2. `render_distillation_model_card` turns that data alone into a `huggingface_hub.ModelCard`, filling the template
   ``model_cards/distillation_model_card.md`` (shipped inside the package) — no trainer needed, so a card can be
   rendered again, or from data gathered elsewhere;
3. `write_distillation_model_card` writes it, on the main process, keeping the tags of a README already there.

The card holds:

* the teacher — Hub id (or local directory name), commit hash when it was loaded from the Hub, architecture — and
  both models' parameter counts and the compression ratio;
* the loss: ``distillation_loss`` (its formula and description from the divergence registry,
  `hf_distill.get_distillation_loss`), ``temperature``, ``alpha`` and the divergence's options (``jsd_beta``);
* student and teacher results side by side on the same evaluation set, every ``eval_*`` metric, computed by the same
  `DistillationTrainer.evaluate` code (`DistillationTrainer.evaluate_teacher` for the teacher);
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
      initialized_from_teacher_layers: [0, 2, 4, 7, 9, 11]   # only for a student made by init_student_from_teacher

Why not ``base_model``: on the Hub, ``base_model`` declares that *this model's weights derive from* that model
(fine-tune, adapter, merge, quantization) and puts the model in the base model's model tree. A distilled student's
weights do not derive from the teacher's — the teacher only supplied training targets — so listing the teacher there
would misstate the lineage (and the Hub would list the student as a fine-tune of its teacher). ``base_model`` keeps its
meaning: the checkpoint the *student* was initialised from, if any (as `Trainer`'s card infers it). A student made by
`hf_distill.init_student_from_teacher` (DistilBERT's initialisation) is such a case: its weights *are* the teacher's,
minus the dropped layers, so the teacher (its Hub id, recorded in the student's ``config.distillation_init``) is its
``base_model``, and ``initialized_from_teacher_layers`` lists the kept layers.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from torch import nn
from transformers.modelcard import TrainingSummary, make_markdown_table

from . import __version__
from .divergences import DIVERGENCE_OPTIONS, get_distillation_loss
from .evaluation import EVAL_TIMING_KEYS, evaluate_on_eval_set
from .teachers import EnsembleTeacher, ensemble_members


if TYPE_CHECKING:
    from .trainer import DistillationTrainer


TEMPLATE_PATH = importlib.resources.files("hf_distill") / "model_cards" / "distillation_model_card.md"
DISTILLATION_TAGS = ("knowledge-distillation", "hf-distill")
# How the loss table names a divergence option (`hf_distill.divergences.DIVERGENCE_OPTIONS`); others by their name.
_OPTION_LABELS = {"jsd_beta": "jsd_beta (β)"}


@dataclasses.dataclass
class DistillationCardData:
    """Everything the distillation card says, as plain values (`dataclasses.asdict` gives a JSON-like dict).

    `distillation_card_data` fills it from a trainer; `render_distillation_model_card` renders it without one.

    Attributes:
        model_name: the student's name (the card's title).
        lineage: the teacher, as `describe_teacher` returns it (``teacher_architecture`` at least), and
            ``initialized_from_teacher_layers`` for a student made by `hf_distill.init_student_from_teacher`.
        loss_settings: ``loss``, ``temperature``, ``alpha``, the divergence's options (``jsd_beta``), schedules
            (``temperature_schedule``/``temperature_end``, same for alpha), ``ensemble_reduction``, ``teacher_top_k``
            (and ``teacher_top_k_tail``); the card's metadata and hyperparameters list them all.
        loss_formula, loss_description: the divergence's (`hf_distill.Divergence.formula` and ``.description``).
        student_architecture: the student's class name.
        student_parameters, teacher_parameters: parameter counts (None when unknown: a teacher known by its outputs).
        metadata: the card's metadata as `transformers.modelcard.TrainingSummary.create_metadata` builds it (tags,
            datasets, model-index...); the ``distillation:`` key is added when rendering.
        base_model: the checkpoint the student was initialised from, if any (the teacher, for a student made by
            `hf_distill.init_student_from_teacher` from a Hub teacher).
        task: the task's name, when a single one is known.
        train_data, eval_data: one dict per dataset: ``key`` (its name in a dict of datasets, else None), ``name``,
            ``split``, ``num_examples`` (None when streamed) and ``columns``.
        student_results, teacher_results: ``eval_*`` metrics, as `evaluate()` names them.
        results_source: where the results come from, or why there are none.
        hyperparameters: the training hyperparameters, as `Trainer`'s card lists them (the loss settings are added).
        training_results: the rows of the training-results table (one dict per logged evaluation).
        framework_versions: {library: version}.
        hf_distill_version: the version that trained the student.
    """

    model_name: str
    lineage: dict[str, Any]
    loss_settings: dict[str, Any]
    loss_formula: str
    loss_description: str
    student_architecture: str
    student_parameters: int | None = None
    teacher_parameters: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    base_model: str | None = None
    task: str | None = None
    train_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    student_results: dict[str, float] = dataclasses.field(default_factory=dict)
    teacher_results: dict[str, float] = dataclasses.field(default_factory=dict)
    results_source: str = "no evaluation set"
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    training_results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    framework_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    hf_distill_version: str = __version__


# ---- collecting the card's data from a trainer ----


def count_parameters(model: nn.Module | None) -> int | None:
    """Number of parameters, each shared (tied) tensor counted once; None for a teacher known only by its outputs."""
    return None if model is None else sum(parameter.numel() for parameter in model.parameters())


def _cached_commit(repo_id: str, from_pretrained_kwargs: Mapping[str, Any]) -> str | None:
    """The commit `repo_id` was loaded at, read offline from the local Hub cache, or None.

    Loading resolves the requested revision (default: main) to a commit, records that in the cache's ``refs/`` and
    reads the files from ``snapshots/<commit>/`` — so the snapshot holding the config names the commit.
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


def _local_name(path: str) -> str:
    # The last component only: the card is published, and a full path may say something about the author's machine.
    return os.path.basename(os.path.normpath(path))


def _with_members(lineage: dict[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
    """`lineage` of a teacher made of `members`: named by their names joined with " + ", listed when several."""
    names = [member.get("teacher", member.get("teacher_architecture", "?")) for member in members]
    if names:
        lineage["teacher"] = " + ".join(names)
    if len(members) > 1:
        lineage["teachers"] = members
    return lineage


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
    metadata, with ``teacher_source: cached outputs`` (``imported log-probabilities`` for `import_teacher_logprobs`,
    unnamed unless a ``teacher_name`` was given there). A local path is reduced to its last component.
    """
    if teacher is None:
        cached = (cache_metadata or {}).get("teachers", [])
        members = [{"teacher": _local_name(t["name"])} for t in cached if t.get("name")]
        source = "cached outputs"
        if (cache_metadata or {}).get("origin") == "import_teacher_logprobs":
            source = "imported log-probabilities"
        lineage = {"teacher_source": source, "teacher_architecture": f"unknown ({source})"}
        return _with_members(lineage, members)
    if isinstance(teacher, EnsembleTeacher):
        members = [describe_teacher(member, teacher_model_init_kwargs) for member in ensemble_members(teacher)]
        architectures = ", ".join(member["teacher_architecture"] for member in members)
        return _with_members({"teacher_architecture": f"ensemble of {len(members)}: {architectures}"}, members)

    config = getattr(teacher, "config", None)
    name_or_path = getattr(config, "name_or_path", None) or getattr(teacher, "name_or_path", None) or ""
    lineage: dict[str, Any] = {}
    if name_or_path and os.path.isdir(name_or_path):
        lineage.update(teacher=_local_name(name_or_path), teacher_source="local")
    elif name_or_path:
        lineage["teacher"] = name_or_path
        revision = _cached_commit(name_or_path, teacher_model_init_kwargs or {})
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
                    if key.startswith("eval_") and not key.endswith(EVAL_TIMING_KEYS)
                }
            )
    return results, step


def student_and_teacher_results(
    trainer: DistillationTrainer, teacher_eval_results: Mapping[str, float] | None = None
) -> tuple[dict[str, float], dict[str, float], str]:
    """Student and teacher ``eval_*`` metrics on the trainer's evaluation set, and a note on where they come from.

    Student: its latest evaluation in `trainer.state.log_history` when that was at the final step; otherwise (never
    evaluated, or trained further since) it is evaluated now, in single-process runs. Teacher: `teacher_eval_results`
    when given (keys as `evaluate()` returns them), otherwise `trainer.evaluate_teacher()` (evaluated once per
    evaluation set, then cached). Both empty when the trainer has no evaluation set.
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
        teacher_results = trainer.evaluate_teacher()
        source = "`DistillationTrainer.evaluate`, with the teacher in the student's place for its column"
    return student_results, teacher_results, source


def _loss_settings(args, teacher: nn.Module | None, cache_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The distillation settings the card records: the loss, T and alpha (their start values, then how a schedule
    moved them), the divergence's options, and how an ensemble's or a cache's teacher outputs were combined."""
    settings: dict[str, Any] = {"loss": args.distillation_loss, "temperature": args.temperature, "alpha": args.alpha}
    settings.update(
        {option: getattr(args, option) for option in get_distillation_loss(args.distillation_loss).options}
    )
    for name in ("temperature", "alpha"):
        if getattr(args, f"{name}_schedule") != "constant":
            settings[f"{name}_schedule"] = getattr(args, f"{name}_schedule")
            settings[f"{name}_end"] = getattr(args, f"{name}_end")
    if getattr(args, "lmbda", 0.0) > 0 or getattr(args, "seq_kd", False):  # generated completions (docs/on_policy.md)
        settings.update(lmbda=args.lmbda, seq_kd=args.seq_kd, max_new_tokens=args.max_new_tokens)
    if isinstance(teacher, EnsembleTeacher) or len((cache_metadata or {}).get("teachers", [])) > 1:
        settings["ensemble_reduction"] = args.ensemble_reduction
    if cache_metadata and cache_metadata.get("top_k"):
        settings["teacher_top_k"] = cache_metadata["top_k"]
        if cache_metadata.get("top_k_tail"):
            settings["teacher_top_k_tail"] = True  # the KD term's k + 1 categories: the top k and a rest bucket
    return settings


def _intermediate_matches(trainer: DistillationTrainer) -> dict[str, Any]:
    """``{"intermediate_matches": [...]}``, the run's expanded layer matches (presets resolved), when it has any."""
    matcher = getattr(trainer, "_intermediate", None)
    return {"intermediate_matches": matcher.describe()} if matcher is not None else {}


def _dataset_entry(dataset: Any, name: str | None, key: str | None = None) -> dict[str, Any]:
    """A dataset as plain values (see `DistillationCardData.train_data`)."""
    try:
        num_examples = len(dataset)
    except TypeError:  # an iterable dataset
        num_examples = None
    split = getattr(dataset, "split", None)
    return {
        "key": key,
        "name": name,
        "split": None if split is None else str(split),
        "num_examples": num_examples,
        "columns": list(getattr(dataset, "column_names", None) or []),
    }


def _dataset_entries(dataset: Any, name: str | None) -> list[dict[str, Any]]:
    """One `_dataset_entry` per dataset: none for no dataset, one per entry of a dict of datasets."""
    if dataset is None:
        return []
    if isinstance(dataset, Mapping):
        return [_dataset_entry(value, None, key) for key, value in dataset.items() if value is not None]
    return [_dataset_entry(dataset, name)]


def _framework_versions() -> dict[str, str]:
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
    return versions


def _initialized_from_teacher(student: nn.Module) -> dict[str, Any] | None:
    """The record `hf_distill.init_student_from_teacher` leaves on the student's config, if any."""
    record = getattr(getattr(student, "config", None), "distillation_init", None)
    return record if isinstance(record, Mapping) else None


def _student_base_model(student: nn.Module) -> str:
    """The Hub checkpoint the student was initialised from ('' if built from a config, or loaded from disk), as
    `TrainingSummary.from_trainer` infers `finetuned_from` — done here because it assumes a `config` — or, for a
    student made by `init_student_from_teacher` from a Hub teacher, that teacher."""
    name_or_path = getattr(getattr(student, "config", None), "name_or_path", "") or ""
    if name_or_path and not os.path.isdir(name_or_path):
        return name_or_path
    record = _initialized_from_teacher(student) or {}
    return record.get("teacher", "") if "teacher_source" not in record else ""  # a local or unnamed teacher: none


def _training_summary(
    trainer: DistillationTrainer,
    student: nn.Module,
    student_results: Mapping[str, float],
    tags: str | list[str] | None = None,
    finetuned_from: str | None = None,
    **kwargs,
) -> TrainingSummary:
    """`Trainer`'s own card summary (task, datasets, hyperparameters, training results, metadata), with the
    distillation tags, and a model-index of the student's final results. `finetuned_from` is given explicitly (""
    for none) for a student that may not be a `PreTrainedModel`: its inference assumes a `config`."""
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    summary = TrainingSummary.from_trainer(
        trainer,
        tags=tags + [tag for tag in DISTILLATION_TAGS if tag not in tags],
        finetuned_from=finetuned_from if finetuned_from is not None else _student_base_model(student),
        **kwargs,
    )
    # `from_trainer` records a dataset's config and split even when it has none (as "None"); keep only real ones.
    summary.dataset_metadata = [
        {key: value for key, value in entry.items() if value not in (None, "None")}
        for entry in summary.dataset_metadata or []
    ] or None
    # The model-index reports the student's final results, named as Trainer names them ("eval_accuracy" -> "Accuracy").
    summary.eval_results = {
        " ".join(part.capitalize() for part in key.removeprefix("eval_").split("_")): value
        for key, value in student_results.items()
    } or None
    return summary


def distillation_card_data(
    trainer: DistillationTrainer,
    *,
    teacher_eval_results: Mapping[str, float] | None = None,
    **create_model_card_kwargs,
) -> DistillationCardData:
    """What the distillation card of `trainer`'s student says, read from the trainer (evaluating the teacher, and the
    student when its latest evaluation predates its final weights).

    Args:
        trainer: the `DistillationTrainer`.
        teacher_eval_results: the teacher's ``eval_*`` metrics on the trainer's evaluation set, to skip evaluating it
            (e.g. in a distributed run, where the card is built on one process).
        create_model_card_kwargs: the other arguments of `Trainer.create_model_card` (``language``, ``license``,
            ``tags``, ``model_name``, ``finetuned_from``, ``tasks``, ``dataset_tags``, ``dataset``, ``dataset_args``);
            ``finetuned_from`` is the checkpoint the *student* started from, the card's ``base_model``, never the
            teacher.
    """
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher, args, cache_metadata = trainer.teacher_model, trainer.args, trainer.teacher_cache_metadata
    student_results, teacher_results, results_source = student_and_teacher_results(trainer, teacher_eval_results)
    summary = _training_summary(trainer, student, student_results, **create_model_card_kwargs)
    divergence = get_distillation_loss(args.distillation_loss)
    dataset_name = summary.dataset if isinstance(summary.dataset, str) else None
    lineage = describe_teacher(teacher, args.teacher_model_init_kwargs, cache_metadata)
    if (record := _initialized_from_teacher(student)) and "kept_layers" in record:
        lineage["initialized_from_teacher_layers"] = list(record["kept_layers"])
    return DistillationCardData(
        model_name=summary.model_name,
        lineage=lineage,
        loss_settings=_loss_settings(args, teacher, cache_metadata) | _intermediate_matches(trainer),
        loss_formula=divergence.formula,
        loss_description=divergence.description,
        student_architecture=type(student).__name__,
        student_parameters=count_parameters(student),
        teacher_parameters=count_parameters(teacher),
        metadata=summary.create_metadata(),
        base_model=summary.finetuned_from or None,
        task=summary.tasks if isinstance(summary.tasks, str) else None,
        train_data=_dataset_entries(trainer.train_dataset, dataset_name),
        eval_data=_dataset_entries(trainer.eval_dataset, dataset_name),
        student_results=student_results,
        teacher_results=teacher_results,
        results_source=results_source,
        hyperparameters=dict(summary.hyperparameters),
        training_results=list(summary.eval_lines or []),
        framework_versions=_framework_versions(),
    )


# ---- rendering: data -> card, no trainer ----


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


def _human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _parameters_cell(count: int | None) -> str:
    return f"{count:,} ({_human_count(count)})" if count else "—"


def _compression_ratio(data: DistillationCardData) -> float | None:
    teacher, student = data.teacher_parameters, data.student_parameters
    return round(teacher / student, 2) if student and teacher else None


def _size_comparison(teacher_parameters: int | None, student_parameters: int | None) -> str:
    if not student_parameters or not teacher_parameters:
        return ""
    if teacher_parameters >= student_parameters:
        return f"It has **{teacher_parameters / student_parameters:.2f}× fewer parameters** than its teacher."
    return f"It has **{student_parameters / teacher_parameters:.2f}× more parameters** than its teacher."


def _describe_datasets(entries: list[Mapping[str, Any]]) -> str:
    """'`name`, split `train`, 1,000 examples, columns ...' per dataset; a dict's entries prefixed by their key."""
    descriptions = []
    for entry in entries:
        parts = [f"`{entry['name']}`"] if entry.get("name") else []
        if entry.get("split") is not None:
            parts.append(f"split `{entry['split']}`")
        num_examples = entry.get("num_examples")
        parts.append("streamed" if num_examples is None else f"{num_examples:,} examples")
        if entry.get("columns"):
            parts.append("columns " + ", ".join(f"`{column}`" for column in entry["columns"]))
        key = entry.get("key")
        descriptions.append(", ".join(parts) if key is None else f"`{key}`: " + ", ".join(parts))
    return "; ".join(descriptions) or "none"


def _eval_set_size(entries: list[Mapping[str, Any]]) -> int | None:
    """The size of a single evaluation set (None for several, or a streamed one)."""
    return entries[0].get("num_examples") if len(entries) == 1 and entries[0].get("key") is None else None


def _distillation_metadata(data: DistillationCardData) -> dict[str, Any]:
    """The ``distillation:`` metadata: lineage, sizes, loss settings; unknown values left out."""
    distillation = {
        **data.lineage,
        "teacher_parameters": data.teacher_parameters,
        "student_parameters": data.student_parameters,
        "compression_ratio": _compression_ratio(data),
        **data.loss_settings,
    }
    return {key: value for key, value in distillation.items() if value is not None}


def _teacher_link(lineage: Mapping[str, Any]) -> str:
    name = lineage.get("teacher")
    if name and lineage.get("teacher_source") != "local":
        return f"the teacher [{name}](https://huggingface.co/{name})"
    if name:
        return f"the teacher `{name}` (a local checkpoint)"
    return f"a `{lineage.get('teacher_architecture', 'unknown')}` teacher"


def _models_table(data: DistillationCardData) -> str:
    lineage, teacher_name = data.lineage, data.lineage.get("teacher")
    models = {
        "Model": (f"`{teacher_name}`" if teacher_name else "—", f"`{data.model_name}`"),
        "Architecture": (lineage.get("teacher_architecture", "—"), data.student_architecture),
        "Revision": (f"`{lineage['teacher_revision']}`" if "teacher_revision" in lineage else "—", "—"),
        "Parameters": (_parameters_cell(data.teacher_parameters), _parameters_cell(data.student_parameters)),
    }
    table = make_markdown_table([{"": key, "Teacher": t, "Student": s} for key, (t, s) in models.items()])
    compression_ratio = _compression_ratio(data)
    if compression_ratio is not None:
        table += f"\nCompression ratio (teacher / student parameters): **{compression_ratio}×**\n"
    return table


def _loss_table(data: DistillationCardData) -> str:
    settings = data.loss_settings
    rows = {
        "distillation_loss": f"`{settings['loss']}`: {data.loss_description}",
        "temperature (T)": settings["temperature"],
        "alpha": f"{settings['alpha']} (label loss weight {round(1 - settings['alpha'], 6)})",
    }
    rows.update({_OPTION_LABELS.get(name, name): settings[name] for name in DIVERGENCE_OPTIONS if name in settings})
    rows.update({name: settings[name] for name in ("lmbda", "seq_kd", "max_new_tokens") if name in settings})
    return make_markdown_table([{"Setting": key, "Value": value} for key, value in rows.items()])


def render_distillation_model_card(data: DistillationCardData | Mapping[str, Any]) -> ModelCard:
    """The card, rendered from `data` alone (a `DistillationCardData` or a dict of its fields) into the template
    `TEMPLATE_PATH`: the same data always gives the same card, whatever trainer (if any) it came from."""
    if isinstance(data, Mapping):
        data = DistillationCardData(**data)
    settings = data.loss_settings
    task = f" ({data.task})" if data.task else ""
    hyperparameters = {**data.hyperparameters, **{f"distillation_{key}": value for key, value in settings.items()}}
    return ModelCard.from_template(
        ModelCardData(**{**data.metadata, "distillation": _distillation_metadata(data)}),
        template_path=str(TEMPLATE_PATH),
        model_name=data.model_name,
        teacher_link=_teacher_link(data.lineage),
        alpha=settings["alpha"],
        size_comparison=_size_comparison(data.teacher_parameters, data.student_parameters),
        hf_distill_version=data.hf_distill_version,
        base_model=data.base_model or None,
        teacher_layers=data.lineage.get("initialized_from_teacher_layers"),
        models_table=_models_table(data),
        objective=f"alpha · {data.loss_formula} + (1 − alpha) · label_loss",
        loss_table=_loss_table(data),
        results_table=_results_table(data.student_results, data.teacher_results) if data.student_results else "",
        results_source=data.results_source,
        eval_set_size=_eval_set_size(data.eval_data),
        intended_use=(
            f"A stand-in for its teacher on the teacher's task{task}, for the same kind of inputs. Compare the two "
            "columns above before replacing the teacher: check that the metrics that matter for your use are close "
            "enough."
        ),
        data_description=(
            f"Transfer (training) set: {_describe_datasets(data.train_data)}.\n\n"
            f"Evaluation set: {_describe_datasets(data.eval_data)}."
        ),
        hyperparameters="The following hyperparameters were used during training:\n\n"
        + "\n".join(f"- {name}: {value}" for name, value in hyperparameters.items()),
        training_results=make_markdown_table(data.training_results) if data.training_results else "",
        framework_versions="\n".join(f"- {name} {version}" for name, version in data.framework_versions.items()),
    )


# ---- building and writing ----


def build_distillation_model_card(trainer: DistillationTrainer, **kwargs) -> ModelCard:
    """The distillation model card of `trainer`'s student, as a `huggingface_hub.ModelCard`: its data collected
    (`distillation_card_data`, which takes the same keyword arguments) and rendered (`render_distillation_model_card`).
    """
    return render_distillation_model_card(distillation_card_data(trainer, **kwargs))


def write_distillation_model_card(trainer: DistillationTrainer, **create_model_card_kwargs) -> ModelCard | None:
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
