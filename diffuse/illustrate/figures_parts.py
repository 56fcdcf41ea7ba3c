"""The figures of the parts: each network shown doing its own job, on this run's image and prompt.

forward_diffusion and noise_prediction (figures_parts_diffusion), autoencoder
(figures_parts_autoencoder), unet (figures_parts_unet), clip_similarity (figures_parts_clip);
each maker is maker(pipe, rec, out) -> Figure and writes its image into the report folder `out`.
"""

from __future__ import annotations

from collections.abc import Callable

from diffuse.illustrate.figures_parts_autoencoder import autoencoder
from diffuse.illustrate.figures_parts_clip import clip_similarity
from diffuse.illustrate.figures_parts_diffusion import forward_diffusion, noise_prediction
from diffuse.illustrate.figures_parts_unet import unet

MAKERS: dict[str, Callable] = {
    "forward_diffusion": forward_diffusion,
    "noise_prediction": noise_prediction,
    "autoencoder": autoencoder,
    "unet": unet,
    "clip_similarity": clip_similarity,
}
