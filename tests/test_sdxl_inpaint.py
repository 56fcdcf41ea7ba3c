"""SDXL's 9-channel inpainting UNet against diffusers' StableDiffusionXLInpaintPipeline.

The tiny SDXL base of test_sdxl_pipeline with a UNet that reads 9 channels: the noisy latents,
the mask at latent size and the masked image's latents. Loaded from the diffusers folder and
from an original single file, it is found from the UNet's conv_in weight, as SD 1/2's are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_sdxl_pipeline import NEGATIVE, PROMPT, SIZE, STEPS, assert_same_images, build_sdxl_reference, picture

import diffuse


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory, clip_vocab_dir):
    folder = tmp_path_factory.mktemp("tiny_sdxl_inpaint")
    build_sdxl_reference(clip_vocab_dir, seed=2, in_channels=9).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(inpaint_folder):
    from diffusers import StableDiffusionXLInpaintPipeline

    return StableDiffusionXLInpaintPipeline.from_pretrained(inpaint_folder, add_watermarker=False).to(torch.float32)


@pytest.fixture(scope="module")
def ours(inpaint_folder):
    return diffuse.load_pipeline(inpaint_folder, dtype="float32")


def mask_picture() -> Image.Image:
    """White (paint here) over a rectangle off the middle, so a flipped mask shows."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:40, 20:60] = 255
    return Image.fromarray(mask, mode="L")


def test_a_9_channel_sdxl_unet_is_found_from_its_weights(ours):
    assert ours.is_xl and ours.config.unet.in_channels == 9
    assert ours.unet.state_dict()["input_blocks.0.0.weight"].shape[1] == 9


@pytest.mark.parametrize("strength, negative", [(1.0, NEGATIVE), (0.6, "")], ids=["full-negative", "partial"])
def test_inpaint_matches_diffusers(strength, negative, ours, reference):
    """Mask and masked image's latents as diffusers prepares them; from pure noise at full strength
    (no image latents drawn), from the image plus the noise slice below it."""
    expected = reference(
        PROMPT,
        image=picture(),
        mask_image=mask_picture(),
        negative_prompt=negative or None,
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images
    result = ours.inpaint(
        picture(),
        mask_picture(),
        PROMPT,
        negative_prompt=negative,
        strength=strength,
        steps=STEPS,
        guidance_scale=5.0,
        sampler="Euler",
        seed=11,
        keep_unmasked=False,
    )
    assert_same_images(result.images, expected)


def test_a_folder_whose_config_disagrees_with_conv_in_is_refused_naming_the_tensor(inpaint_folder, tmp_path):
    """diffusers would not load it either: the UNet's config says 4 in-channels, its conv_in holds 9."""
    import json
    import shutil

    from diffuse.checkpoints.errors import CheckpointError

    folder = tmp_path / "disagrees"
    shutil.copytree(inpaint_folder, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 4}))
    with pytest.raises(CheckpointError, match=r"unet: tensor input_blocks.0.0.weight has shape \(2, 9, 3, 3\)"):
        diffuse.load_pipeline(folder, dtype="float32")


@pytest.fixture(scope="module")
def inpaint_file(tmp_path_factory):
    """A small SDXL base single file (64-channel heads, as single-file detection assumes) whose
    UNet reads 9 channels."""
    from dataclasses import replace

    from test_sdxl_networks import perturb, tiny_xl_networks

    from diffuse.checkpoints import single_file
    from diffuse.models.unet import UNet

    networks = tiny_xl_networks()
    networks["unet"] = UNet(replace(networks["unet"].cfg, in_channels=9))
    perturb(networks["unet"], 9)
    states = {name: module.state_dict() for name, module in networks.items()}
    path = tmp_path_factory.mktemp("single") / "tiny_xl_inpaint.safetensors"
    return single_file.save_single_file(single_file.join_single_file("sdxl", **states), path)


def test_a_9_channel_sdxl_single_file_is_found_and_converts_to_diffusers_inpainting_folder(
    inpaint_file, tmp_path, capsys
):
    """From conv_in's shape in the original layout; `diffuse info` says what it is; converted, it
    is diffusers' SDXL inpainting pipeline, which diffuse reads back as it was."""
    import json
    from dataclasses import replace

    from diffuse.checkpoints.export import save_diffusers_folder
    from diffuse.cli import main

    pipe = diffuse.load_pipeline(inpaint_file, dtype="float32")
    assert pipe.is_xl and pipe.config.unet.in_channels == 9
    assert main(["info", str(inpaint_file), "--dtype", "float32"]) == 0
    assert "9 in-channels (inpainting: latents, mask, masked image)" in capsys.readouterr().out
    folder = save_diffusers_folder(pipe, tmp_path / "converted")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == 9
    assert diffuse.load_pipeline(folder, dtype="float32").config == replace(pipe.config, name="converted")
