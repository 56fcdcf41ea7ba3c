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
- token merging (after ToMe for SD, Bolya & Hoffman 2023): on the full-resolution feature
  maps, where self-attention costs most, neighbouring positions are often near copies.
  Before each self-attention there, `token_merging` of the positions are averaged into
  their most similar neighbour; attention runs on the rest and every merged position
  gets its partner's answer back. Half the positions merged make that attention about
  4x cheaper; the cross-attention and the feed-forward still see every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

MAX_TOKEN_MERGING = 0.75  # one position in each 2x2 cell stays to merge into: at most 3 of 4 can go


@dataclass(frozen=True)
class Speedups:
    guidance_cutoff: float = 1.0  # fraction of the steps that get guidance (1: all)
    deep_cache_interval: int = 1  # full UNet pass every N calls (1: every call, no caching)
    deep_cache_depth: int = 1  # shallow blocks run on the cached calls (1..num_res_blocks + 1)
    token_merging: float = 0.0  # fraction of full-resolution positions merged before self-attention (0: off)

    def __post_init__(self):
        if not 0.0 <= self.guidance_cutoff <= 1.0:
            raise ValueError(f"guidance_cutoff {self.guidance_cutoff} is not a fraction of the steps in [0, 1]")
        if not 1 <= self.deep_cache_interval <= 100:
            raise ValueError(f"deep_cache_interval {self.deep_cache_interval} is not in 1..100 (1 turns caching off)")
        if self.deep_cache_depth < 1:
            raise ValueError(f"deep_cache_depth {self.deep_cache_depth} must be at least 1")
        if not 0.0 <= self.token_merging <= MAX_TOKEN_MERGING:
            raise ValueError(f"token_merging {self.token_merging} is not a fraction of the positions in "
                             f"[0, {MAX_TOKEN_MERGING}]")

    def info(self) -> dict:
        """What a generation records about them (None: off, left out of the PNG's parameters)."""
        return {
            "guidance_cutoff": self.guidance_cutoff if self.guidance_cutoff < 1.0 else None,
            "deep_cache": f"{self.deep_cache_interval}/{self.deep_cache_depth}" if self.deep_cache_interval > 1 else None,
            "token_merging_ratio": self.token_merging or None,  # A1111's name for the same setting
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


Merge = Callable[[Tensor], Tensor]


class TokenMerging:
    """The token merging of one generation: hands each self-attention on a `size` feature map
    a (merge, unmerge) pair computed from that block's input.

    The positions split into destinations, one per 2x2 cell at a corner drawn afresh on
    every call (a fixed corner would leave a grid pattern), and sources, the rest. Each
    source finds its most similar destination by cosine similarity; the `ratio` x N
    sources most similar to theirs are merged, as a mean, into them. The corners come
    from the generation's own generator, seeded alike every time, so a seed still gives
    the same image."""

    def __init__(self, ratio: float, size: tuple[int, int]):
        self.ratio, self.size = ratio, tuple(size)
        self.generator = torch.Generator().manual_seed(0)

    def plan(self, x: Tensor, height: int, width: int) -> tuple[Merge, Merge] | None:
        """(merge, unmerge) for tokens x [B, height*width, C], or None where this map is not merged."""
        if (height, width) != self.size or height < 2 or width < 2:
            return None
        batch, count, _ = x.shape
        cells_y, cells_x = height // 2, width // 2
        corner = torch.randint(4, (cells_y, cells_x, 1), generator=self.generator)
        is_destination = torch.zeros(height, width, dtype=torch.bool)
        is_destination[: 2 * cells_y, : 2 * cells_x] = (
            torch.zeros(cells_y, cells_x, 4, dtype=torch.bool).scatter_(2, corner, True)
            .view(cells_y, cells_x, 2, 2).transpose(1, 2).reshape(2 * cells_y, 2 * cells_x))
        flat = is_destination.flatten().to(x.device)
        destinations, sources = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        merged = min(int(self.ratio * count), len(sources))
        if merged == 0:
            return None

        unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        similarity = unit[:, sources] @ unit[:, destinations].transpose(1, 2)  # [B, sources, destinations]
        best, partner = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True, stable=True)  # stable: ties never depend on the build
        moving, staying = ranked[:, :merged], ranked[:, merged:]  # indices into `sources`
        into = partner.gather(1, moving)  # each moving source's destination

        def widen(index: Tensor, t: Tensor) -> Tensor:
            return index[..., None].expand(-1, -1, t.shape[2])

        def merge(t: Tensor) -> Tensor:
            source_tokens, destination_tokens = t[:, sources], t[:, destinations]
            kept = source_tokens.gather(1, widen(staying, t))
            pooled = destination_tokens.scatter_reduce(1, widen(into, t), source_tokens.gather(1, widen(moving, t)),
                                                       reduce="mean", include_self=True)
            return torch.cat([kept, pooled], dim=1)

        def unmerge(t: Tensor) -> Tensor:
            kept, pooled = t[:, : staying.shape[1]], t[:, staying.shape[1]:]
            source_tokens = t.new_empty(batch, len(sources), t.shape[2])
            source_tokens.scatter_(1, widen(staying, t), kept)
            source_tokens.scatter_(1, widen(moving, t), pooled.gather(1, widen(into, t)))
            out = t.new_empty(batch, count, t.shape[2])
            out[:, sources], out[:, destinations] = source_tokens, pooled
            return out

        return merge, unmerge


class DrivenUNet:
    """The UNet as one generation calls it: `driven(latents, timesteps, context)`, with that
    generation's speed-ups (none, cache, merging) applied. `state()` and `restore(state)` let a
    call be made again exactly as the first try was (diffuse.numerics' float32 retry)."""

    def __init__(self, unet: torch.nn.Module, speedups: Speedups, latent_size: tuple[int, int]):
        self.unet = unet
        interval, depth = speedups.deep_cache_interval, speedups.deep_cache_depth
        self.cache = DeepCache(interval, depth) if interval > 1 else None
        self.merging = TokenMerging(speedups.token_merging, latent_size) if speedups.token_merging else None

    def __call__(self, latents: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        return self.unet(latents, timesteps, context, cache=self.cache, merging=self.merging)

    def state(self) -> tuple:
        cache = (self.cache.calls, self.cache.features) if self.cache is not None else None
        corners = self.merging.generator.get_state() if self.merging is not None else None
        return cache, corners

    def restore(self, state: tuple) -> None:
        cache, corners = state
        if cache is not None:
            self.cache.calls, self.cache.features = cache
        if corners is not None:
            self.merging.generator.set_state(corners)
