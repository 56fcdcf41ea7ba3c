"""Checking and preparing what a user asks for, before any heavy work starts.

Every generation request passes through here first: a bad size, step count,
strength, seed, image or mask fails with a message that says what was wrong,
before a text encoder runs or a latent is allocated.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_SIDE = 2048  # pixels; larger images need far more memory than a CPU machine has for attention
MAX_STEPS = 1000  # the training schedule has 1000 timesteps; more sampling steps visit nothing new
MAX_BATCH = 64
MAX_PROMPT_CHARS = 20_000  # about 100 chunks of 75 tokens: far past any sensible prompt
MAX_SEED = 2**32 - 1  # A1111 seeds are 32-bit; seed + i must stay a valid torch seed


def check_size(width: int, height: int, multiple: int = 8) -> None:
    check_side("width", width, multiple)
    check_side("height", height, multiple)


def check_side(name: str, value: int, multiple: int = 8) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
    if value < multiple or value > MAX_SIDE:
        raise ValueError(f"{name} must be between {multiple} and {MAX_SIDE} pixels, got {value}")
    if value % multiple:
        raise ValueError(f"{name} must be a multiple of {multiple} (the autoencoder's downsampling), got {value}")


def check_steps(steps: int, name: str = "steps") -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_STEPS}, got {steps!r}")


def check_number(name: str, value: float, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be a number from {low} to {high}, got {value!r}")
    return float(value)


def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")


def check_clip_skip(clip_skip: int, layers: int) -> None:
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= layers:
        raise ValueError(
            f"clip_skip must be an integer from 1 to {layers} (the text encoder's layers), got {clip_skip!r}"
        )


def prompt_list(prompt: str | list[str], name: str, count: int | None = None) -> list[str]:
    """A prompt or a list of prompts, checked; a single prompt is repeated `count` times."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    for p in prompts:
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name} is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if count is not None and len(prompts) not in (1, count):
        raise ValueError(f"{name} has {len(prompts)} entries but there are {count} prompts")
    return list(prompts) * (count // len(prompts)) if count else list(prompts)


def resolve_seed(seed: int | None, count: int = 1) -> int:
    """The first seed of `count` images (image i uses seed + i); None or -1 picks one at random.

    Every image's seed stays in A1111's range 0..MAX_SEED, so each can be typed back in: a
    random pick leaves room for all `count`, and an explicit seed whose last image would pass
    MAX_SEED is refused.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"the number of images must be a positive integer, got {count!r}")
    if count > MAX_SEED:
        raise ValueError(f"{count} images cannot each have their own seed (the most is {MAX_SEED})")
    if seed is None or seed == -1:
        return random.randrange(MAX_SEED - count + 2)  # 0 .. MAX_SEED - count + 1
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, or -1/None for a random one, got {seed!r}")
    if seed + count - 1 > MAX_SEED:
        raise ValueError(
            f"seed {seed} with {count} images would give the last one seed {seed + count - 1}, past "
            f"{MAX_SEED}; use a seed from 0 to {MAX_SEED - count + 1}"
        )
    return seed


def open_image(image: Image.Image | str | Path, what: str = "image") -> Image.Image:
    """A PIL image or a path to one, fully decoded now so a broken file fails here."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise ValueError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    path = Path(image).expanduser()
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def default_size(image: Image.Image, multiple: int = 8) -> tuple[int, int]:
    """An input image's own size, rounded down to the autoencoder's multiple (as diffusers does)."""
    w, h = (max(multiple, s - s % multiple) for s in image.size)
    return w, h


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB pixels in [-1, 1], [1, 3, H, W]: the VAE encoder's input range."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (pixels.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).contiguous()


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Inpainting mask as {0, 1} floats, [1, 1, H, W]: white (≥ 50%) means "paint here"."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return (values >= 0.5).to(torch.float32)[None, None]


def check_mask_matches(image: Image.Image, mask: Image.Image) -> None:
    if image.size != mask.size:
        raise ValueError(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
            "they must be the same size"
        )


def check_settings(
    width: int | None,
    height: int | None,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    strength: float = 1.0,
    eta: float | None = None,
    multiple: int = 8,
    names: dict[str, str] | None = None,
) -> None:
    """The checks every request needs and none of which needs a model (None sizes: decided later).

    `names` renames the fields in the messages to what the caller's user typed (a command
    line's options, a PNG's labels): keys width, height, steps, guidance_scale, batch_size,
    strength, eta.
    """

    def name(key: str) -> str:
        return (names or {}).get(key, key)

    for key, value in (("width", width), ("height", height)):
        if value is not None:
            check_side(name(key), value, multiple)
    check_steps(steps, name("steps"))
    check_number(name("guidance_scale"), guidance_scale, 0.0, 100.0)
    check_number(name("strength"), strength, 0.0, 1.0)
    check_batch_size(batch_size, name("batch_size"))
    if eta is not None:
        check_number(name("eta"), eta, 0.0, 1.0)
    if int(steps * strength) < 1:
        raise ValueError(
            f"{name('strength')} {strength} of {steps} {name('steps')} leaves no denoising step "
            f"(int(steps x strength) = 0); raise the strength or the steps"
        )


def check_output_folder(folder: str | Path, what: str = "output folder") -> None:
    """A folder that exists and can be written to, or that can be created: checked, not created."""
    path = Path(folder).expanduser()
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {existing} is not writable")


def image_sha256(pixels: torch.Tensor) -> str:
    """sha256 of an input image as the model saw it: the 8-bit RGB bytes, row by row, of the
    [1, 3, H, W] tensor image_to_tensor made (for an image used at its own size, the sha256 of
    its RGB pixels as Pillow's tobytes() gives them)."""
    levels = ((pixels[0].permute(1, 2, 0).double() + 1.0) * 127.5).round().clamp(0, 255)
    return hashlib.sha256(levels.to(torch.uint8).numpy().tobytes()).hexdigest()


def mask_sha256(mask: torch.Tensor) -> str:
    """sha256 of an inpainting mask as the model saw it: 255 where it repaints, 0 elsewhere, one
    byte per pixel, row by row (the [1, 1, H, W] tensor mask_to_tensor made)."""
    return hashlib.sha256((mask[0, 0] * 255).to(torch.uint8).numpy().tobytes()).hexdigest()
