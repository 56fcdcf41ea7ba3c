"""Forward diffusion and the noise predictor's training example, on this run's own image.

    x0 = VAE.encode(image) * scaling factor          (as img2img encodes, seeded with the run's seed)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps     (the model's training schedule)
    the UNet, told t and the prompt's text encoding, predicts eps (or v) from x_t

This is how the UNet was trained: a known noise slice added at a random step, and the
network asked to name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffuse.illustrate.figure import Figure, model_schedule, pyplot, save
from diffuse.illustrate.figures_parts_common import (
    decode,
    encode_with_noise,
    parts_pixels,
    shape_text,
    show_image,
    show_strip,
)
from diffuse.illustrate.recording import Recording
from diffuse.numerics import network_dtype
from diffuse.pipeline import Pipeline
from diffuse.samplers.schedule import prediction_target

FORWARD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 1.0)  # of the training timesteps: where the noise slices are shown
TRAINING_FRACTIONS = (0.25, 0.75)  # the training example's timesteps


def chosen_timesteps(pipe: Pipeline, fractions: tuple[float, ...]) -> list[int]:
    """Training timesteps at the given fractions of the schedule, within 0 .. T-1."""
    total = model_schedule(pipe).num_train_timesteps
    return [min(total - 1, round(f * total)) for f in fractions]


def noised(pipe: Pipeline, x0: Tensor, t: int, noise: Tensor) -> Tensor:
    """Forward diffusion to training timestep t: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with the model's abar."""
    abar = model_schedule(pipe).alphas_cumprod()[t]
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


@dataclass
class ForwardExample:
    """The run's image encoded (x0, [C, h, w]), one noise draw, and x_t at each chosen timestep."""

    x0: Tensor
    noise: Tensor
    timesteps: list[int]
    alpha_bars: list[float]
    latents: list[Tensor]
    size: tuple[int, int]  # (width, height) of the picture that was encoded


def forward_example(pipe: Pipeline, rec: Recording, fractions: tuple[float, ...] = FORWARD_FRACTIONS) -> ForwardExample:
    pixels = parts_pixels(pipe, rec.image)
    x0, noise = encode_with_noise(pipe, pixels, rec.seed)
    timesteps = chosen_timesteps(pipe, fractions)
    abar = model_schedule(pipe).alphas_cumprod()
    latents = [noised(pipe, x0, t, noise) for t in timesteps]
    size = (pixels.shape[-1], pixels.shape[-2])
    return ForwardExample(x0, noise, timesteps, [float(abar[t]) for t in timesteps], latents, size)


def forward_diffusion(pipe: Pipeline, rec: Recording, out: Path) -> Figure:
    ex = forward_example(pipe, rec)
    images = decode(pipe, torch.stack([ex.x0, *ex.latents]))
    columns = len(ex.latents) + 1
    fig, axes = pyplot.subplots(
        2, columns, figsize=(2.0 * columns, 3.2), squeeze=False, gridspec_kw={"height_ratios": (4, 1.3)}
    )
    limit = max(float(x.abs().max()) for x in (ex.x0, *ex.latents))
    show_image(axes[0, 0], images[0], "x0: the image encoded")
    show_strip(axes[1, 0], ex.x0, f"x0 latent {shape_text(ex.x0.shape)}", limit)
    for col, (t, abar, x, image) in enumerate(zip(ex.timesteps, ex.alpha_bars, ex.latents, images[1:]), start=1):
        show_image(axes[0, col], image, f"t={t}: x_t decoded")
        show_strip(axes[1, col], x, f"√ᾱ={abar**0.5:.3f}, √(1−ᾱ)={(1 - abar) ** 0.5:.3f}", limit)
    fig.suptitle("Forward diffusion: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (latent channels below)", fontsize=9)
    name = save(fig, out, "forward_diffusion.png")
    w, h = ex.size
    steps = ", ".join(f"t={t} (ᾱ={abar:.3f})" for t, abar in zip(ex.timesteps, ex.alpha_bars))
    caption = (
        f"The final image at {w}×{h} encoded by the VAE into a {shape_text(ex.x0.shape)} latent x0, then one "
        f"noise draw (seed {rec.seed}) added at {steps} with the model's "
        f"{model_schedule(pipe).num_train_timesteps}-step schedule, each decoded back to pixels. "
        f"At t={ex.timesteps[-1]} only {ex.alpha_bars[-1] ** 0.5:.1%} of x0's scale is left."
    )
    numbers = {
        "image_size": [w, h],
        "latent_shape": list(ex.x0.shape),
        "seed": rec.seed,
        "timesteps": ex.timesteps,
        "alpha_bar": ex.alpha_bars,
        "latent_std": [float(x.std()) for x in ex.latents],
    }
    return Figure("forward_diffusion", name, caption, numbers)


# ---- the training example ------------------------------------------------------------------------


@dataclass
class TrainingExample:
    """One (x_t, t) -> target example and what the UNet made of it; tensors [C, h, w] float32."""

    timestep: int
    alpha_bar: float
    noisy: Tensor
    noise: Tensor
    target: Tensor  # what the model is trained to output: the noise, or v for a v-prediction model
    prediction: Tensor
    mse: float


@torch.no_grad()
def predict(pipe: Pipeline, x: Tensor, t: int, context: Tensor, y: Tensor | None = None) -> Tensor:
    """The UNet's output [C, h, w] (float32) for latent x [C, h, w] at timestep t, text context [77, width]
    and, for SDXL, the vector conditioning y [adm]."""
    dtype = network_dtype(pipe.unet)
    out = pipe.unet(
        x[None].to(pipe.device, dtype),
        torch.tensor([t], device=pipe.device),
        context[None].to(pipe.device, dtype),
        None if y is None else y[None].to(pipe.device, dtype),
    )
    return out[0].float().cpu()


def training_examples(pipe: Pipeline, rec: Recording, fractions: tuple[float, ...] = TRAINING_FRACTIONS):
    """The training example at each chosen timestep, on the run's image with its prompt's text encoding."""
    ex = forward_example(pipe, rec, fractions)
    prediction_type = pipe.config.prediction_type
    examples = []
    for t, abar, x in zip(ex.timesteps, ex.alpha_bars, ex.latents):
        a = torch.tensor(abar)
        target = prediction_target(ex.x0, ex.noise, a.sqrt(), (1 - a).sqrt(), prediction_type)
        prediction = predict(pipe, x, t, text_context(rec), rec.vector)
        mse = float((prediction - target).pow(2).mean())
        examples.append(TrainingExample(t, abar, x, ex.noise, target, prediction, mse))
    return ex, examples


def text_context(rec: Recording) -> Tensor:
    """The prompt's first chunk as the UNet attends to it [77, width]: SDXL's two encoders side by side."""
    return rec.text.output if rec.text_2 is None else torch.cat([rec.text.output, rec.text_2.output], dim=-1)


def noise_prediction(pipe: Pipeline, rec: Recording, out: Path) -> Figure:
    ex, examples = training_examples(pipe, rec)
    v_model = pipe.config.prediction_type == "v_prediction"
    titles = ["x_t: the noisy latent", "ε: the noise added"]
    titles += ["v = √ᾱ·ε − √(1−ᾱ)·x0: the target"] if v_model else []
    titles += ["the UNet's prediction", "|prediction − target|"]
    images = decode(pipe, torch.stack([e.noisy for e in examples]))
    fig, axes = pyplot.subplots(
        len(examples),
        len(titles) + 1,
        figsize=(1.4 + 2.6 * len(titles), 1.7 * len(examples) + 0.5),
        squeeze=False,
        gridspec_kw={"width_ratios": (0.5, *[1] * len(titles))},
    )
    for row, e, image in zip(axes, examples, images):
        show_image(row[0], image, "x_t decoded")
        row[0].text(
            -0.1,
            0.5,
            f"t={e.timestep}\nᾱ={e.alpha_bar:.3f}",
            transform=row[0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
        shown = [e.noisy, e.noise] + ([e.target] if v_model else []) + [e.prediction]
        limit = max(float(x.abs().max()) for x in shown)
        for ax, x, title in zip(row[1:], shown, titles):
            show_strip(ax, x, title, limit)
        error = show_strip(row[-1], (e.prediction - e.target).abs(), f"|error|, MSE {e.mse:.4f}", cmap="magma")
        fig.colorbar(error, ax=row[-1], fraction=0.05)
    fig.suptitle("The noise predictor's training example: (x_t, t, text) → the noise it must predict", fontsize=9)
    name = save(fig, out, "noise_prediction.png")
    target = "v (this is a v-prediction model: v = √ᾱ·ε − √(1−ᾱ)·x0)" if v_model else "the noise ε"
    results = "; ".join(
        f"at t={e.timestep} (ᾱ={e.alpha_bar:.3f}) MSE {e.mse:.4f} against a target mean square of "
        f"{float(e.target.pow(2).mean()):.3f}"
        for e in examples
    )
    caption = (
        f"The final image's {shape_text(ex.x0.shape)} latent noised with seed {rec.seed}, and the UNet, given t and "
        f"the prompt's text encoding, predicting {target}: {results}."
    )
    numbers = {
        "prediction_type": pipe.config.prediction_type,
        "latent_shape": list(ex.x0.shape),
        "seed": rec.seed,
        "timesteps": [e.timestep for e in examples],
        "alpha_bar": [e.alpha_bar for e in examples],
        "mse": [e.mse for e in examples],
        "target_mean_square": [float(e.target.pow(2).mean()) for e in examples],
    }
    return Figure("noise_prediction", name, caption, numbers)
