"""Resuming: which checkpoint is complete."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


logger = logging.get_logger(__name__)


def last_complete_checkpoint(folder: str, also_needs: str | Sequence[str] | None = None) -> str:
    """The newest checkpoint in `folder` whose `trainer_state.json` (which Trainer writes last) reads back; logs the
    newer, incomplete ones it skips (a save that was interrupted). `also_needs`: file(s) written after Trainer's, which
    a complete checkpoint holds too."""
    also_needs = [also_needs] if isinstance(also_needs, str) else list(also_needs or [])
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = sorted(
        (os.path.join(folder, n) for n in names if pattern.match(n) and os.path.isdir(os.path.join(folder, n))),
        key=lambda path: int(pattern.match(os.path.basename(path)).group(1)),
        reverse=True,
    )
    incomplete = []
    for checkpoint in found:
        try:
            with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):  # missing, unreadable or truncated: the save did not finish
            incomplete.append(checkpoint)
            continue
        if not all(os.path.exists(os.path.join(checkpoint, name)) for name in also_needs):
            incomplete.append(checkpoint)
            continue
        if incomplete:
            extra = f" or {', '.join(also_needs)}, written after it" if also_needs else ""
            logger.warning(
                f"Skipping incomplete checkpoint(s) {incomplete} (no readable {TRAINER_STATE_NAME}, which Trainer "
                f"writes last{extra}: the save was interrupted); resuming from {checkpoint}."
            )
        return checkpoint
    raise ValueError(
        f"No complete checkpoint in {folder} to resume from (resume_from_checkpoint=True)"
        + (f"; incomplete, without a readable {TRAINER_STATE_NAME}: {incomplete}" if incomplete else "")
        + ". Train without resume_from_checkpoint, or pass the path of a complete checkpoint."
    )
