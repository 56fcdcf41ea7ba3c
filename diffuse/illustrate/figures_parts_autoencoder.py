"""The autoencoder's round trip: image -> latent channels -> reconstruction.

Diffusion runs in the VAE's latent space because it is small: the compression ratio is
the image's numbers (pixels x 3 colours) over the latent's. The reconstruction error says
what the trip costs: the decoder of the encoder's posterior mean, as diffuse eval measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffuse.illustrate.figure import Figure, pyplot, save
from diffuse.illustrate.figures_parts_common import decode, parts_pixels, psnr_db, shape_text, show_image
from diffuse.illustrate.recording import Recording
from diffuse.pipeline import Pipeline
from diffuse.preview import to_pil


def compression_ratio(image_shape: tuple[int, ...], latent_shape: tuple[int, ...]) -> float:
    """Numbers in the image [3, H, W] over numbers in the latent [C, h, w]."""
    return float(np.prod(image_shape)) / float(np.prod(latent_shape))


def reconstruction_error(original: Image.Image, rebuilt: Image.Image) -> tuple[float, float]:
    """(mean absolute error / 255, PSNR in dB) between two 8-bit RGB images of one size."""
    a = np.asarray(original.convert("RGB"), dtype=np.float64)
    b = np.asarray(rebuilt.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape} and {b.shape}")
    difference = (a - b) / 255.0
    return float(np.abs(difference).mean()), psnr_db(float((difference**2).mean()))


@dataclass
class RoundTrip:
    original: Image.Image  # the picture encoded, 8-bit
    latents: Tensor  # [C, h, w] the posterior mean in the UNet's scale
    reconstruction: Image.Image
    ratio: float
    mean_abs_error: float  # over 8-bit pixels, / 255
    psnr_db: float


@torch.no_grad()
def round_trip(pipe: Pipeline, image: Image.Image) -> RoundTrip:
    """`image` (at the parts' size) through the encoder's posterior mean and back through the decoder."""
    pixels = parts_pixels(pipe, image)
    original = to_pil(pixels)[0]
    latents = pipe.encode_posterior(pixels).mean.float().cpu() * pipe.config.vae.scaling_factor
    rebuilt = decode(pipe, latents)[0]
    mean_abs, psnr = reconstruction_error(original, rebuilt)
    ratio = compression_ratio(tuple(pixels.shape[1:]), tuple(latents.shape[1:]))
    return RoundTrip(original, latents[0], rebuilt, ratio, mean_abs, psnr)


def autoencoder(pipe: Pipeline, rec: Recording, out: Path) -> Figure:
    trip = round_trip(pipe, rec.image)
    channels = trip.latents.shape[0]
    grid = int(np.ceil(np.sqrt(channels)))  # the channels as a square block of small maps
    fig = pyplot.figure(figsize=(2.2 * (grid + 3), 2.6))
    spec = fig.add_gridspec(grid, grid + 3, width_ratios=[grid] + [1] * grid + [grid, grid], hspace=0.3)
    show_image(fig.add_subplot(spec[:, 0]), trip.original, f"image 3×{trip.original.height}×{trip.original.width}")
    limit = float(trip.latents.abs().max()) or 1.0
    for c in range(channels):
        ax = fig.add_subplot(spec[c // grid, 1 + c % grid])
        ax.imshow(trip.latents[c].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"latent channel {c}" if c == 0 else f"channel {c}", fontsize=7, pad=2)
        ax.axis("off")
    show_image(fig.add_subplot(spec[:, grid + 1]), trip.reconstruction, "decoded")
    difference = np.abs(
        np.asarray(trip.original, dtype=np.float32) - np.asarray(trip.reconstruction, dtype=np.float32)
    ).mean(axis=2)
    ax = fig.add_subplot(spec[:, grid + 2])
    shown = ax.imshow(difference, cmap="magma", vmin=0, vmax=max(float(difference.max()), 1.0))
    fig.colorbar(shown, ax=ax, fraction=0.046, label="|difference| (of 255)")
    ax.axis("off")
    fig.suptitle(
        f"The autoencoder: image → {shape_text(trip.latents.shape)} latent ({trip.ratio:g}× fewer numbers) → image",
        fontsize=9,
        y=1.04,
    )
    name = save(fig, out, "autoencoder.png")
    w, h = trip.original.size
    caption = (
        f"The {w}×{h} image (3×{h}×{w} = {3 * w * h} numbers) encoded into a "
        f"{shape_text(trip.latents.shape)} latent ({trip.latents.numel()} numbers, {trip.ratio:g}× fewer; each "
        f"channel a heat map) and decoded back from the posterior mean: mean absolute error "
        f"{trip.mean_abs_error:.4f} of the pixel range, PSNR {trip.psnr_db:.2f} dB."
    )
    numbers = {
        "image_shape": [3, h, w],
        "latent_shape": list(trip.latents.shape),
        "compression_ratio": trip.ratio,
        "mean_abs_error": trip.mean_abs_error,
        "psnr_db": trip.psnr_db,
    }
    return Figure("autoencoder", name, caption, numbers)
