"""Previews of the image emerging: tensor → PIL exactly as diffusers, cheap latent → RGB,
filmstrips, step recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.metadata import read_parameters
from diffuse.preview import (
    GAP,
    SD_LATENT_RGB,
    StepRecorder,
    filmstrip,
    fit_preview_matrix,
    latents_to_rgb_cheap,
    to_pil,
)

# ---- to_pil ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_to_pil_matches_diffusers_postprocess_bit_for_bit(dtype):
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    images = (torch.randn(3, 3, 37, 29, generator=generator) * 0.8).to(dtype)
    # Values whose ×255 lands near .5, where a different rounding would show.
    images[0, 0, 0, :20] = (torch.arange(20) + 0.5) / 255 * 2 - 1
    ours = np.stack([np.asarray(im) for im in to_pil(images)])
    theirs = np.stack([np.asarray(im) for im in VaeImageProcessor().postprocess(images, output_type="pil")])
    assert ours.dtype == theirs.dtype == np.uint8
    assert np.array_equal(ours, theirs)


def test_to_pil_grayscale_and_bad_shapes():
    gray = to_pil(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2))[0]
    assert gray.mode == "L" and list(np.asarray(gray).ravel()) == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_pil(torch.zeros(3, 8, 8))


# ---- cheap preview -----------------------------------------------------------------------------


def test_cheap_preview_is_a1111s_linear_map_in_unit_range():
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1)) * 3
    rgb = latents_to_rgb_cheap(latents)
    assert rgb.shape == (2, 3, 5, 7) and rgb.min() >= 0 and rgb.max() <= 1
    one = torch.zeros(1, 4, 1, 1)
    one[0, 0] = 1.0  # a pure first channel shows the first row of A1111's table
    assert torch.allclose(latents_to_rgb_cheap(one).view(3), torch.tensor([0.298, 0.207, 0.208]) * 0.5 + 0.5)
    assert torch.allclose(latents_to_rgb_cheap(torch.zeros(1, 4, 2, 2)), torch.full((1, 3, 2, 2), 0.5))


def test_custom_matrix_with_bias_and_shape_errors():
    latents = torch.ones(1, 2, 3, 3)
    matrix = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.2, 0.1], [0.4, 0.0, -0.5]])  # 2 channels + bias
    expected = (torch.tensor([0.5, 0.0, -0.1]) * 0.5 + 0.5).view(1, 3, 1, 1).expand(1, 3, 3, 3)
    assert torch.allclose(latents_to_rgb_cheap(latents, matrix), expected)
    with pytest.raises(ValueError, match="preview matrix"):
        latents_to_rgb_cheap(latents, SD_LATENT_RGB)  # a 4-channel table for 2-channel latents


def test_fit_preview_matrix_recovers_a_known_matrix():
    generator = torch.Generator().manual_seed(2)
    true = torch.randn(5, 3, generator=generator) * 0.3  # 4 channels + a bias row
    latents = torch.randn(3, 4, 6, 5, generator=generator)
    small = torch.einsum("bchw,cr->brhw", latents, true[:4]) + true[4].view(1, 3, 1, 1)
    images = small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # the "decoded" size, 8× larger
    fitted = fit_preview_matrix(latents, images)
    assert fitted.shape == (5, 3)
    assert (fitted - true).abs().max() < 1e-5
    no_bias = fit_preview_matrix(latents, images - true[4].view(1, 3, 1, 1), bias=False)
    assert no_bias.shape == (4, 3) and (no_bias - true[:4]).abs().max() < 1e-5
    assert torch.allclose(latents_to_rgb_cheap(latents, fitted), (small * 0.5 + 0.5).clamp(0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        fit_preview_matrix(latents, images[..., :-3])


# ---- filmstrip ---------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def frames(size=(16, 12)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in COLOURS]


def test_filmstrip_grid_layout():
    sheet = filmstrip(frames(), columns=3)
    assert sheet.size == (3 * 16 + 2 * GAP, 2 * 12 + GAP)
    for i, colour in enumerate(COLOURS):
        x, y = (i % 3) * (16 + GAP), (i // 3) * (12 + GAP)
        assert sheet.getpixel((x, y)) == colour and sheet.getpixel((x + 15, y + 11)) == colour
    assert sheet.getpixel((16, 0)) == (255, 255, 255)  # the gap
    assert sheet.getpixel((2 * (16 + GAP), 12 + GAP)) == (255, 255, 255)  # the empty sixth cell


def test_filmstrip_defaults_to_one_strip_and_labels_go_underneath():
    sheet = filmstrip(frames(), labels=[f"step {i + 1}" for i in range(5)])
    assert sheet.width == 5 * 16 + 4 * GAP
    band = np.asarray(sheet)[12:, :16]  # under the first frame
    assert sheet.height > 12 + 8 and band.min() < 128  # a label band holding dark text
    assert sheet.getpixel((0, 0)) == COLOURS[0]


def test_filmstrip_wraps_or_shrinks_to_max_width():
    big = frames((100, 50))
    assert filmstrip(big, max_width=250).size == (2 * 100 + GAP, 3 * 50 + 2 * GAP)
    squeezed = filmstrip(big, columns=5, max_width=200)
    assert squeezed.width <= 200 and squeezed.height < 50
    with pytest.raises(ValueError, match="labels"):
        filmstrip(big, labels=["only one"])


# ---- step recording ----------------------------------------------------------------------------


def cheap_decode(latents: torch.Tensor) -> list[Image.Image]:
    return to_pil(latents_to_rgb_cheap(latents) * 2 - 1)


def test_step_recorder_writes_every_step_and_a_filmstrip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    steps = [torch.randn(1, 4, 6, 8, generator=generator) for _ in range(4)]
    recorder = StepRecorder(tmp_path / "steps", decode=cheap_decode)
    for i, latents in enumerate(steps):
        recorder(i, 999.0 - 250 * i, latents)
    strip = recorder.finish()
    assert strip == tmp_path / "steps" / "filmstrip.png"
    assert sorted(p.name for p in strip.parent.iterdir()) == [
        "filmstrip.png",
        "step_000.png",
        "step_001.png",
        "step_002.png",
        "step_003.png",
    ]
    for i, latents in enumerate(steps):
        saved = np.asarray(Image.open(tmp_path / "steps" / f"step_{i:03d}.png"))
        assert np.array_equal(saved, np.asarray(cheap_decode(latents)[0]))
    with Image.open(strip) as image:
        assert image.width == 4 * 8 + 3 * GAP and image.height > 6
        assert read_parameters(image) is None


def test_step_recorder_every_n_still_ends_on_the_last_step_and_joins_a_batch(tmp_path):
    recorder = StepRecorder(tmp_path, decode=cheap_decode, every=2)
    for i in range(6):
        recorder(i, float(i), torch.zeros(2, 4, 3, 5))
    recorder.finish()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["filmstrip.png", "step_000.png", "step_002.png", "step_004.png", "step_005.png"]
    assert Image.open(tmp_path / "step_005.png").size == (2 * 5 + GAP, 3)


def test_step_recorder_errors(tmp_path):
    with pytest.raises(ValueError, match="every"):
        StepRecorder(tmp_path, decode=cheap_decode, every=0)
    with pytest.raises(ValueError, match="no steps"):
        StepRecorder(tmp_path, decode=cheap_decode).finish()
