"""diffuse.illustrate.figures_parts: each figure of the parts carries the numbers the networks compute.

The shipped model (in its own dtype) and the tiny random SD1 (epsilon) and SD2 (v-prediction)
pipelines of conftest: forward diffusion is sqrt(abar) x0 + sqrt(1 - abar) eps with the model's
own abar on the latent img2img would make, the training example's prediction is a plain UNet
call, the autoencoder's ratio and errors are what the pixels say, the UNet figure reads its
levels off the config, and the CLIP matrix tells matching pairs from mismatched ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffuse
from diffuse.illustrate.figures_parts import MAKERS
from diffuse.illustrate.figures_parts_autoencoder import compression_ratio, reconstruction_error, round_trip
from diffuse.illustrate.figures_parts_clip import clip_similarity
from diffuse.illustrate.figures_parts_common import PARTS_MAX_SIDE, parts_pixels, parts_size
from diffuse.illustrate.figures_parts_diffusion import forward_example, noised, training_examples
from diffuse.illustrate.figures_parts_unet import level_sizes, skip_pairs, unet, unet_blocks
from diffuse.illustrate.record import record
from diffuse.models.configs import SD1
from diffuse.models.unet import UNet
from diffuse.preview import to_pil
from diffuse.samplers.schedule import NoiseSchedule
from diffuse.shapes.data import DataConfig, ShapesDataset, render

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
PROMPT = "a red circle above a blue square on a white background"
ISSUE_ORDER = ["forward_diffusion", "noise_prediction", "autoencoder", "unet", "clip_similarity"]


@pytest.fixture(scope="module")
def shipped():
    pipe = diffuse.load_pipeline(DEFAULT_MODEL)
    return pipe, record(pipe, PROMPT, seed=7, steps=4, attention=False)


@pytest.fixture(scope="module")
def tiny(reference_folders):
    """The tiny SD1 and SD2 pipelines (float32) and a recorded 40x32 run of each."""
    pipes = {name: diffuse.load_pipeline(folder, dtype="float32") for name, folder in reference_folders.items()}
    return {
        name: (pipe, record(pipe, PROMPT, seed=3, steps=2, width=40, height=32, attention=False))
        for name, pipe in pipes.items()
    }


def schedule_from_file() -> NoiseSchedule:
    config = json.loads((DEFAULT_MODEL / "scheduler" / "scheduler_config.json").read_text())
    names = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return NoiseSchedule(**{name: config[name] for name in names})


# ---- forward diffusion --------------------------------------------------------------------------


def test_noised_is_the_forward_formula_with_the_models_abar(shipped):
    pipe, _ = shipped
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, 8, generator=generator), torch.randn(4, 8, 8, generator=generator)
    abar = schedule_from_file().alphas_cumprod()
    for t in (0, 1, 250, 999):
        assert torch.equal(noised(pipe, x0, t, eps), abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps)
    # The same slice as the reference library's DDPM scheduler adds.
    from diffusers import DDPMScheduler

    reference = DDPMScheduler.from_pretrained(DEFAULT_MODEL, subfolder="scheduler")
    added = reference.add_noise(x0[None], eps[None], torch.tensor([600]))[0]
    torch.testing.assert_close(noised(pipe, x0, 600, eps), added, rtol=0, atol=1e-6)


def test_forward_example_noises_the_latent_img2img_makes(shipped, tmp_path):
    pipe, rec = shipped
    ex = forward_example(pipe, rec)
    # x0: the VAE posterior sampled with the run's seed, times the scaling factor; then the noise from the same generator.
    pixels = parts_pixels(pipe, rec.image)
    generator = torch.Generator().manual_seed(rec.seed)
    with torch.no_grad():
        sample = pipe.vae.encode(pixels.to(pipe.dtype)).sample(generator).float()
    assert torch.equal(ex.x0, sample[0] * pipe.config.vae.scaling_factor)
    assert torch.equal(ex.noise, torch.randn((1, *ex.x0.shape), generator=generator)[0])
    abar = schedule_from_file().alphas_cumprod()
    assert ex.timesteps == [100, 300, 500, 700, 999]
    for t, alpha_bar, x in zip(ex.timesteps, ex.alpha_bars, ex.latents):
        assert alpha_bar == float(abar[t])
        assert torch.equal(x, abar[t].sqrt() * ex.x0 + (1 - abar[t]).sqrt() * ex.noise)
    fig = MAKERS["forward_diffusion"](pipe, rec, tmp_path)
    assert (tmp_path / fig.file).is_file() and fig.numbers["timesteps"] == ex.timesteps
    assert "t=999 (ᾱ=0.005)" in fig.caption and "4×8×8" in fig.caption


def test_parts_size_bounds_large_images(tiny):
    pipe, _ = tiny["sd1"]  # its VAE downsamples by 4
    assert parts_size(pipe, 40, 32) == (40, 32)
    assert parts_size(pipe, 512, 512) == (PARTS_MAX_SIDE, PARTS_MAX_SIDE)
    assert parts_size(pipe, 768, 512) == (256, 168)  # 512 / 3 = 170.7, down to a multiple of 4


# ---- the training example -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_training_example_is_a_plain_unet_call_on_the_models_target(tiny, style, tmp_path):
    pipe, rec = tiny[style]
    ex, examples = training_examples(pipe, rec)
    abar = pipe.get_sampler("Euler").schedule.alphas_cumprod()
    assert [e.timestep for e in examples] == [250, 750]
    for e in examples:
        a = abar[e.timestep]
        assert torch.equal(e.noisy, a.sqrt() * ex.x0 + (1 - a).sqrt() * ex.noise)
        with torch.no_grad():
            direct = pipe.unet(e.noisy[None], torch.tensor([e.timestep]), rec.text.output[None])[0]
        assert torch.equal(e.prediction, direct)
        # SD1's UNet predicts the noise; SD2's (here v-prediction) v = sqrt(abar) eps - sqrt(1 - abar) x0.
        target = ex.noise if style == "sd1" else a.sqrt() * ex.noise - (1 - a).sqrt() * ex.x0
        torch.testing.assert_close(e.target, target, rtol=0, atol=1e-6)
        assert e.mse == pytest.approx(float((direct - target).pow(2).mean()), rel=1e-5)
    fig = MAKERS["noise_prediction"](pipe, rec, tmp_path)
    assert (tmp_path / fig.file).is_file()
    assert fig.numbers["mse"] == [e.mse for e in examples]
    assert ("v-prediction" in fig.caption) == (style == "sd2")


def test_text_encoding_is_the_recorded_one(tiny):
    pipe, rec = tiny["sd1"]
    assert torch.equal(rec.text.output, pipe.encode_prompt(PROMPT)[0])


# ---- the autoencoder --------------------------------------------------------------------------------


def test_reconstruction_error_of_known_differences():
    pixels = np.random.default_rng(0).integers(20, 200, size=(16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert reconstruction_error(image, image) == (0.0, 100.0)
    brighter = Image.fromarray(pixels + 10)
    mean_abs, psnr = reconstruction_error(image, brighter)
    assert mean_abs == pytest.approx(10 / 255)
    assert psnr == pytest.approx(20 * math.log10(255 / 10))
    assert compression_ratio((3, 64, 64), (4, 8, 8)) == 48.0
    assert compression_ratio((3, 32, 40), (4, 8, 10)) == 12.0


def test_autoencoder_round_trip_numbers(shipped, tmp_path):
    pipe, rec = shipped
    trip = round_trip(pipe, rec.image)
    assert trip.original.size == rec.image.size == (64, 64)
    assert np.array_equal(np.asarray(trip.original), np.asarray(rec.image.convert("RGB")))
    with torch.no_grad():
        mean = pipe.vae.encode(parts_pixels(pipe, rec.image).to(pipe.dtype)).mean.float()
        rebuilt = to_pil(pipe.decode_latents(mean * pipe.config.vae.scaling_factor))[0]
    assert torch.equal(trip.latents, mean[0] * pipe.config.vae.scaling_factor)
    assert np.array_equal(np.asarray(trip.reconstruction), np.asarray(rebuilt))
    a, b = (np.asarray(im, dtype=np.float64) for im in (rec.image, rebuilt))
    assert trip.ratio == 64 * 64 * 3 / (4 * 8 * 8)
    assert trip.mean_abs_error == pytest.approx(np.abs(a - b).mean() / 255)
    assert trip.psnr_db == pytest.approx(10 * math.log10(255**2 / ((a - b) ** 2).mean()))
    # A picture of the shapes world the autoencoder was trained on comes back close (eval.json: 29.7 dB at worst).
    scene = ShapesDataset(DataConfig(seed=1000)).describe(0)[0]
    assert round_trip(pipe, render(scene)).psnr_db > 28
    fig = MAKERS["autoencoder"](pipe, rec, tmp_path)
    assert fig.numbers["compression_ratio"] == 48.0 and "48× fewer" in fig.caption
    assert f"PSNR {trip.psnr_db:.2f} dB" in fig.caption


# ---- the UNet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_unet_figure_lists_each_levels_channels_and_size(tiny, style, tmp_path):
    pipe, rec = tiny[style]
    cfg = pipe.unet.cfg
    fig = unet(pipe, rec, tmp_path)
    assert (tmp_path / fig.file).is_file()
    levels = fig.numbers["levels"]
    assert [row["channels"] for row in levels] == [cfg.model_channels * m for m in cfg.channel_mult] == [32, 64, 64]
    assert [row["latent_size"] for row in levels] == [[8, 10], [4, 5], [2, 3]]  # 32x40 pixels / 4, halved up
    assert [row["attention"] for row in levels] == list(cfg.attention_levels) == [True, True, False]
    for row in levels:
        size = f"{row['latent_size'][0]}×{row['latent_size'][1]}"
        assert f"level {row['level']}: {row['channels']} channels at {size}" in fig.caption
    modules = list(pipe.unet.modules())
    assert fig.numbers["resnet_blocks"] == sum(type(m).__name__ == "ResBlock" for m in modules)
    assert fig.numbers["attention_blocks"] == sum(type(m).__name__ == "SpatialTransformer" for m in modules)
    assert fig.numbers["skip_connections"] == len(pipe.unet.input_blocks)
    assert fig.numbers["context_shape"] == [77, cfg.context_dim]


def test_unet_blocks_of_sd15_size():
    """The SD 1.x UNet's structure, built on the meta device (no weights): 12 blocks down, 12 up."""
    with torch.device("meta"):
        network = UNet(SD1.unet)
    blocks = unet_blocks(network)
    down = [b for b in blocks if b.path == "in"]
    up = [b for b in blocks if b.path == "out"]
    assert len(down) == len(up) == 12
    assert [b.level for b in down] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [b.channels for b in down][2::3] == [320, 640, 1280, 1280]  # each level's last block
    assert sum(b.layers.count("attention") for b in blocks) == 16  # SD 1.x's 16 cross-attention layers
    assert all(blocks[i].level == blocks[j].level for i, j in skip_pairs(blocks))
    assert level_sizes(64, 64, 4) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert level_sizes(18, 14, 3) == [(18, 14), (9, 7), (5, 4)]


# ---- CLIP similarity --------------------------------------------------------------------------------


def test_clip_similarity_of_the_shipped_image_tower(shipped, tmp_path):
    pipe, rec = shipped
    fig = clip_similarity(pipe, rec, tmp_path)
    numbers = fig.numbers
    assert numbers["mode"] == "images_vs_captions" and len(numbers["captions"]) == 8
    matrix = np.array(numbers["matrix"])
    off = matrix[~np.eye(8, dtype=bool)]
    assert numbers["diagonal_mean"] > numbers["off_diagonal_mean"]
    assert np.diagonal(matrix).mean() == pytest.approx(numbers["diagonal_mean"], abs=1e-3)
    assert off.mean() == pytest.approx(numbers["off_diagonal_mean"], abs=1e-3)
    assert f"mean {numbers['diagonal_mean']:.3f}" in fig.caption


def test_clip_similarity_falls_back_to_captions(tiny, tmp_path):
    pipe, rec = tiny["sd2"]
    fig = clip_similarity(pipe, rec, tmp_path)
    assert fig.numbers["mode"] == "captions_vs_captions"
    assert fig.numbers["captions"][0] == PROMPT
    matrix = np.array(fig.numbers["matrix"])
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-4)
    np.testing.assert_allclose(np.diagonal(matrix), 1.0, atol=1e-4)
    assert "no CLIP image tower" in fig.caption


# ---- all of them ----------------------------------------------------------------------------------------


def test_makers_in_the_issues_order_write_their_figures(shipped, tmp_path):
    pipe, rec = shipped
    assert list(MAKERS) == ISSUE_ORDER
    for kind, maker in MAKERS.items():
        fig = maker(pipe, rec, tmp_path)
        assert fig.kind == kind
        with Image.open(tmp_path / fig.file) as image:
            assert image.width > 200
        assert 0 < len(fig.caption) < 700
        json.dumps(fig.as_json())
