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


# `generate` arguments the trainer sets itself (lengths, one sample per prompt, the inputs).
RESERVED_GENERATION_KWARGS = frozenset(
    {"max_new_tokens", "max_length", "num_return_sequences", "input_ids", "attention_mask", "use_cache"}
)


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
    * ``lmbda=0``, ``seq_kd=False`` — off-policy distillation on the dataset's rows; on-policy (GKD, Agarwal et al.
      2024) and sequence-level KD (Kim & Rush 2016) for causal LMs are opt-in (`hf_distill.on_policy`,
      docs/on_policy.md). ``max_new_tokens=128`` as TRL's GKD.
    """

    _VALID_DICT_FIELDS = TRAINING_ARGUMENTS_DICT_FIELDS + [  # see private_apis
        "teacher_model_init_kwargs",
        "generation_kwargs",
    ]

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
            "automatically when the KD logits exceed 2**24 elements (default chunk size); 0: never chunked."
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

    # ---- on-policy and sequence-level distillation (causal LMs; `hf_distill.on_policy`) ----

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Fraction in [0, 1] of training micro-batches whose completions are sampled from the student "
            "(on-policy, GKD); the others use the dataset's completions. On a generated micro-batch each counted token's"
            " loss is the KD term alone with weight 1 (T²·D, not multiplied by alpha; there are no labels), so a step "
            "loss is (Σ_dataset [alpha·T²·D + (1-alpha)·CE] + Σ_generated T²·D) / counted tokens. Needs alpha > 0 and "
            "an online teacher. 0: the off-policy trainer, unchanged."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD: on the off-policy micro-batches the dataset's completions are replaced by the "
            "teacher's samples (same generation settings), which get the usual alpha mix of KD and label loss."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "Tokens generated at most per completion (student on-policy, teacher with seq_kd)."},
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per sequence at most. Generation: prompts longer than max_length - max_new_tokens keep their"
            " last tokens. None: the student config's max_position_embeddings / n_positions, if any, else unbounded. "
            "The command line also truncates rows to it when tokenising (128 when None)."
        },
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Sampling settings of `generate` (JSON on the command line), e.g. "
            '\'{"do_sample": true, "temperature": 0.9, "top_p": 0.95}\'. Default: plain sampling from the model '
            "(do_sample=true, temperature=1, top_k=0, top_p=1). The KD `temperature` is a separate setting."
        },
    )
    eval_on_policy: bool = field(
        default=False,
        metadata={"help": "Evaluate on completions generated by the student too (default: the dataset's rows)."},
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
        self._check_generation_settings()

    @property
    def generates(self) -> bool:
        """Whether any micro-batch may be generated (student on-policy, teacher with `seq_kd`, or evaluation)."""
        return self.lmbda > 0 or self.seq_kd or self.eval_on_policy

    def _check_generation_settings(self) -> None:
        if isinstance(self.lmbda, bool) or not (isinstance(self.lmbda, (int, float)) and 0.0 <= self.lmbda <= 1.0):
            raise ValueError(
                f"`lmbda` must be in [0, 1] (the fraction of micro-batches generated by the student), got "
                f"{self.lmbda!r}; e.g. lmbda=0.5, or lmbda=0 for off-policy distillation only."
            )
        if self.lmbda > 0 and self.alpha == 0:
            raise ValueError(
                f"lmbda={self.lmbda} generates completions from the student, but alpha=0 gives the distillation term "
                "no weight: generated micro-batches have no labels, so there is nothing to learn from them. Set "
                "alpha > 0 (e.g. alpha=1.0), or lmbda=0 for training on labels."
            )
        if isinstance(self.max_new_tokens, bool) or not (
            isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0
        ):
            raise ValueError(
                f"`max_new_tokens` must be an integer > 0 (tokens generated per completion), got {self.max_new_tokens!r};"
                " e.g. max_new_tokens=128."
            )
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(f"`max_length` must be None or an integer > 0, got {self.max_length!r}.")
        if self.generates and self.max_length is not None and self.max_length <= self.max_new_tokens:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for a prompt before max_new_tokens="
                f"{self.max_new_tokens} generated tokens: set max_length > max_new_tokens (e.g. max_length="
                f"{self.max_new_tokens + 128}) or lower max_new_tokens."
            )
        if self.generation_kwargs is not None:
            if not isinstance(self.generation_kwargs, dict):
                raise ValueError(
                    "`generation_kwargs` must be a dict (or a JSON object string on the command line), got "
                    f"{self.generation_kwargs!r}."
                )
            owned = sorted(set(self.generation_kwargs) & RESERVED_GENERATION_KWARGS)
            if owned:
                raise ValueError(
                    f"`generation_kwargs` sets {owned}, which the trainer sets itself: use the arguments "
                    "`max_new_tokens` / `max_length` for lengths; one completion is generated per prompt."
                )
