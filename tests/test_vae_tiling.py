"""Tiled VAE decoding (diffuse.runtime.vae_tiles): the same image as the whole decode, in memory
bounded by the tile, and only where the whole decode would be over the budget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import diffuse
from diffuse.cli import DEFAULT_MODEL
from diffuse.models.configs import VAEConfig
from diffuse.models.vae import AutoencoderKL
from diffuse.runtime import prepare, vae_tiles
from diffuse.runtime.vae_tiles import (
    DEFAULT_BUDGET_BYTES,
    decode,
    decoder_peak_bytes,
    needs_tiles,
    ramp,
    spans,
    tile_for_budget,
    tiled_decode,
)

STEP = 2 / 255  # two 8-bit steps, in the decoder's [-1, 1] units


def tiny_vae(dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The tiny VAE of diffusers' SDXL tests (widths 32, 64; one block a level, so two in the
    decoder's; 32 groups), perturbed so no layer is zero."""
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=32)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return prepare(vae, "cpu", dtype)


@pytest.mark.parametrize("length, tile, overlap", [(10, 16, 4), (100, 32, 8), (137, 40, 16), (65, 33, 32)])
def test_the_tiles_cover_the_latent_and_their_cores_partition_it(length, tile, overlap):
    tiles = spans(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for start, end, core_start, core_end in tiles:
        assert 0 <= start <= core_start < core_end <= end <= length
        assert end - start == min(tile, length)
        covered[core_start:core_end] += 1
    assert (covered == 1).all()
    for (_, end, _, _), (start, _, _, _) in zip(tiles, tiles[1:]):
        assert end - start >= min(overlap, length)


def test_the_ramps_of_neighbouring_tiles_sum_to_one_where_they_blend():
    tiles = spans(100, 32, 16)
    total = torch.zeros(100 * 4)
    for i, span in enumerate(tiles):
        weight = ramp(span, 4, 16, i == 0, i == len(tiles) - 1)
        assert weight.min() >= 0 and weight.max() <= 1
        total[span[0] * 4 : span[1] * 4] += weight
    torch.testing.assert_close(total, torch.ones_like(total))


def test_a_tiled_decode_of_a_tiny_vae_matches_the_whole_decode():
    vae = tiny_vae()
    z = torch.randn(1, 4, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z)
        # Untrained weights see as far as their convolutions reach (about 8 latent pixels here),
        # so the overlap leaves that much beyond every blended pixel.
        tiled = tiled_decode(vae, z, tile=48, overlap=32)
    assert len(spans(64, 48, 32)) * len(spans(80, 48, 32)) == 6
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() <= STEP
    with torch.no_grad():
        assert torch.equal(vae.decode(z), whole)  # the GroupNorms are themselves again


def test_per_tile_statistics_would_not_be_close():
    """What the shared statistics are for: diffusers-style tiles normalised on their own differ."""
    vae = tiny_vae()
    z = torch.randn(1, 4, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z)
        halves = torch.cat([vae.decode(z[..., :40]), vae.decode(z[..., 40:])], dim=-1)
    assert (halves - whole).abs().max() > 10 * STEP


def shapes_picture(side: int) -> torch.Tensor:
    picture = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(picture)
    rng = np.random.default_rng(0)
    for i in range(30):
        x, y, r = (int(v) for v in rng.integers(0, side, 3))
        r = r % 40 + 8
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1)
    return pixels.permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def shipped_vae():
    return diffuse.load_pipeline(DEFAULT_MODEL, dtype=torch.float32).vae


def test_the_shipped_models_vae_decodes_the_same_image_in_tiles(shipped_vae):
    with torch.no_grad():
        z = shipped_vae.encode(shapes_picture(256)).mean  # 32x32 latents
        whole = shipped_vae.decode(z).clamp(-1, 1)
        tiled = tiled_decode(shipped_vae, z, tile=24, overlap=16).clamp(-1, 1)
    assert len(spans(32, 24, 16)) == 2  # 2 x 2 tiles
    assert (tiled - whole).abs().max() <= STEP


def test_memory_is_bounded_by_the_tile_not_the_image():
    """The largest activation the up levels make is the same for a latent four times the area."""
    vae = tiny_vae()
    largest = []
    hooks = [m.register_forward_hook(lambda m, i, o: largest.append(o.numel())) for m in vae.decoder.up.modules()]
    sizes = {}
    try:
        for side in (32, 64):
            largest.clear()
            with torch.no_grad():
                tiled_decode(vae, torch.randn(1, 4, side, side), tile=16, overlap=4)
            sizes[side] = max(largest)
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes[32] == sizes[64] == 64 * 32 * 32  # one 16x16 tile at twice the side, 64 channels


def test_under_the_budget_decode_is_exactly_the_whole_decode():
    vae = tiny_vae()
    z = torch.randn(1, 4, 40, 48)
    assert not needs_tiles(vae, z)
    with torch.no_grad():
        assert torch.equal(decode(vae, z), vae.decode(z))


def test_over_the_budget_decode_tiles_within_two_steps():
    vae = tiny_vae()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    budget = decoder_peak_bytes(vae, (1, 4, 44, 44), torch.float32)
    assert needs_tiles(vae, z, budget) and tile_for_budget(vae, z, budget) == 44
    with torch.no_grad():
        tiled, whole = decode(vae, z, budget), vae.decode(z)
    assert not torch.equal(tiled, whole)
    # The budget's tile (44) with the default overlap: trained decoders see less far than this
    # untrained one, so only most pixels are within two steps here.
    assert ((tiled - whole).abs() <= STEP).float().mean() > 0.99


def test_the_estimate_grows_with_pixels_batch_and_precision():
    vae = tiny_vae()
    one = decoder_peak_bytes(vae, (1, 4, 64, 64), torch.bfloat16)
    assert decoder_peak_bytes(vae, (1, 4, 128, 64), torch.bfloat16) == 2 * one
    assert decoder_peak_bytes(vae, (3, 4, 64, 64), torch.bfloat16) == 3 * one
    assert decoder_peak_bytes(vae, (1, 4, 64, 64), torch.float32) == 2 * one


def test_the_rule_keeps_a_1024_sdxl_decode_whole_and_tiles_a_2048_one():
    vae = SimpleNamespace(cfg=VAEConfig(scaling_factor=0.13025))  # the estimate reads only the config
    for dtype in (torch.bfloat16, torch.float32):
        assert not needs_tiles(vae, torch.empty(1, 4, 128, 128, dtype=dtype, device="meta"))
        assert needs_tiles(vae, torch.empty(1, 4, 256, 256, dtype=dtype, device="meta"))
    assert DEFAULT_BUDGET_BYTES == 6 * 2**30


def test_an_overlap_as_large_as_the_tile_is_refused():
    with pytest.raises(ValueError, match="overlap 32 must be under the tile 32"):
        tiled_decode(tiny_vae(), torch.randn(1, 4, 40, 40), tile=32, overlap=32)


def test_the_pipeline_decodes_in_tiles_past_the_budget(monkeypatch):
    pipe = diffuse.load_pipeline(DEFAULT_MODEL, dtype="float32")
    latents = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(5)) * 0.8
    whole = pipe.decode_latents(latents)
    calls = []
    real = vae_tiles.tiled_decode
    monkeypatch.setattr(vae_tiles, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(
        vae_tiles, "DEFAULT_BUDGET_BYTES", vae_tiles.decoder_peak_bytes(pipe.vae, (1, 4, 20, 20), torch.float32)
    )
    tiled = pipe.decode_latents(latents)
    assert calls, "over the budget the pipeline must decode in tiles"
    assert (tiled - whole).abs().max().item() * 127.5 <= 2.0
