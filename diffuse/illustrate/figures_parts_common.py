"""What the figures of the parts share: the picture they start from, the VAE both ways, the
model's own noise schedule, and latents drawn as heat maps.

The parts are shown on the run's final image at most PARTS_MAX_SIDE pixels on its longer
side: for the shipped model (64x64) that is the image itself, for an SD 1.5-size run a
quarter of the pixels, which keeps each extra VAE and UNet pass a small share of the run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffuse import inputs
from diffuse.generation import draw_noise
from diffuse.pipeline import Pipeline
from diffuse.preview import to_pil

PARTS_MAX_SIDE = 256  # pixels: the longer side the parts' figures work at


def parts_size(pipe: Pipeline, width: int, height: int) -> tuple[int, int]:
    """(width, height) scaled down to at most PARTS_MAX_SIDE on the longer side, multiples of the VAE's factor."""
    factor = pipe.config.vae.downsample_factor
    scale = min(1.0, PARTS_MAX_SIDE / max(width, height))
    return tuple(max(factor, int(side * scale) // factor * factor) for side in (width, height))


def parts_pixels(pipe: Pipeline, image: Image.Image) -> Tensor:
    """The image the parts are shown on, as the VAE encoder's input: [1, 3, H, W] in [-1, 1]."""
    return inputs.image_to_tensor(image, *parts_size(pipe, *image.size))


@torch.no_grad()
def encode_with_noise(pipe: Pipeline, pixels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(x0, noise), each [C, h, w] float32: the latent img2img makes of `pixels` with `seed` (a posterior
    sample times the scaling factor) and the standard-normal noise drawn next from the same generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    x0 = pipe.encode_posterior(pixels).sample(generator).float().cpu() * pipe.config.vae.scaling_factor
    noise = draw_noise([generator], tuple(x0.shape[1:]), torch.device("cpu"))
    return x0[0], noise[0]


@torch.no_grad()
def decode(pipe: Pipeline, latents: Tensor) -> list[Image.Image]:
    """Latents [B, C, h, w] in the UNet's scale -> 8-bit images, through the pipeline's own decode."""
    return [to_pil(pipe.decode_latents(latents[i : i + 1].to(pipe.device)))[0] for i in range(len(latents))]


def channel_strip(latents: Tensor) -> np.ndarray:
    """A latent [C, h, w] as one [h, C*w + C - 1] array, channels side by side, NaN columns between them."""
    channels, h, w = latents.shape
    strip = np.full((h, channels * (w + 1) - 1), np.nan, dtype=np.float32)
    for c in range(channels):
        strip[:, c * (w + 1) : c * (w + 1) + w] = latents[c].float().numpy()
    return strip


def show_strip(ax, latents: Tensor, title: str, limit: float | None = None, cmap: str = "RdBu_r"):
    """Draw a latent's channels side by side as a heat map, symmetric around 0 unless `cmap` is one-sided."""
    strip = channel_strip(latents)
    limit = limit if limit is not None else float(np.nanmax(np.abs(strip))) or 1.0
    low = -limit if cmap == "RdBu_r" else 0.0
    shown = ax.imshow(strip, cmap=cmap, vmin=low, vmax=limit, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def show_image(ax, image: Image.Image, title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error on pixels in [0, 1]; 100 dB at most, so a perfect copy stays finite."""
    return 10 * math.log10(1 / max(mse, 1e-10))


def shape_text(shape) -> str:
    return "×".join(str(int(s)) for s in shape)
