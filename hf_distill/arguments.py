"""`DistillationTrainingArguments`: `TrainingArguments` plus the knowledge-distillation settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .divergences import MAX_TEMPERATURE, get_distillation_loss
from .intermediate import parse_intermediate_matches
from .losses import ENSEMBLE_REDUCTIONS, SCHEDULES, check_ensemble_settings
from .private_apis import TRAINING_ARGUMENTS_DICT_FIELDS


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] with the knowledge-distillation settings of [`DistillationTrainer`].

    The student minimises ``alpha · T² · D(teacher_T ‖ student_T) + (1 − alpha) · label_loss`` (see
    `hf_distill.losses`). Usable with [`~transformers.HfArgumentParser`] from flags, JSON or YAML.

    Defaults, and why:

    * ``temperature=2.0`` — high enough to expose the teacher's "dark knowledge" in the relative probabilities of wrong
      classes, low enough for small students: Hinton et al. found T in 2.5–4 best for very small students and any
      T > 8 about equally good for large ones; DistilBERT used 2. Raise it (e.g. 20, the paper's MNIST value) for
      students nearly as large as the teacher.
    * ``alpha=0.9`` — the paper found "a considerably lower weight on the second [label] objective" works best.
    * ``distillation_loss="kl"`` — the paper's soft-target loss (forward KL has the same gradient as its
      cross-entropy).
    * ``jsd_beta=0.5`` — the symmetric Jensen–Shannon divergence, when ``distillation_loss="jsd"``.
    * ``intermediate_matches=None`` — logits only; hidden-state / attention matches are opt-in
      (`hf_distill.intermediate`, docs/intermediate_matches.md).
    """

    _VALID_DICT_FIELDS = TRAINING_ARGUMENTS_DICT_FIELDS + ["teacher_model_init_kwargs"]  # see private_apis

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T > 0 of the soft targets; the KD term is multiplied by T²."},
    )
    alpha: float = field(
        default=0.9,
        metadata={
            "help": "Weight in [0, 1] of the distillation term; the label loss gets 1 - alpha. alpha=1 needs no labels,"
            " alpha=0 is plain supervised training."
        },
    )
    distillation_loss: str = field(
        default="kl",
        metadata={
            "help": "Divergence between teacher and student: 'kl' (forward KL(teacher||student), Hinton's), "
            "'reverse_kl', 'jsd' (generalized Jensen-Shannon, see jsd_beta), 'mse' (logit matching), or a name added "
            "with `hf_distill.register_distillation_loss`. In Python also a named function (registered by its name).",
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Mixture weight beta in (0, 1) of the generalized JSD: m = beta*teacher + (1-beta)*student."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the teacher is given as a path or Hub id, e.g. "
            '\'{"dtype": "bfloat16", "revision": "main"}\'.'
        },
    )

    shard_teacher: bool | None = field(
        default=None,
        metadata={
            "help": "Shard the frozen teacher across processes. None: when the student is sharded (FSDP2: `fully_shard`;"
            " DeepSpeed ZeRO-3: partitioned), else one full copy per process. True: also when the student is "
            "replicated (DDP), with FSDP2's `fully_shard`, for a teacher too large to copy to every process. False: one "
            "full copy per process always. See `hf_distill.distributed`."
        },
    )

    kd_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Token-level KD at bounded memory: positions per chunk of `hf_distill.chunked`. None: chunked "
            "automatically when the KD logits exceed 6 * 2**20 elements (default chunk size; the measured crossover, "
            "docs/losses.md); 0: never chunked."
        },
    )
    kd_fuse_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: compute the KD and label losses from the student's last hidden state and output head "
            "chunk by chunk (`hf_distill.fused`), never forming the [tokens, vocabulary] logits in training. None: "
            "automatically, on training steps where it applies and the logits are large enough for it to pay off; "
            "True: always (an error says why when it cannot apply); False: never. Evaluation always uses the logits."
        },
    )
    ensemble_reduction: str = field(
        default="mean_probs",
        metadata={
            "help": "How an ensemble of teachers (a list as `teacher_model`) gives soft targets: 'mean_probs' (arithmetic"
            " mean of the tempered distributions) or 'mean_log_probs' (geometric mean, renormalised).",
            "choices": list(ENSEMBLE_REDUCTIONS),
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the ensemble's teachers (normalised to sum to 1); default uniform."},
    )
    temperature_end: float | None = field(
        default=None,
        metadata={"help": "Final temperature of a `temperature_schedule` (which starts at `temperature`)."},
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={
            "help": "How T moves from `temperature` to `temperature_end` over training.",
            "choices": list(SCHEDULES),
        },
    )
    alpha_end: float | None = field(
        default=None,
        metadata={"help": "Final alpha of an `alpha_schedule` (which starts at `alpha`)."},
    )
    alpha_schedule: str = field(
        default="constant",
        metadata={"help": "How alpha moves from `alpha` to `alpha_end` over training.", "choices": list(SCHEDULES)},
    )

    intermediate_matches: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Hidden-state / attention matches added to the loss (each term weight * match): a preset "
            "('distilbert': cosine on the last hidden states; 'tinybert': TinyBERT's uniform layer map, hidden MSE + "
            "attention MSE), or a list of {student_layer, teacher_layer, feature: hidden|attention, loss: "
            "mse|cosine (hidden) or mse|kl (attention), weight} (JSON on the command line). Layers follow "
            "`hidden_states`: 0 = embeddings, k = block k; attention maps exist for blocks 1..L."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        # Validated here, before any model is built or data is read, so a typo costs nothing.
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if name == "temperature_end" and value is None:
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}; e.g. {name}=2.0.")
            if value > MAX_TEMPERATURE:
                raise ValueError(
                    f"`{name}`={value!r} is above {MAX_TEMPERATURE:g}, where the soft targets are uniform to within "
                    "rounding and every divergence tends to logit matching: use distillation_loss='mse' (the "
                    f"high-temperature limit, independent of T) with the default temperature, or {name} <= "
                    f"{MAX_TEMPERATURE:g}."
                )
        for name in ("alpha", "alpha_end"):
            value = getattr(self, name)
            if name == "alpha_end" and value is None:
                continue
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"`{name}` must be in [0, 1] (the weight of the distillation term), got {value!r}; e.g. {name}=0.9."
                )
        for schedule, end in (("temperature_schedule", "temperature_end"), ("alpha_schedule", "alpha_end")):
            if getattr(self, schedule) not in SCHEDULES:
                raise ValueError(f"Unknown `{schedule}` {getattr(self, schedule)!r}; choose one of {list(SCHEDULES)}.")
            if getattr(self, schedule) != "constant" and getattr(self, end) is None:
                raise ValueError(f"`{schedule}={getattr(self, schedule)!r}` needs `{end}`, the value to end at.")
            if getattr(self, schedule) == "constant" and getattr(self, end) is not None:
                raise ValueError(
                    f"`{end}={getattr(self, end)!r}` has no effect with `{schedule}='constant'`: set "
                    f"{schedule}='linear' or 'cosine' to move towards it, or drop `{end}`."
                )
        try:  # a function is registered under its name, so the arguments stay serialisable
            self.distillation_loss = get_distillation_loss(self.distillation_loss).name
        except ValueError as error:
            raise ValueError(f"`distillation_loss`: {error}") from None
        if not (isinstance(self.jsd_beta, (int, float)) and 0.0 < self.jsd_beta < 1.0):
            raise ValueError(
                f"`jsd_beta` must be strictly between 0 and 1, got {self.jsd_beta!r}; for the limits use "
                "distillation_loss='kl' (beta -> 0) or 'reverse_kl' (beta -> 1)."
            )
        if self.kd_chunk_size is not None and self.kd_chunk_size < 0:
            raise ValueError(
                f"`kd_chunk_size` must be None (automatic), 0 (off) or positive, got {self.kd_chunk_size}."
            )
        check_ensemble_settings(
            self.ensemble_reduction, self.teacher_weights, len(self.teacher_weights) if self.teacher_weights else 0
        )
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                "`teacher_model_init_kwargs` must be a dict (or a JSON object string on the command line), got "
                f"{self.teacher_model_init_kwargs!r}."
            )
        self.intermediate_matches = parse_intermediate_matches(self.intermediate_matches)
