"""SDXL's vector conditioning y, as the UNet got it for the prompt: the pooled text vector, then each
size scalar (original size, crop corner, target size; the refiner's aesthetic score in place of the
target size) as a sinusoid, whose value is read back off the recorded numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffuse.illustrate.figure import Figure, note_figure, pyplot, save
from diffuse.illustrate.recording import Recording
from diffuse.models.unet import timestep_embedding

BASE_SCALARS = ("original height", "original width", "crop top", "crop left", "target height", "target width")
REFINER_SCALARS = BASE_SCALARS[:4] + ("aesthetic score",)


def scalar_names(pipe) -> tuple[str, ...]:
    return REFINER_SCALARS if pipe.config.aesthetic_score else BASE_SCALARS


def read_back(sinusoid: Tensor) -> float | None:
    """The scalar a [cos | sin] sinusoid encodes, from the angle of its lowest frequency (one turn there
    spans tens of thousands of pixels); None unless embedding that value again gives these numbers."""
    dim = len(sinusoid)
    unit = timestep_embedding(torch.ones(1), dim)[0]
    angle = float(torch.atan2(sinusoid[-1], sinusoid[dim // 2 - 1]))
    value = angle / float(torch.atan2(unit[-1], unit[dim // 2 - 1]))
    again = timestep_embedding(torch.tensor([value]), dim)[0]
    return round(value, 3) if bool(torch.allclose(again, sinusoid.float(), atol=1e-3)) else None


def vector(pipe, rec: Recording, out: Path) -> Figure:
    """The pooled text vector as a line, then one heat-map row per size scalar, labelled with its value."""
    if rec.vector is None:
        return note_figure(
            "vector",
            out,
            "This model's UNet takes no vector conditioning y: SD 1.x and 2.x tell it only the timestep and the text.",
        )
    dim, names = pipe.config.size_embed_dim, scalar_names(pipe)
    pooled_width = len(rec.vector) - dim * len(names)
    pooled, sinusoids = rec.vector[:pooled_width], rec.vector[pooled_width:].reshape(len(names), dim)
    values = [read_back(s) for s in sinusoids]
    fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(10, 1.6 + 0.35 * len(names) + 1.6), height_ratios=(1.6, 1))
    fig.subplots_adjust(hspace=0.45)
    top.plot(np.arange(pooled_width), pooled.numpy(), lw=0.8, color="#2a6f97")
    top.set_title(f"pooled text vector ({pooled_width} channels): the last text encoder, projected", fontsize=9)
    top.set_xlim(0, pooled_width - 1)
    bottom.imshow(sinusoids.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    labels = [f"{name} = {value:g}" if value is not None else name for name, value in zip(names, values)]
    bottom.set_yticks(range(len(names)), labels, fontsize=7.5)
    bottom.set_xlabel(f"{dim} channels each: cos of {dim // 2} frequencies | sin of the same", fontsize=8)
    bottom.set_title("size conditioning: each scalar as a sinusoid", fontsize=9)
    told = ", ".join(label for label, value in zip(labels, values) if value is not None)
    caption = (
        f"The vector y [{len(rec.vector)}] the UNet got beside the text: the pooled text vector "
        f"({pooled_width} channels, from {float(pooled.min()):.2f} to {float(pooled.max()):.2f}), then "
        f"{len(names)} scalars, each a {dim}-wide sinusoid"
        + (f", read back as {told}" if told else "")
        + "; y passes through the UNet's label embedding and is added to its timestep embedding."
    )
    numbers = {
        "width": len(rec.vector),
        "pooled_width": pooled_width,
        "size_embed_dim": dim,
        "scalars": dict(zip(names, values)),
    }
    return Figure("vector", save(fig, out, "vector.png"), caption, numbers)
