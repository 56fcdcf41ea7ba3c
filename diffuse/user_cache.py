"""The folder where diffuse keeps what it can always make again (compiled kernels, file hashes):
$DIFFUSE_CACHE, else $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse."""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder() -> Path:
    if os.environ.get("DIFFUSE_CACHE"):
        return Path(os.environ["DIFFUSE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffuse"
