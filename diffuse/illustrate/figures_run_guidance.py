"""The run's figures of how the text steers the image: classifier-free guidance's two predictions and
their scaled difference, and each prompt token's cross-attention map laid over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot

from diffuse.illustrate.figure import Figure, note_figure, save
from diffuse.illustrate.figures_run_text import token_label
from diffuse.illustrate.recording import Recording

ATTENTION_COLUMNS = 6
MAX_TOKENS = 23  # a long prompt's first tokens fill four rows with the image; each panel is drawn at image size


# ---- guidance -----------------------------------------------------------------------------------


def guidance(pipe, rec: Recording, out: Path) -> Figure:
    """At each recorded step: the unconditional and conditional predictions, their difference, and the guided
    prediction uncond + scale * (cond - uncond), each as the mean over the latent channels."""
    guided_steps = [s for s in rec.step_records if s.guidance is not None]
    if not guided_steps:
        return note_figure(
            "guidance", out, f"Guidance was off in this run (CFG scale {rec.cfg_scale:g}): one UNet pass per step."
        )
    scale = guided_steps[0].guidance.scale
    channels = guided_steps[0].guidance.cond.shape[0]
    titles = ["unconditional", "conditional", "cond − uncond", f"guided = uncond + {scale:g}·(cond − uncond)"]
    fig, axes = pyplot.subplots(len(guided_steps), 4, figsize=(11, 2.3 * len(guided_steps)), squeeze=False)
    differences = []
    for r, (row, step) in enumerate(zip(axes, guided_steps)):
        g = step.guidance
        maps = [m.float().mean(0).numpy() for m in (g.uncond, g.cond, g.cond - g.uncond, g.guided)]
        differences.append(float((g.cond - g.uncond).abs().mean()))
        prediction_limit = max(float(np.abs(m).max()) for m in (maps[0], maps[1], maps[3])) or 1.0
        difference_limit = float(np.abs(maps[2]).max()) or 1.0
        for c, (ax, values) in enumerate(zip(row, maps)):
            limit = difference_limit if c == 2 else prediction_limit
            image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image, ax=ax, fraction=0.046).ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        row[0].set_ylabel(f"step {step.index + 1}\nt = {step.timestep:g}", fontsize=8)
    without = f"the negative prompt {rec.negative_prompt!r}" if rec.negative_prompt else "the empty prompt"
    if not rec.negative_prompt and rec.vector is not None and pipe.zeros_for_empty_prompt:  # SDXL alone zeros it
        without = "zeros in place of the empty prompt's encoding, as this SDXL model asks"
    listed = ", ".join(f"{d:.4f} at step {s.index + 1}" for d, s in zip(differences, guided_steps))
    caption = (
        f"At {len(guided_steps)} of {len(rec.step_records)} steps, the UNet's prediction without the prompt "
        f"({without}) and with it, each the mean of the {channels} latent channels; "
        f"guidance scale {scale:g} multiplies their difference, mean |cond − uncond| {listed}."
    )
    numbers = {
        "scale": scale,
        "guidance_steps": [s.index + 1 for s in guided_steps],
        "mean_abs_difference": differences,
    }
    return Figure("guidance", save(fig, out, "guidance.png"), caption, numbers)


# ---- attention ----------------------------------------------------------------------------------


def upsampled_maps(rec: Recording) -> torch.Tensor:
    """The attention maps [T, h, w] bilinearly upsampled to the image's size [T, H, W]."""
    maps = rec.attention.maps.float()[:, None]
    return torch.nn.functional.interpolate(maps, size=(rec.height, rec.width), mode="bilinear", align_corners=False)[
        :, 0
    ]


def attention(pipe, rec: Recording, out: Path) -> Figure:
    """Per prompt token, its cross-attention map over the final image, in a grid titled by the tokens."""
    record = rec.attention
    if record is None or not record.tokens:
        return note_figure("attention", out, "Cross-attention was not recorded in this run.")
    maps = upsampled_maps(rec).numpy()
    picture = np.asarray(rec.image.convert("RGB"))
    shown = min(len(record.tokens), MAX_TOKENS)
    cells = shown + 1
    cols = min(ATTENTION_COLUMNS, cells)
    rows = -(-cells // cols)
    fig, axes = pyplot.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("image", fontsize=9)
    for ax, token, values in zip(axes.flat[1:], record.tokens[:shown], maps):
        ax.imshow(picture)
        # Each map spread over its own range: the figure compares where a token looks, not how hard.
        ax.imshow(values, cmap="jet", alpha=0.5, vmin=values.min(), vmax=values.max())
        ax.set_title(token_label(token), fontsize=9)
    peaks = [float(m.max()) for m in record.maps]
    strongest = int(np.argmax(peaks[:shown]))
    h, w = record.maps.shape[1:]
    which = f"each of the prompt's {shown} tokens"
    if shown < len(record.tokens):
        which = f"the first {shown} of the prompt's {len(record.tokens)} tokens"
    caption = (
        f"Cross-attention from the image to {which}, averaged over heads, "
        f"{record.layers} layers and {record.steps} steps, upsampled from {w}x{h} to {rec.width}x{rec.height} and "
        f"laid over the image, each map coloured from its own lowest to its highest value; the highest peak is "
        f"{token_label(record.tokens[strongest])!r}'s ({peaks[strongest]:.3f})."
    )
    numbers = {
        "tokens": list(record.tokens),
        "positions": list(record.positions),
        "layers": record.layers,
        "steps": record.steps,
        "peaks": peaks,
        "map_size": [h, w],
    }
    return Figure("attention", save(fig, out, "attention.png"), caption, numbers)
