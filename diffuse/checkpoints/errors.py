"""Errors raised while reading checkpoints. Each names the file and what was wrong."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpointError(CheckpointError):
    """A pickle in the checkpoint references code outside the allow-list; nothing was executed."""
