"""Optional speed-ups that change the image a little. All are off by default.

Each trades a small, measured change of the output for time (bench/RESULTS.md):

- guidance cut-off: classifier-free guidance matters most while the composition forms,
  in the early, noisy steps. After `guidance_cutoff` of the steps, only the conditional
  half of the batch is run: those steps cost half.
- deep-feature cache (after DeepCache, Ma et al. 2023): between neighbouring steps the
  UNet's deep, low-resolution features barely change, while the shallow full-resolution
  ones carry the detail. Every `deep_cache_interval`-th UNet call runs the whole network
  and keeps the features that enter its last `deep_cache_depth` output blocks; the calls
  in between run only the first `deep_cache_depth` input blocks and those output blocks,
  on the kept features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Speedups:
    guidance_cutoff: float = 1.0  # fraction of the steps that get guidance (1: all)
    deep_cache_interval: int = 1  # full UNet pass every N calls (1: every call, no caching)
    deep_cache_depth: int = 1  # shallow blocks run on the cached calls (1..num_res_blocks + 1)

    def __post_init__(self):
        if not 0.0 <= self.guidance_cutoff <= 1.0:
            raise ValueError(f"guidance_cutoff {self.guidance_cutoff} is not a fraction of the steps in [0, 1]")
        if not 1 <= self.deep_cache_interval <= 100:
            raise ValueError(f"deep_cache_interval {self.deep_cache_interval} is not in 1..100 (1 turns caching off)")
        if self.deep_cache_depth < 1:
            raise ValueError(f"deep_cache_depth {self.deep_cache_depth} must be at least 1")

    def info(self) -> dict:
        """What a generation records about them (None: off, left out of the PNG's parameters)."""
        return {
            "guidance_cutoff": self.guidance_cutoff if self.guidance_cutoff < 1.0 else None,
            "deep_cache": f"{self.deep_cache_interval}/{self.deep_cache_depth}" if self.deep_cache_interval > 1 else None,
        }


class DeepCache:
    """The deep-feature cache of one generation; the UNet consults it on every call.

    `depth` counts the shallow input blocks (and as many output blocks) that always run."""

    def __init__(self, interval: int, depth: int):
        self.interval, self.depth = interval, depth
        self.calls = 0
        self.features: Optional[torch.Tensor] = None

    def reuse(self, batch: int) -> bool:
        """Whether this call may skip the deep blocks: not on every interval-th call, and only
        with kept features of the same batch (guidance cut-off halves it)."""
        due = self.calls % self.interval == 0
        self.calls += 1
        return not due and self.features is not None and self.features.shape[0] == batch
