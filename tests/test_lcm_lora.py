"""The LCM-LoRA path against diffusers 0.42: the LCM sampler with a LoRA named in the prompt.

An LCM-LoRA (Luo et al. 2023) is an ordinary kohya LoRA over the UNet (attention, feed-forward,
proj_in/out and the ResNet, time-embedding, down- and upsampling convolutions) that people run
with the LCM sampler for 4-8 steps at guidance 1-2. Here a random one of that shape, in a LoRA
folder, is applied by `<lora:lcm:1>` through load_pipeline(lora_dirs=...); diffusers runs
LCMScheduler with load_lora_weights + fuse_lora (and once unfused, through set_adapters). The
images must agree within 2/255, and at guidance 1.0 neither side may run the unconditional pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffuse

PIXEL_TOL = 2  # out of 255
SIZE = 32  # pixels; 8x8 latents on the tiny models
PROMPT = "a red circle above a blue square"
SEED = 21

# The modules the LCM-LoRA training script adapts (diffusers names); the tiny UNet has each kind.
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def lcm_shaped_lora(unet: torch.nn.Module, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random kohya LoRA over a diffusers UNet's LCM-LoRA modules (UNet only, as LCM-LoRA files are)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, layer.in_features, generator=generator)
            up = torch.randn(layer.out_features, rank, generator=generator)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down * 0.15, up * 0.15
        state[f"{key}.alpha"] = torch.tensor(rank * 1.5)  # alpha != rank: the scale is exercised
    return state


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory, reference_pipes) -> dict:
    """One LCM-shaped LoRA file per style, each in its own folder named `lcm`."""
    folders = {}
    for style, reference in reference_pipes.items():
        folder = tmp_path_factory.mktemp(f"lcm_lora_{style}")
        save_file(lcm_shaped_lora(reference.unet, seed=len(folders)), folder / "lcm.safetensors")
        folders[style] = folder
    return folders


def diffusers_lcm(folder, lora_file, fuse: bool):
    """A fresh diffusers pipeline (the shared reference must stay unmerged) with LCMScheduler and the LoRA."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="lcm")
    if fuse:
        pipe.fuse_lora(lora_scale=1.0, adapter_names=["lcm"])
    else:
        pipe.set_adapters(["lcm"], adapter_weights=[1.0])
    return pipe


@pytest.fixture(scope="module")
def references(reference_folders, lora_folder) -> dict:
    return {
        style: diffusers_lcm(reference_folders[style], lora_folder[style] / "lcm.safetensors", fuse=True)
        for style in reference_folders
    }


@pytest.fixture(scope="module")
def ours(reference_folders, lora_folder) -> dict:
    return {
        style: diffuse.load_pipeline(folder, dtype="float32", lora_dirs=[lora_folder[style]])
        for style, folder in reference_folders.items()
    }


class UNetBatches:
    """The batch size of every UNet call, from a forward pre-hook (the latents are the first argument)."""

    def __init__(self, unet: torch.nn.Module):
        self.sizes: list[int] = []
        self.unet = unet

    def __enter__(self) -> UNetBatches:
        self.handle = self.unet.register_forward_pre_hook(lambda _, args: self.sizes.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def reference_images(pipe, steps: int, guidance: float) -> tuple[np.ndarray, list[int]]:
    with UNetBatches(pipe.unet) as batches:
        images = pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images
    return pixels(images), batches.sizes


def our_images(pipe, prompt: str, steps: int, guidance: float) -> tuple[np.ndarray, list[int]]:
    with UNetBatches(pipe.unet) as batches:
        result = pipe.txt2img(
            prompt, steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE, sampler="LCM", seed=SEED
        )
    return pixels(result.images), batches.sizes


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@pytest.mark.parametrize("steps", [4, 8])
def test_lcm_with_a_lora_tag_matches_diffusers_lcm_lora(style, steps, guidance, ours, references):
    expected, their_batches = reference_images(references[style], steps, guidance)
    got, our_batches = our_images(ours[style], f"{PROMPT} <lora:lcm:1>", steps, guidance)
    # Guidance 1.0 is no guidance: one conditional pass per step on both sides; 2.0 batches both passes.
    passes = 1 if guidance == 1.0 else 2
    assert their_batches == [passes] * steps, f"diffusers' UNet batches {their_batches}"
    assert our_batches == [passes] * steps, f"our UNet batches {our_batches}"
    diff = np.abs(got - expected).max()
    assert diff <= PIXEL_TOL, f"{style}, {steps} steps, guidance {guidance}: max pixel difference {diff}/255"
    # The tolerance means something: the same run without the LoRA is far from diffusers' LoRA image,
    # and the LoRA has not driven the image into clipped values, where any two runs would agree.
    without, _ = our_images(ours[style], PROMPT, steps, guidance)
    assert np.abs(without - expected).mean() > 8 * PIXEL_TOL
    assert ((expected == 0) | (expected == 255)).mean() < 0.25


def test_lcm_lora_unfused_adapters_match_too(reference_folders, lora_folder, ours):
    """diffusers' LoRA kept beside the weights (PEFT layers, set_adapters at 1.0) gives the same image
    as merging it, so ours matches that path as well."""
    reference = diffusers_lcm(reference_folders["sd1"], lora_folder["sd1"] / "lcm.safetensors", fuse=False)
    expected, _ = reference_images(reference, 4, 1.0)
    got, _ = our_images(ours["sd1"], f"{PROMPT} <lora:lcm:1>", 4, 1.0)
    diff = np.abs(got - expected).max()
    assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255"


def test_the_lora_is_taken_off_after_the_lcm_run(reference_pipes, ours):
    """An LCM run without the tag, after one with it, is diffusers' plain LCM image (the merge restored)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    ours["sd1"].txt2img(f"{PROMPT} <lora:lcm:1>", steps=4, guidance_scale=1.0, width=SIZE, height=SIZE, sampler="LCM")
    base = reference_pipes["sd1"]
    plain = StableDiffusionPipeline(**{**base.components, "scheduler": LCMScheduler.from_config(base.scheduler.config)})
    expected, _ = reference_images(plain, 4, 1.0)
    got, _ = our_images(ours["sd1"], PROMPT, 4, 1.0)
    diff = np.abs(got - expected).max()
    assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255"
