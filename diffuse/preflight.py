"""A generation command line checked before the model loads.

Loading an SD checkpoint takes seconds to minutes; a typo in a flag should cost none of it.
Everything that needs no model is checked here, each failure one line naming the option:
sizes (a multiple of 8, within inputs.MAX_SIDE), steps, guidance, strength, eta, batch size,
every image's seed (n_iter batches included), the sampler's name and schedule type, clip skip,
the speed-ups, the device and dtype, the input image and the mask, and the output folders. What
needs the model (its own downsampling factor, its text encoder's depth) the pipeline checks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from PIL import Image

from diffuse import inputs
from diffuse.runtime import resolve_device, resolve_dtype
from diffuse.samplers import get_sampler
from diffuse.speedups import Speedups

SIZE_MULTIPLE = 8  # Stable Diffusion's autoencoder downsamples 8x
OPTION_NAMES = {
    "width": "-W/--width",
    "height": "-H/--height",
    "steps": "--steps",
    "guidance_scale": "--cfg-scale",
    "batch_size": "--batch-size",
    "strength": "--strength",
    "eta": "--eta",
}


@dataclass
class Checked:
    """What the checks produced, so nothing is opened or decided twice."""

    seed: int  # the first image's seed (a random pick resolved now, with room for every image)
    speedups: Speedups
    device: torch.device
    dtype: torch.dtype
    image: Image.Image | None = None
    mask: Image.Image | None = None


def _option(name: str, check, *args):
    """Run one check, naming the command-line option in its message."""
    try:
        return check(*args)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def check_generation_args(args: argparse.Namespace) -> Checked:
    """Every txt2img / img2img / inpaint option that needs no model; ValueError on the first bad one."""
    kind = args.command
    inputs.prompt_list(args.prompt, "prompt")
    inputs.prompt_list(args.negative_prompt, "negative prompt (-n)")
    strength = getattr(args, "strength", 1.0)
    inputs.check_settings(
        args.width,
        args.height,
        args.steps,
        args.cfg_scale,
        args.batch_size,
        strength,
        args.eta,
        SIZE_MULTIPLE,
        names=OPTION_NAMES,
    )
    seed = _option("--seed", inputs.resolve_seed, args.seed, args.batch_size * args.n_iter)
    get_sampler(args.sampler, schedule_type=args.schedule_type, eta=args.eta)
    if args.clip_skip < 1:
        raise ValueError(f"--clip-skip must be 1 or more (1: the text encoder's last layer), got {args.clip_skip}")
    speedups = Speedups(
        guidance_cutoff=args.guidance_cutoff,
        deep_cache_interval=args.deep_cache,
        deep_cache_depth=args.deep_cache_depth,
        token_merging=args.token_merging,
    )
    device = resolve_device(args.device)
    dtype = _option("--dtype", resolve_dtype, args.dtype, device)
    inputs.check_output_folder(args.out, "--out")
    if args.save_steps is not None:
        inputs.check_output_folder(args.save_steps, "--save-steps")
    checked = Checked(seed=seed, speedups=speedups, device=device, dtype=dtype)
    if kind != "txt2img":
        checked.image = inputs.open_image(args.image, what="--image")
    if kind == "inpaint":
        checked.mask = inputs.open_image(args.mask, what="--mask")
        inputs.check_mask_matches(checked.image, checked.mask)
    return checked
