"""Run a diffusers scheduler and one of our samplers on the same toy model, for the sampler tests.

The toy model is a smooth deterministic function of (latents, timestep), so both
loops see the same model output whenever they are at the same point: any
difference in the result is a difference in the samplers themselves.
"""

from __future__ import annotations

import torch

from diffuse.samplers.schedule import Algorithm, NoiseSchedule, SamplerOptions, make_denoiser

SHAPE = (2, 4, 8, 8)


def toy_model(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in UNet: depends on the input and (smoothly) on the timestep, like a real one."""
    t = torch.as_tensor(t, dtype=torch.float32)
    phase = torch.linspace(0, 1, x_vp.shape[1]).reshape(1, -1, 1, 1)
    return 0.8 * x_vp * torch.cos(t / 700 + phase) + 0.3 * torch.sin(3 * x_vp + t / 300)


def start_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def seeded_noise(seed: int):
    """A NoiseSource drawing from its own seeded generator: the draws diffusers makes from one."""
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(SHAPE, generator=generator)


def reference_loop(scheduler, timesteps, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The diffusers denoising loop over `timesteps` from x (no guidance); stochastic
    schedulers draw their fresh noise from `generator`."""
    extra = {} if generator is None else {"generator": generator}
    for t in timesteps:
        out = toy_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def run_reference(scheduler, steps: int, noise: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """The diffusers loop as its StableDiffusionPipeline runs it, from noise * init_noise_sigma."""
    scheduler.set_timesteps(steps)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return reference_loop(scheduler, scheduler.timesteps, noise * scheduler.init_noise_sigma, generator)


def reference_img2img(scheduler, steps: int, strength: float, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' img2img: skip steps - int(steps * strength) steps and noise the image to that level."""
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    scheduler.set_begin_index(start * scheduler.order)
    return reference_loop(scheduler, timesteps, scheduler.add_noise(x0, noise, timesteps[:1]))


def run_ours(
    algorithm: Algorithm,
    schedule: NoiseSchedule,
    options: SamplerOptions,
    steps: int,
    noise: torch.Tensor,
    fresh_noise=None,
    callback=None,
) -> torch.Tensor:
    """Our loop, returned in the UNet's (variance-preserving) scale like the reference's result."""
    plan = algorithm.plan(schedule, steps, options)
    denoise = make_denoiser(toy_model, schedule.prediction_type)
    x = noise * plan.init_noise_scale
    x = algorithm.run(denoise, x, plan, fresh_noise, callback, options, schedule)
    return x / (1 + plan.sigmas[-1] ** 2) ** 0.5
