"""Checks of the data a `DistillationTrainer` is given, run when it is built (and when a new evaluation set arrives),
so that a dataset that cannot work fails with a message naming it and the fix, before any step is spent."""

from __future__ import annotations

from collections.abc import Mapping

from transformers import DataCollatorWithPadding, DefaultDataCollator, default_data_collator

from .teacher_cache import TEACHER_COLUMNS, read_cache_metadata


def eval_datasets(eval_dataset) -> list:
    """The evaluation datasets: one, or each of a dict of them."""
    if eval_dataset is None:
        return []
    return list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset]


def teacher_columns(dataset) -> list[str]:
    columns = getattr(dataset, "column_names", None) or []
    return [column for column in TEACHER_COLUMNS if column in columns]


def check_cache_has_metadata(dataset, name: str) -> None:
    """Cached teacher columns are used only with their metadata: which teacher made them, for which positions."""
    columns = teacher_columns(dataset)
    if columns and read_cache_metadata(dataset) is None:
        raise ValueError(
            f"`{name}` carries cached teacher columns {columns} without their metadata (which teacher made them, for "
            "which positions, top-k), so they cannot be checked against this run. An IterableDataset "
            "(`to_iterable_dataset()`, streaming) or a dataset rebuilt from the columns drops it. Use the "
            "`datasets.Dataset` that `precompute_teacher_logits` returned (`save_to_disk`/`load_from_disk` keep the "
            "metadata), or remove the columns (`dataset.remove_columns(...)`) to run the teacher online."
        )


def _is_string_feature(feature) -> bool:
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return True
    inner = getattr(feature, "feature", None)  # List / Sequence of labels (token level)
    return inner is not None and _is_string_feature(inner)


def holds_strings(dataset, column: str) -> bool:
    """Whether `column` of `dataset` holds strings: from its features, else from its first row."""
    features = getattr(dataset, "features", None)
    if features is not None:
        return column in features and _is_string_feature(features[column])
    try:
        value = dataset[0][column]
    except Exception:  # no such column, an iterable or exotic dataset: the collator will say
        return False
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], str))


def collator_only_batches_columns(collator) -> bool:
    """Whether `collator` is one of Trainer's defaults, which batch the dataset's columns and add none: then a dataset
    without a label column gives batches without labels. Any other collator may make labels (e.g.
    `DataCollatorForLanguageModeling` masks tokens and labels them); batches are then checked one by one."""
    return collator is default_data_collator or isinstance(collator, (DefaultDataCollator, DataCollatorWithPadding))


def check_labels_available(dataset, args, label_names, data_collator=default_data_collator) -> None:
    """With a label loss weight (alpha < 1 at any point of a schedule), the training set must have labels (unless
    the collator may make them, or every micro-batch's completions are generated: lmbda = 1, or seq_kd)."""
    needs_labels = args.alpha < 1.0 or (args.alpha_end is not None and args.alpha_end < 1.0)
    if getattr(args, "lmbda", 0.0) >= 1.0 or getattr(args, "seq_kd", False):
        return  # prompt-only rows: the student's (or the teacher's) completions are the labels
    if not needs_labels or dataset is None or not collator_only_batches_columns(data_collator):
        return
    label_columns = label_columns_of(label_names)
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        try:
            first = dataset[0]
        except Exception:  # iterable or exotic datasets: checked at the first step instead
            return
        columns = list(first.keys()) if isinstance(first, Mapping) else None
    if columns is not None and not label_columns & set(columns):
        raise ValueError(
            f"alpha={args.alpha} gives the label loss a weight of {1 - args.alpha:g}, but the training "
            f"dataset has no label column (columns: {sorted(columns)}). Add labels, or set alpha=1.0 to train on "
            "the teacher's soft targets alone."
        )


def label_columns_of(label_names) -> set[str]:
    """The columns that hold labels: Trainer's `label_names`, plus the names its collators rename to `labels`."""
    return set(label_names) | {"label", "label_ids"}


def check_dataset(dataset, name: str, label_names, needs_online_teacher: str | None = None) -> None:
    """Refuse a dataset that cannot be trained or evaluated on, saying why, before any step is spent on it."""
    if dataset is None:
        return
    try:
        empty = len(dataset) == 0
    except TypeError:  # iterable: an empty evaluation set is reported by `evaluation_loop`
        empty = False
    if empty:
        task = "train" if name == "train_dataset" else "evaluate"
        raise ValueError(
            f"`{name}` is empty (0 rows): there is nothing to {task} on. Check the filtering or `select` that "
            "produced it, and pass a dataset with at least one row."
        )
    for column in sorted(label_columns_of(label_names)):
        if holds_strings(dataset, column):
            raise ValueError(
                f"`{name}`: its label column '{column}' holds strings; the losses need integer class ids (or "
                f"token ids). Encode it first, e.g. `dataset.class_encode_column('{column}')` or a map through "
                "the student's `config.label2id`."
            )
    check_cache_has_metadata(dataset, name)
    if needs_online_teacher and teacher_columns(dataset):
        raise ValueError(
            f"`{name}` carries cached teacher columns {teacher_columns(dataset)}, but {needs_online_teacher}. Remove "
            "the columns (`dataset.remove_columns(...)`) so the teacher runs, or drop `intermediate_matches`."
        )


def check_metric_for_best_model(args, eval_dataset, *, has_teacher: bool, label_names) -> None:
    """A `metric_for_best_model` that evaluation can never report fails now, not after the training it selects."""
    metric = args.metric_for_best_model
    if metric is None or eval_dataset is None:
        return
    reported = metric.removeprefix("eval_")
    named = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
    for name, dataset in named:
        key = reported
        if name is not None:  # Trainer reports `eval_{name}_...` for each dataset of a dict
            if not key.startswith(f"{name}_"):
                continue
            key = key[len(name) + 1 :]
        columns = getattr(dataset, "column_names", None)
        no_teacher = not has_teacher and not teacher_columns(dataset)
        if key in ("loss_kd", "teacher_agreement") and no_teacher:
            reason = (
                "there is no `teacher_model` to run on the eval_dataset and it carries no cached teacher "
                "outputs. Pass the teacher, evaluate on a dataset from `precompute_teacher_logits`"
            )
        elif key == "loss_ce" and columns is not None and not label_columns_of(label_names) & set(columns):
            reason = (
                "the eval_dataset has no label column (columns: "
                f"{sorted(columns)}). Add labels to it, choose 'loss_kd' or 'loss'"
            )
        else:
            continue
        raise ValueError(
            f"metric_for_best_model={metric!r} can never be reported by evaluation: {reason}, or choose another "
            "metric_for_best_model."
        )
