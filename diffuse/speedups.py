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

The network knows nothing of them: DrivenUNet drives the UNet's blocks from here (the
cache walks them itself, merging wraps the transformer blocks for the length of a call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffuse.models.unet import BasicTransformerBlock, SpatialTransformer, UNet, run_block, run_output_block

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
            raise ValueError(
                f"token_merging {self.token_merging} is not a fraction of the positions in [0, {MAX_TOKEN_MERGING}]"
            )

    def info(self) -> dict:
        """What a generation records about them (None: off, left out of the PNG's parameters)."""
        return {
            "guidance_cutoff": self.guidance_cutoff if self.guidance_cutoff < 1.0 else None,
            "deep_cache": f"{self.deep_cache_interval}/{self.deep_cache_depth}"
            if self.deep_cache_interval > 1
            else None,
            "token_merging_ratio": self.token_merging or None,  # A1111's name for the same setting
        }


class DeepCache:
    """The deep-feature cache of one generation, called as the UNet: `cache(latents, timesteps,
    context)` walks the UNet's blocks itself and runs the deep ones only on every
    `interval`-th call, reusing their last output in between.

    `depth` counts the shallow input blocks (and as many output blocks) that always run."""

    def __init__(self, unet: UNet, interval: int, depth: int):
        self.unet, self.interval, self.depth = unet, interval, depth
        self.calls = 0
        self.features: Tensor | None = None

    def reuse(self, batch: int) -> bool:
        """Whether this call may skip the deep blocks: not on every interval-th call, and only
        with kept features of the same batch (guidance cut-off halves it)."""
        due = self.calls % self.interval == 0
        self.calls += 1
        return not due and self.features is not None and self.features.shape[0] == batch

    def __call__(self, latents: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor | None = None) -> Tensor:
        unet = self.unet
        emb = unet.embed_time(timesteps, latents, y)
        # The first `shallow` input blocks and the last `shallow` output blocks (which take
        # exactly their skips) always run; the rest is the deep part.
        shallow = min(self.depth, unet.cfg.num_res_blocks + 1)
        deep_outputs = len(unet.output_blocks) - shallow
        h, skips = latents, []
        for block in unet.input_blocks[:shallow]:
            h = run_block(block, h, emb, context)
            skips.append(h)
        if self.reuse(latents.shape[0]):
            h = self.features
        else:
            for block in unet.input_blocks[shallow:]:
                h = run_block(block, h, emb, context)
                skips.append(h)
            h = run_block(unet.middle_block, h, emb, context)
            for block in unet.output_blocks[:deep_outputs]:
                h = run_output_block(block, h, skips, emb, context)
            self.features = h
        for block in unet.output_blocks[deep_outputs:]:
            h = run_output_block(block, h, skips, emb, context)
        return unet.out(h)


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
        destinations, sources = self.split(height, width, x.device)
        merged = min(int(self.ratio * x.shape[1]), len(sources))
        if merged == 0:
            return None
        unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        similarity = unit[:, sources] @ unit[:, destinations].transpose(1, 2)  # [B, sources, destinations]
        best, partner = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True, stable=True)  # stable: ties never depend on the build
        moving, staying = ranked[:, :merged], ranked[:, merged:]  # indices into `sources`
        return merge_and_unmerge(sources, destinations, moving, staying, into=partner.gather(1, moving))

    def split(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The destination and the source positions of a height x width map: one destination
        per 2x2 cell, at a corner drawn from the generator."""
        cells_y, cells_x = height // 2, width // 2
        corner = torch.randint(4, (cells_y, cells_x, 1), generator=self.generator)
        is_destination = torch.zeros(height, width, dtype=torch.bool)
        is_destination[: 2 * cells_y, : 2 * cells_x] = (
            torch.zeros(cells_y, cells_x, 4, dtype=torch.bool)
            .scatter_(2, corner, True)
            .view(cells_y, cells_x, 2, 2)
            .transpose(1, 2)
            .reshape(2 * cells_y, 2 * cells_x)
        )
        flat = is_destination.flatten().to(device)
        return flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)


def merge_and_unmerge(
    sources: Tensor, destinations: Tensor, moving: Tensor, staying: Tensor, into: Tensor
) -> tuple[Merge, Merge]:
    """merge: the staying sources, then each destination averaged with the sources moving into
    it; unmerge: every position its own answer back, a moved source its destination's."""

    def widen(index: Tensor, t: Tensor) -> Tensor:
        return index[..., None].expand(-1, -1, t.shape[2])

    def merge(t: Tensor) -> Tensor:
        source_tokens, destination_tokens = t[:, sources], t[:, destinations]
        kept = source_tokens.gather(1, widen(staying, t))
        pooled = destination_tokens.scatter_reduce(
            1, widen(into, t), source_tokens.gather(1, widen(moving, t)), reduce="mean", include_self=True
        )
        return torch.cat([kept, pooled], dim=1)

    def unmerge(t: Tensor) -> Tensor:
        kept, pooled = t[:, : staying.shape[1]], t[:, staying.shape[1] :]
        source_tokens = t.new_empty(t.shape[0], len(sources), t.shape[2])
        source_tokens.scatter_(1, widen(staying, t), kept)
        source_tokens.scatter_(1, widen(moving, t), pooled.gather(1, widen(into, t)))
        out = t.new_empty(t.shape[0], len(sources) + len(destinations), t.shape[2])
        out[:, sources], out[:, destinations] = source_tokens, pooled
        return out

    return merge, unmerge


class TokenMergedBlock(nn.Module):
    """A BasicTransformerBlock whose self-attention runs on merged positions where its input is
    the merged map; every other map passes through the block as it is.

    The UNet's other feature maps all hold fewer positions than the latent-sized one, so the
    position count tells which map a block sees."""

    def __init__(self, block: BasicTransformerBlock, merging: TokenMerging):
        super().__init__()
        self.block, self.merging = block, merging

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = self.merging.size
        plan = self.merging.plan(x, height, width) if x.shape[1] == height * width else None
        if plan is None:
            return self.block(x, context)
        merge, unmerge = plan  # the plan is made from the block's input, before norm1
        block = self.block
        x = unmerge(block.attn1(merge(block.norm1(x)))) + x
        x = block.attn2(block.norm2(x), context) + x
        return block.ff(block.norm3(x)) + x


@contextlib.contextmanager
def merging_self_attention(unet: nn.Module, merging: TokenMerging) -> Iterator[None]:
    """Every transformer block of `unet` wrapped in a TokenMergedBlock for the duration, then
    put back (also on error)."""
    swapped = [
        (layer.transformer_blocks, i, block)
        for layer in unet.modules()
        if isinstance(layer, SpatialTransformer)
        for i, block in enumerate(layer.transformer_blocks)
    ]
    try:
        for blocks, i, block in swapped:
            blocks[i] = TokenMergedBlock(block, merging)
        yield
    finally:
        for blocks, i, block in swapped:
            blocks[i] = block


class DrivenUNet:
    """The UNet as one generation calls it: `driven(latents, timesteps, context, y)`, with that
    generation's speed-ups (none, cache, merging) applied. `state()` and `restore(state)` let a
    call be made again exactly as the first try was (diffuse.numerics' float32 retry).

    Token merging swaps the UNet's transformer blocks during each call, so one UNet serves one
    generation at a time."""

    def __init__(self, unet: UNet, speedups: Speedups, latent_size: tuple[int, int]):
        self.unet = unet
        interval, depth = speedups.deep_cache_interval, speedups.deep_cache_depth
        self.cache = DeepCache(unet, interval, depth) if interval > 1 else None
        self.merging = TokenMerging(speedups.token_merging, latent_size) if speedups.token_merging else None

    def __call__(self, latents: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """y is SDXL's vector conditioning (None for SD 1/2), which every speed-up passes on."""
        run = self.cache if self.cache is not None else self.unet
        inputs = (latents, timesteps, context) if y is None else (latents, timesteps, context, y)
        if self.merging is None:
            return run(*inputs)
        with merging_self_attention(self.unet, self.merging):
            return run(*inputs)

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
