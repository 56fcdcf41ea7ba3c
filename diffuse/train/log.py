"""A run's log: out_dir/log.jsonl, one JSON record per optimizer step ({"step", "loss", ..., "lr", "grad_norm"}).

Only the main process writes it. A run resumed from a checkpoint first cuts the log back to
the checkpoint's step, so the log always holds exactly one line for each step the models took.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOG_NAME = "log.jsonl"


def truncate_log(path: Path, step: int) -> None:
    """Cut the log back to the lines of steps 1..step: a killed run may have logged past its last checkpoint."""
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                complete = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                complete = False  # a line cut short by the kill
            if not complete:
                break
            keep += len(line)
    os.truncate(path, keep)


def logged_losses(path: Path) -> list[float]:
    """The loss of every step in the log, in order."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]
