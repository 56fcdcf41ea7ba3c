"""CLIP's two encoders compared: cosine similarities of images and captions.

The shipped model keeps the image tower its text encoder was trained against
(models/default/image_tower): held-out scenes of the shapes world, drawn by the renderer,
are compared with their own captions (the diagonal) and with each other's (mismatched
pairs, off the diagonal). A model without an image tower (any Stable Diffusion checkpoint:
it never ships CLIP's image half) gets captions compared with captions instead, through
the text encoder's end-of-text state.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from diffuse.illustrate.figure import Figure, pyplot, save
from diffuse.illustrate.recording import Recording
from diffuse.pipeline import Pipeline
from diffuse.shapes.data import image_to_tensor, render
from diffuse.shapes.evaluate import PROMPT_KINDS, heldout_prompts, load_image_tower
from diffuse.shapes.image_encoder import ImageTower

SCENES_PER_KIND = 4  # held-out one-object and two-object scenes each
# Captions for a model without an image tower, beside the run's prompt: two near pairs and unrelated ones.
OTHER_CAPTIONS = (
    "a photo of a cat",
    "a picture of a kitten",
    "a photo of a dog",
    "a city street at night",
    "a painting of a city at night",
    "a bowl of soup",
)


@dataclass
class Similarity:
    """matrix[i, j]: cosine similarity of row i (an image, or a caption) and caption j."""

    matrix: Tensor
    captions: list[str]
    images: list[Image.Image] | None  # the rows' images; None when rows are the captions themselves

    @property
    def diagonal_mean(self) -> float:
        return float(self.matrix.diagonal().mean())

    @property
    def off_diagonal_mean(self) -> float:
        n = len(self.matrix)
        return float(self.matrix[~torch.eye(n, dtype=torch.bool)].mean())


@torch.no_grad()
def pooled_text(pipe: Pipeline, captions: list[str]) -> Tensor:
    """The text encoder's final state at each caption's end-of-text token [N, width], float32; for SDXL
    the last encoder's (bigG's), projected: the pooled vector its y carries."""
    if pipe.text_encoder_2 is not None:
        ids = pipe.tokenizer_2(captions)
        return pipe.text_encoder_2.sdxl_outputs(ids.to(pipe.device), pipe.tokenizer_2.eos_token_id)[1].float().cpu()
    ids = pipe.tokenizer(captions)
    hidden = pipe.text_encoder(ids.to(pipe.device)).float().cpu()
    return pipe.text_encoder.pooled(hidden, ids, pipe.tokenizer.eos_token_id)


def usable_tower(pipe: Pipeline) -> ImageTower | None:
    """The model folder's image tower, if it has one that reads this model's images and text states."""
    tower = load_image_tower(pipe.source) if pipe.source.is_dir() else None
    if tower is None:
        return None
    fits = tower.cfg.image_encoder.image_size == pipe.config.image_size
    return tower if fits and tower.cfg.text_width == pipe.config.text_encoder.width else None


@torch.no_grad()
def images_vs_captions(pipe: Pipeline, tower: ImageTower, per_kind: int = SCENES_PER_KIND) -> Similarity:
    """Held-out one- and two-object scenes rendered and embedded by the image tower, against their captions."""
    images, captions = [], []
    for kind, scenes_of in PROMPT_KINDS.items():
        scenes = scenes_of(per_kind, seed=0)
        captions += heldout_prompts(kind, per_kind)  # the same scenes' captions, as diffuse eval words them
        images += [render(scene, tower.cfg.image_encoder.image_size) for scene in scenes]
    pixels = torch.stack([image_to_tensor(image) for image in images])
    matrix = tower.image_embeddings(pixels) @ tower.text_embeddings(pooled_text(pipe, captions)).T
    return Similarity(matrix, captions, images)


@torch.no_grad()
def captions_vs_captions(pipe: Pipeline, prompt: str) -> Similarity:
    """The prompt and OTHER_CAPTIONS compared with each other by their end-of-text states' directions."""
    captions = [prompt, *OTHER_CAPTIONS]
    states = F.normalize(pooled_text(pipe, captions), dim=-1)
    return Similarity(states @ states.T, captions, None)


def draw(sim: Similarity) -> pyplot.Figure:
    n = len(sim.captions)
    fig, ax = pyplot.subplots(figsize=(3.2 + 0.55 * n, 1.2 + 0.55 * n))
    values = sim.matrix.numpy()
    shown = ax.imshow(values, cmap="viridis", vmin=float(values.min()), vmax=float(values.max()))
    for (i, j), value in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=6,
            color="white" if value < values.mean() else "black",
        )
    labels = [textwrap.shorten(c, 90, placeholder="…") for c in sim.captions]
    ax.set_xticks(range(n), [f"c{j + 1}" for j in range(n)], fontsize=7)
    ax.set_xlabel("captions", fontsize=8)
    if sim.images is None:
        ax.set_yticks(range(n), [f"c{i + 1}: {label}" for i, label in enumerate(labels)], fontsize=7)
    else:
        ax.set_yticks([])
        for i, image in enumerate(sim.images):  # each row's image at its left
            inset = ax.inset_axes([-1.08 / n, 1 - (i + 0.96) / n, 0.92 / n, 0.92 / n])
            inset.imshow(image)
            inset.axis("off")
        key = "\n".join(f"c{j + 1}: {label}" for j, label in enumerate(labels))
        ax.text(0, -0.1, key, transform=ax.transAxes, fontsize=6.5, va="top", ha="left")
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02)
    return fig


def clip_similarity(pipe: Pipeline, rec: Recording, out: Path) -> Figure:
    tower = usable_tower(pipe)
    sim = images_vs_captions(pipe, tower) if tower is not None else captions_vs_captions(pipe, rec.prompt)
    fig = draw(sim)
    n = len(sim.captions)
    if sim.images is not None:
        best = sim.matrix.argmax(dim=1)
        own_best = int((best == torch.arange(n)).sum())
        fig.suptitle("CLIP: held-out images vs captions (cosine similarity)", fontsize=9)
        caption = (
            f"{n} held-out scenes ({n // 2} with one object, {n - n // 2} with two) embedded by the model's CLIP "
            f"image tower, against their own captions (the diagonal, mean {sim.diagonal_mean:.3f}) and each "
            f"other's (off the diagonal, mean {sim.off_diagonal_mean:.3f}); the own caption is the most "
            f"similar for {own_best} of {n} images."
        )
        numbers = {"mode": "images_vs_captions", "own_caption_best": own_best}
    else:
        off = sim.matrix - 2 * torch.eye(n)  # the diagonal out of the running
        i, j = divmod(int(off.argmax()), n)
        fig.suptitle("Captions vs captions (no image tower in this model)", fontsize=9)
        states = (
            "the last text encoder's projected end-of-text states (the pooled vector of SDXL's y)"
            if pipe.text_encoder_2 is not None
            else "the text encoder's end-of-text states"
        )
        caption = (
            f"This model carries no CLIP image tower, so captions are compared with captions: the cosine "
            f"similarity of {states} for the prompt and {n - 1} other captions. "
            f"Off the diagonal the mean is {sim.off_diagonal_mean:.3f}; the closest pair is c{i + 1} and "
            f"c{j + 1} ({float(sim.matrix[i, j]):.3f})."
        )
        numbers = {"mode": "captions_vs_captions", "closest_pair": [i, j]}
    name = save(fig, out, "clip_similarity.png")
    numbers |= {
        "captions": sim.captions,
        "matrix": [[round(float(v), 4) for v in row] for row in sim.matrix],
        "diagonal_mean": sim.diagonal_mean,
        "off_diagonal_mean": sim.off_diagonal_mean,
    }
    return Figure("clip_similarity", name, caption, numbers)
