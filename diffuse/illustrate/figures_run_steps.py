"""The run's figures of the denoising loop: every step's latents through the VAE decoder beside the
cheap preview and the clean estimate, how much each step changed the image, and the noise schedule
with the timesteps this run visited."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot
from matplotlib.ticker import MaxNLocator

from diffuse.illustrate.figure import Figure, model_schedule, save
from diffuse.illustrate.recording import Recording
from diffuse.preview import latents_to_rgb_cheap
from diffuse.samplers.schedule import NoiseSchedule

# What the steps figure may decode, in image pixels: 8 decodes at 512x512. The shipped 64x64 model
# decodes every step well within it; an SD1.5-size model is held to 8 decodes.
DECODE_PIXELS = 8 * 512 * 512
MAX_COLUMNS = 20  # steps drawn side by side; more are spread evenly
PREDICTS = {"epsilon": "the noise ε", "v_prediction": "v = √ᾱ·ε − √(1 − ᾱ)·x₀"}


def spread(count: int, most: int) -> list[int]:
    """At most `most` indices of range(count), evenly spread, the first and the last always among them."""
    if count <= most:
        return list(range(count))
    if most <= 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def decode_image(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents [C, h, w] in the UNet's scale -> the VAE's picture, [H, W, 3] float32 in [0, 1]."""
    pixels = pipe.decode_latents(latents[None].to(pipe.device))[0]
    return (pixels * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def decode_steps(pipe, rec: Recording, indices: list[int] | None = None) -> list[np.ndarray]:
    """The noisy latents after each recorded step (those at `indices`; None: all) decoded by the VAE, one
    at a time as the pipeline decodes its result: [H, W, 3] float32 in [0, 1]."""
    chosen = range(len(rec.step_records)) if indices is None else indices
    return [decode_image(pipe, rec.step_records[i].latents) for i in chosen]


def step_changes(images: list[np.ndarray]) -> list[float]:
    """Mean absolute difference of consecutive decoded images, as a share of the full 0-255 range."""
    return [float(np.abs(b - a).mean()) for a, b in zip(images, images[1:])]


def decode_plan(rec: Recording, steps: int) -> tuple[list[int], bool]:
    """The steps drawn as columns, and whether every step's latents are decoded for the change plot.

    Each column costs two decodes (noisy latents, clean estimate); decoding every step for the plot
    is done only when it fits in DECODE_PIXELS along with the columns."""
    decodes = max(4, DECODE_PIXELS // (rec.width * rec.height))
    if decodes >= steps + min(steps, MAX_COLUMNS):
        return spread(steps, MAX_COLUMNS), True
    return spread(steps, decodes // 2), False


def _steps_caption(rec: Recording, columns: list[int], every_step: bool, changes: list[float], into: list[int]) -> str:
    steps = len(rec.step_records)
    if len(columns) == steps:
        shown = f"All {steps} steps of {rec.sampler}"
    else:
        cost = "" if every_step else f", {2 * len(columns)} VAE decodes at {rec.width}x{rec.height} to bound the cost"
        shown = (
            f"{len(columns)} of {steps} steps of {rec.sampler} (steps {', '.join(str(i + 1) for i in columns)}{cost})"
        )
    text = (
        f"{shown}: the noisy latents decoded by the VAE (top), the cheap latent-to-RGB preview of the sampler's "
        f"clean estimate (middle) and the clean estimate decoded (bottom)."
    )
    if changes:
        most = int(np.argmax(changes))
        between = "from one step to the next" if every_step else "between the steps shown"
        text += (
            f" Measured {between}, the decoded image changed most into step {into[most]} (mean |Δ| {changes[most]:.3f}"
            f" of full scale) and {changes[-1]:.3f} into the last step."
        )
    return text


def steps(pipe, rec: Recording, out: Path) -> Figure:
    """The image emerging: per step the decoded noisy latents, the cheap preview and the decoded clean estimate;
    below, how much each step changed the decoded image."""
    count = len(rec.step_records)
    columns, every_step = decode_plan(rec, count)
    measured = list(range(count)) if every_step else columns
    noisy = dict(zip(measured, decode_steps(pipe, rec, measured)))
    clean = [decode_image(pipe, rec.step_records[i].denoised) for i in columns]
    previews = [
        latents_to_rgb_cheap(rec.step_records[i].denoised[None].float(), pipe.preview_matrix)[0].permute(1, 2, 0)
        for i in columns
    ]
    changes = step_changes([noisy[i] for i in measured])
    into = [i + 1 for i in measured[1:]]

    fig = pyplot.figure(figsize=(max(6.0, 0.9 * len(columns) + 1), 4.6))
    grid = fig.add_gridspec(4, len(columns), height_ratios=[1, 1, 1, 1.4], hspace=0.35)
    rows = [("decoded", [noisy[i] for i in columns]), ("preview", previews), ("clean est.", clean)]
    for r, (label, pictures) in enumerate(rows):
        for c, picture in enumerate(pictures):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(np.asarray(picture), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{columns[c] + 1}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    plot = fig.add_subplot(grid[3, :])
    plot.plot(into, changes, marker="o", markersize=3)
    plot.set_xlabel("step", fontsize=8)
    plot.set_ylabel("mean |Δ image|", fontsize=8)
    plot.tick_params(labelsize=7)
    plot.set_xlim(0.5, count + 0.5)
    plot.xaxis.set_major_locator(MaxNLocator(integer=True))
    caption = _steps_caption(rec, columns, every_step, changes, into)
    numbers = {
        "shown_steps": [i + 1 for i in columns],
        "change": changes,
        "change_into_steps": into,
        "every_step_decoded": every_step,
        "timesteps": [s.timestep for s in rec.step_records],
        "seconds_per_step": [s.seconds for s in rec.step_records],
    }
    return Figure("steps", save(fig, out, "steps.png"), caption, numbers)


# ---- schedule -----------------------------------------------------------------------------------


def schedule_curves(schedule: NoiseSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training timesteps, alpha_bar and sigma at each, as the samplers compute them."""
    t = np.arange(schedule.num_train_timesteps)
    return t, schedule.alphas_cumprod().numpy(), schedule.sigmas().numpy()


def schedule(pipe, rec: Recording, out: Path) -> Figure:
    """alpha_bar and sigma over the training timesteps, this run's visited timesteps marked."""
    noise = model_schedule(pipe)
    t, abar, sigma = schedule_curves(noise)
    visited = np.array([s.timestep for s in rec.step_records], dtype=np.float64)
    visited_sigma = np.array([s.sigma for s in rec.step_records], dtype=np.float64)  # the sampler's own levels
    visited_abar = 1 / (1 + visited_sigma**2)

    fig, (left, right) = pyplot.subplots(1, 2, figsize=(11, 3.4))
    left.plot(t, abar, color="#1f77b4", lw=1.5, label="ᾱ (signal share)")
    left.plot(t, 1 - abar, color="#ff7f0e", lw=1.5, label="1 − ᾱ (noise share)")
    left.scatter(visited, visited_abar, color="black", s=14, zorder=3, label=f"this run's {len(visited)} steps")
    left.set_xlabel("training timestep t", fontsize=8)
    left.set_title("ᾱ_t: how much of the clean latent is left", fontsize=9)
    left.legend(fontsize=7)
    right.semilogy(t, sigma, color="#2ca02c", lw=1.5, label="σ = √((1 − ᾱ)/ᾱ)")
    right.scatter(visited, visited_sigma, color="black", s=14, zorder=3, label="visited")
    right.set_xlabel("training timestep t", fontsize=8)
    right.set_title("σ_t: the noise level (log scale)", fontsize=9)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    caption = (
        f"The {noise.beta_schedule.replace('_', '-')} schedule, β from {noise.beta_start:g} to {noise.beta_end:g} over "
        f"{noise.num_train_timesteps} training timesteps: ᾱ falls from {abar[0]:.4f} to {abar[-1]:.4f} and σ rises "
        f"from {sigma[0]:.3f} to {sigma[-1]:.1f}; the UNet was trained to predict {PREDICTS[noise.prediction_type]}. "
        f"This run's {len(visited)} steps of {rec.sampler} visited t = "
        f"{_timesteps_text(visited)} (σ {visited_sigma[0]:.2f} down to {visited_sigma[-1]:.3f})."
    )
    numbers = {
        "beta_schedule": noise.beta_schedule,
        "prediction_type": noise.prediction_type,
        "beta_start": noise.beta_start,
        "beta_end": noise.beta_end,
        "num_train_timesteps": noise.num_train_timesteps,
        "alpha_bar_range": [float(abar[0]), float(abar[-1])],
        "sigma_range": [float(sigma[0]), float(sigma[-1])],
        "visited_timesteps": visited.tolist(),
        "visited_sigmas": visited_sigma.tolist(),
        "visited_alpha_bar": visited_abar.tolist(),
    }
    return Figure("schedule", save(fig, out, "schedule.png"), caption, numbers)


def _timesteps_text(visited: np.ndarray) -> str:
    values = [f"{v:g}" for v in visited]
    return ", ".join(values) if len(values) <= 8 else ", ".join(values[:3]) + ", …, " + ", ".join(values[-2:])
