"""The VAE decoder in overlapping tiles, so a large image decodes in memory bounded by the tile.

What makes tiling inexact is not the convolutions (local) but the decoder's GroupNorms, which
normalise by statistics over the whole image, and the mid block's attention, which sees every
position. diffusers' tiled_decode normalises each tile by its own statistics, which shifts colours
from tile to tile; here the result stays within a fraction of a 1/255 step of the whole decode:

- conv_in and the mid block (attention included) run whole, at the latent resolution, which is
  64 times smaller than the image: cheap and exact.
- The up levels run tile by tile, and every GroupNorm normalises by the whole image's mean and
  variance per group, summed over the tiles' cores (the part of the latent each tile owns; the
  cores partition it). One norm's statistics depend on the norms before it, so they are found one
  norm at a time: a pass runs every tile as far as the next unknown norm and sums its input there.
  That is the price: about as many partial decodes as the decoder has GroupNorms (an SDXL-sized
  decoder has 25 after its mid block), for memory that no longer grows with the image. Tiling is
  the fallback for images whose whole decode would not fit, not the default.
- Tiles overlap; across the middle half of each overlap the two tiles' pixels are blended by a
  linear ramp (feathered, as diffusers blends neighbours), and nearer a tile's edge, where its
  zero padding still reaches, its pixels are not used at all.

`decode` tiles only when the decoder's estimated peak activation memory is over a budget
(`needs_tiles`); otherwise it is exactly `vae.decode`. Tiles are then as large as the budget allows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.vae import AutoencoderKL
from diffuse.runtime.device import give_back_freed_memory

# A quarter of a 24 GB machine: an untiled 1024x1024 SDXL decode (about 2 GB in bf16, 4 GB in
# float32 by the estimate below) stays whole, a 2048x2048 one tiles.
DEFAULT_BUDGET_BYTES = 6 * 2**30
# Latent pixels. The overlap covers what an SD decoder's convolutions see after its mid block
# (about 13 latent pixels, half of them at the latent resolution) on the side of each core.
TILE, OVERLAP = 64, 16
# Full-resolution maps alive at once at the decoder's peak: a block's input, the convolution's
# output, the next one's, and the upsample's output before them.
MAPS_AT_PEAK = 4


def decoder_peak_bytes(vae: AutoencoderKL, latent_shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    """Estimated peak bytes of the decoder's activations for latents of `latent_shape` [B, C, h, w]:
    MAPS_AT_PEAK maps of its widest level at that level's resolution (the weights not counted)."""
    batch, _, h, w = latent_shape
    cfg = vae.cfg
    levels = len(cfg.channel_mult)
    # Level i runs at 2**(levels-1-i) times the latent side; each upsample writes the next level's
    # resolution with its own (wider) channels, hence the width of level i+1 at level i's size.
    widest = max(
        cfg.base_channels * max(cfg.channel_mult[i], cfg.channel_mult[min(i + 1, levels - 1)]) * 4 ** (levels - 1 - i)
        for i in range(levels)
    )
    return MAPS_AT_PEAK * batch * widest * h * w * torch.finfo(dtype).bits // 8


def needs_tiles(vae: AutoencoderKL, latents: Tensor, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> bool:
    """Whether `decode` tiles: the untiled decode's estimated peak is over the budget."""
    return decoder_peak_bytes(vae, latents.shape, latents.dtype) > budget_bytes


def tile_for_budget(vae: AutoencoderKL, latents: Tensor, budget_bytes: int, overlap: int = OVERLAP) -> int:
    """The largest square tile (latent pixels) whose estimated decode fits the budget; never under
    twice the overlap plus 8, so every tile has a core."""
    one_pixel = decoder_peak_bytes(vae, (latents.shape[0], latents.shape[1], 1, 1), latents.dtype)
    return max(int((budget_bytes / one_pixel) ** 0.5), 2 * overlap + 8)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: Tensor, budget_bytes: int | None = None) -> Tensor:
    """Raw latents [B, C, h, w] → images [B, 3, h*f, w*f], as `vae.decode`; in tiles as large as the
    budget (None: DEFAULT_BUDGET_BYTES) allows where `needs_tiles` says so (then within a fraction
    of a 1/255 step of it)."""
    budget_bytes = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    give_back_freed_memory()
    if needs_tiles(vae, latents, budget_bytes):
        return tiled_decode(vae, latents, tile_for_budget(vae, latents, budget_bytes))
    return vae.decode(latents)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, latents: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> Tensor:
    """The decode in tiles of `tile` latent pixels overlapping by `overlap`, whatever the size."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be under the tile {tile}")
    decoder = vae.decoder
    features = decoder.mid(decoder.conv_in(vae.post_quant_conv(latents)))
    rows, cols = spans(features.shape[-2], tile, overlap), spans(features.shape[-1], tile, overlap)
    stats = GroupStats()
    with shared_norms(decoder, stats):
        while not stats.complete:  # one pass per GroupNorm, each tile run only as far as that norm
            for row in rows:
                for col in cols:
                    with contextlib.suppress(Gathered):
                        up_levels(decoder, features, row, col, stats)
            stats.settle()
        return painted(decoder, features, (rows, cols), overlap, stats)


# ---- where the tiles lie --------------------------------------------------------------------------


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (start, end, core start, core end): tiles of `tile` (the last one
    ends at `length`) overlapping by at least `overlap`; the cores split each overlap in the
    middle and together cover [0, length) once."""
    if length <= tile:
        return [(0, length, 0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    out = []
    for i, start in enumerate(starts):
        core_start = 0 if i == 0 else (start + starts[i - 1] + tile) // 2
        core_end = length if i == len(starts) - 1 else (starts[i + 1] + start + tile) // 2
        out.append((start, start + tile, core_start, core_end))
    return out


def ramp(span: tuple[int, int, int, int], scale: int, overlap: int, first: bool, last: bool) -> Tensor:
    """A tile's blending weight along one axis at `scale` pixels per latent pixel: rising linearly
    across `overlap / 2` latent pixels centred on its core's first edge, falling likewise across
    its core's last edge (its neighbour's ramp is the same one reversed, so the two sum to one),
    and zero nearer its own edge, where its zero padding still shows."""
    start, end, core_start, core_end = span
    position = torch.arange((end - start) * scale) + 0.5
    width = max(overlap * scale / 2, 1.0)
    weight = torch.ones_like(position)
    if not first:
        weight = torch.minimum(weight, ((position - (core_start - start) * scale) / width + 0.5).clamp(0, 1))
    if not last:
        weight = torch.minimum(weight, (((core_end - start) * scale - position) / width + 0.5).clamp(0, 1))
    return weight


# ---- the up levels on one tile -------------------------------------------------------------------


def up_levels(decoder: nn.Module, features: Tensor, row: tuple, col: tuple, stats: GroupStats) -> Tensor:
    """The decoder after its mid block, on the tile at `row` x `col` of the mid block's output."""
    stats.start_tile(row, col)
    x = features[:, :, row[0] : row[1], col[0] : col[1]]
    for level in reversed(decoder.up):
        x = level(x)
    return decoder.conv_out(F.silu(decoder.norm_out(x)))


def painted(decoder: nn.Module, features: Tensor, tiles: tuple[list, list], overlap: int, stats: GroupStats) -> Tensor:
    """Every tile decoded and blended by its ramps into one image."""
    batch, _, h, w = features.shape
    rows, cols = tiles
    image = weights = None
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            pixels = up_levels(decoder, features, row, col, stats).float()
            scale = pixels.shape[-2] // (row[1] - row[0])
            if image is None:
                image = torch.zeros(batch, pixels.shape[1], h * scale, w * scale)
                weights = torch.zeros(h * scale, w * scale)
            down = ramp(row, scale, overlap, i == 0, i == len(rows) - 1)
            across = ramp(col, scale, overlap, j == 0, j == len(cols) - 1)
            window = (slice(row[0] * scale, row[1] * scale), slice(col[0] * scale, col[1] * scale))
            image[(..., *window)] += pixels * (down[:, None] * across)
            weights[window] += down[:, None] * across
    return (image / weights).to(features.dtype)


# ---- GroupNorm over the whole image, from tiles ----------------------------------------------------


class Gathered(Exception):
    """A tile has reached the GroupNorm whose statistics are being gathered: the rest is not needed."""


class GroupStats:
    """The whole image's mean and variance per sample and group of each GroupNorm, in call order:
    `known` holds the settled ones; the next one is summed (x and x², over the tiles' cores)."""

    def __init__(self):
        self.known: list[tuple[Tensor, Tensor]] = []
        self.total = self.squares = None
        self.count = 0
        self.calls = 0  # GroupNorms the current tile has passed
        self.core: tuple = ()  # the tile being decoded: (row span, col span), set before each tile
        self.complete = False  # every GroupNorm's statistics are known

    def start_tile(self, row: tuple, col: tuple) -> None:
        self.core, self.calls = (row, col), 0

    def add(self, x: Tensor, groups: int) -> None:
        (r0, r1, cr0, cr1), (c0, c1, cc0, cc1) = self.core
        sh, sw = x.shape[-2] // (r1 - r0), x.shape[-1] // (c1 - c0)
        core = x[:, :, (cr0 - r0) * sh : (cr1 - r0) * sh, (cc0 - c0) * sw : (cc1 - c0) * sw]
        flat = core.reshape(core.shape[0], groups, -1).double()  # double: E[x²] - E[x]² cancels
        total, squares = flat.sum(-1), flat.pow(2).sum(-1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[-1]

    def settle(self) -> None:
        """The summed norm's statistics become known; no sum at all means every norm was known."""
        if self.total is None:
            self.complete = True
            return
        mean = self.total / self.count
        self.known.append((mean, (self.squares / self.count - mean.pow(2)).clamp_min(0)))
        self.total = self.squares = None
        self.count = 0


class SharedGroupNorm(nn.GroupNorm):
    """A decoder GroupNorm while tiling: normalises by the whole image's statistics once they are
    known; before that, adds its input to their sums and ends the tile's run (Gathered)."""

    stats: GroupStats

    def forward(self, x: Tensor) -> Tensor:
        stats = self.stats
        index, stats.calls = stats.calls, stats.calls + 1
        if index == len(stats.known):
            stats.add(x, self.num_groups)
            raise Gathered
        mean, var = stats.known[index]
        b, c = x.shape[:2]
        grouped = x.reshape(b, self.num_groups, -1).float()
        scale = torch.rsqrt(var + self.eps).float()[..., None]
        normed = ((grouped - mean.float()[..., None]) * scale).reshape(x.shape).to(x.dtype)
        return normed * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


@contextlib.contextmanager
def shared_norms(decoder: nn.Module, stats: GroupStats) -> Iterator[None]:
    """The GroupNorms of the up levels and the output made SharedGroupNorm for the block's duration."""
    norms = [m for m in [*decoder.up.modules(), decoder.norm_out] if type(m) is nn.GroupNorm]
    for norm in norms:
        norm.__class__ = SharedGroupNorm
        norm.stats = stats
    try:
        yield
    finally:
        for norm in norms:
            norm.__class__ = nn.GroupNorm
            del norm.stats
