"""The samplers of the original DDPM/DDIM line: DDIM, PLMS, DDPM and LCM.

They were written for the variance-preserving latent x_vp = sqrt(abar) x0 + sqrt(1 - abar) noise,
and they visit whole training timesteps. Here they walk the same points in the variance-exploding
picture x = x0 + sigma * noise (x = x_vp / sqrt(abar)), where each update becomes a short move of
the noise slice: a DDIM step keeps the predicted noise and swaps sigma for the next sigma.

The reference schedulers (diffusers' DDIM/PNDM) step from timestep t to t - train_steps // steps
whatever the spacing, which is not always the next planned timestep (linspace and trailing spacing,
or img2img with PLMS). The latent is then handed to the UNet at a noise level other than the one it
was produced at; `_reinterpret` reproduces that, so the plans and runs match the reference exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffuse.samplers.schedule import (
    Algorithm,
    Denoiser,
    NoiseSchedule,
    NoiseSource,
    Plan,
    SamplerOptions,
    StepCallback,
    after_step,
    spaced_timesteps,
)

# ---------------------------------------------------------------- plans


def _sigma(abar: Tensor) -> Tensor:
    """Noise-to-signal ratio of a variance-preserving latent with signal fraction abar."""
    return ((1 - abar) / abar) ** 0.5


def _landing_sigmas(schedule: NoiseSchedule, timesteps: Tensor, planned_steps: int, options: SamplerOptions) -> Tensor:
    """Sigma at t - train_steps // planned_steps for each timestep t: where the reference's DDIM
    and PLMS updates from t land. Past timestep 0 that is timestep 0's level, or no noise at all
    with set_alpha_to_one."""
    abar = schedule.alphas_cumprod()
    final_abar = torch.tensor(1.0) if options.set_alpha_to_one else abar[0]
    landing = timesteps.to(torch.int64) - schedule.num_train_timesteps // planned_steps
    return _sigma(torch.where(landing >= 0, abar[landing.clamp(min=0)], final_abar))


def _vp_plan(schedule: NoiseSchedule, timesteps: Tensor, last_sigma: Tensor, planned_steps: int) -> Plan:
    """A plan whose model calls sit exactly on training timesteps."""
    sigmas = torch.cat([_sigma(schedule.alphas_cumprod()[timesteps]), last_sigma.reshape(1)])
    # The reference starts txt2img from unit-variance noise at sigmas[0], i.e. x_vp = noise.
    init_noise_scale = float((1 + sigmas[0].double() ** 2) ** 0.5)
    return Plan(
        sigmas=sigmas.to(torch.float32),
        timesteps=timesteps.to(torch.float32),
        init_noise_scale=init_noise_scale,
        planned_steps=planned_steps,
    )


def ddim_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """The spaced timesteps; the last update lands one stride below the last of them."""
    timesteps = spaced_timesteps(schedule, steps, options)
    return _vp_plan(schedule, timesteps, _landing_sigmas(schedule, timesteps[-1:], steps, options), steps)


def plms_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """PLMS (diffusers' PNDM with skip_prk_steps): steps + 1 model calls, the second timestep twice.

    The first call takes a plain DDIM step; the second, at the landing point, averages the two
    noise predictions and redoes that step from the start (a Heun-like warm-up); the repeated
    timestep then starts the Adams-Bashforth steps.
    """
    if not options.skip_prk_steps:
        raise ValueError("plms supports skip_prk_steps=True only (the Runge-Kutta warm-up of PNDM is not implemented)")
    timesteps = spaced_timesteps(schedule, steps, options)
    if steps > 1:
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    return _vp_plan(schedule, timesteps, _landing_sigmas(schedule, timesteps[-1:], steps, options), steps)


def ddpm_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    # DDPM steps to the next planned timestep and, after the last, to the clean latent.
    return _vp_plan(schedule, spaced_timesteps(schedule, steps, options), torch.tensor(0.0), steps)


def lcm_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """LCM visits `steps` evenly chosen points of its distillation grid of original_inference_steps."""
    original = options.original_inference_steps
    if not 1 <= original <= schedule.num_train_timesteps:
        raise ValueError(
            f"original_inference_steps must be between 1 and {schedule.num_train_timesteps}, got {original}"
        )
    if not 1 <= steps <= original:
        raise ValueError(f"lcm steps must be between 1 and original_inference_steps={original}, got {steps}")
    stride = schedule.num_train_timesteps // original
    grid = torch.arange(original, 0, -1, dtype=torch.int64) * stride - 1  # descending: the distillation timesteps
    picks = torch.arange(steps, dtype=torch.float64) * (original / steps)
    return _vp_plan(schedule, grid[picks.floor().to(torch.int64)], torch.tensor(0.0), steps)


# ---------------------------------------------------------------- runs


def _reinterpret(x: Tensor, produced_at: Tensor, read_at: Tensor) -> Tensor:
    """The same UNet-space latent x_vp, re-expressed as if it were at noise level `read_at`.

    Identity when the levels agree; otherwise this is how the reference treats a latent that
    landed at one timestep but is handed on as another (x = x_vp * sqrt(1 + sigma^2)).
    """
    return x * ((1 + read_at**2) / (1 + produced_at**2)) ** 0.5


def _ddim_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, target: Tensor, eta: float, noise: NoiseSource | None
) -> Tensor:
    """Move from sigma to target keeping the predicted noise, replacing an eta-share of it with fresh noise.

    In the VP form this is DDIM's  std = eta * sqrt((1-a')/(1-a) * (1 - a/a')); divided by sqrt(a')
    that is  eta * target * sqrt(sigma^2 - target^2) / sigma.
    """
    eps = (x - denoised) / sigma
    if eta == 0 or target == 0:
        return denoised + target * eps
    fresh = eta * target * (sigma**2 - target**2).clamp(min=0) ** 0.5 / sigma
    kept = (target**2 - fresh**2) ** 0.5
    if noise is None:
        raise ValueError("a stochastic step (eta > 0) needs a noise source")
    return denoised + kept * eps + fresh * noise()


def _ddim_walk(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    landing: Tensor,
    eta: float,
    noise: NoiseSource | None,
    callback: StepCallback | None,
) -> Tensor:
    """DDIM steps from each plan point to landing[i], the latent then read at plan.sigmas[i + 1]."""
    for i in range(plan.steps):
        sigma = plan.sigmas[i]
        denoised = denoise(x, sigma, plan.timesteps[i])
        x = _ddim_step(x, denoised, sigma, landing[i], eta, noise)
        x = _reinterpret(x, landing[i], plan.sigmas[i + 1])
        x = after_step(callback, i, x, denoised)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DDIM (Song et al. 2020); eta = 0 is deterministic, eta = 1 samples like DDPM."""
    if not 0 <= options.eta <= 1:
        raise ValueError(f"ddim eta must be between 0 and 1, got {options.eta}")
    landing = _landing_sigmas(schedule, plan.timesteps, plan.planned_steps, options)
    return _ddim_walk(denoise, x, plan, landing, options.eta, noise, callback)


def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020), variance "fixed_small".

    Its posterior q(x_prev | x_t, x0) has exactly the mean and variance of a DDIM step with eta = 1
    to the next planned timestep (and after the last one, to the clean latent).
    """
    if noise is None:
        raise ValueError("ddpm needs a noise source")
    return _ddim_walk(denoise, x, plan, plan.sigmas[1:], 1.0, noise, callback)


def _adams_bashforth(slopes: list[Tensor]) -> Tensor:
    """Extrapolated noise prediction from the last (up to) four, newest last."""
    if len(slopes) == 1:
        return slopes[-1]
    if len(slopes) == 2:
        return (3 * slopes[-1] - slopes[-2]) / 2
    if len(slopes) == 3:
        return (23 * slopes[-1] - 16 * slopes[-2] + 5 * slopes[-3]) / 12
    return (55 * slopes[-1] - 59 * slopes[-2] + 37 * slopes[-3] - 9 * slopes[-4]) / 24


def _restart_sigma(schedule: NoiseSchedule, t: Tensor, planned_steps: int) -> Tensor:
    """Where PLMS's second warm-up call restarts the first step from: one stride above its own
    timestep t (kept on the schedule), as the reference does."""
    train = schedule.num_train_timesteps
    above = (t.to(torch.int64) + train // planned_steps).clamp(max=train - 1)
    return _sigma(schedule.alphas_cumprod()[above])


def sample_plms(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM with its Runge-Kutta warm-up skipped).

    Each step is a DDIM move whose noise prediction is extrapolated from the earlier ones.
    """
    landing = _landing_sigmas(schedule, plan.timesteps, plan.planned_steps, options)
    slopes: list[Tensor] = []  # noise predictions of the calls that feed the extrapolation
    first_x = x  # the warm-up redoes the first step from here
    for i in range(plan.steps):
        sigma = plan.sigmas[i]
        denoised = denoise(x, sigma, plan.timesteps[i])
        eps = (x - denoised) / sigma
        if i == 1:
            # Warm-up: redo the first step from its start, with the average of both predictions.
            start, end = _restart_sigma(schedule, plan.timesteps[1], plan.planned_steps), sigma
            x = _reinterpret(first_x, plan.sigmas[0], start) + (end - start) * (slopes[0] + eps) / 2
        else:
            slopes = slopes[-3:] + [eps]
            start, end = sigma, landing[i]
            x = x + (end - start) * _adams_bashforth(slopes)
        x = _reinterpret(x, end, plan.sigmas[i + 1])
        x = after_step(callback, i, x, denoised)
    return x


def _boundary_scalings(t: Tensor, timestep_scaling: float) -> tuple[Tensor, Tensor]:
    """LCM's consistency boundary condition: the output is c_skip * x_vp + c_out * x0, which is
    the input itself at t = 0 and (for timestep_scaling 10 and t >= ~20) almost exactly x0."""
    sigma_data = 0.5
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def sample_lcm(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the clean estimate, then
    re-noise it with fresh noise to the next point; the last jump is the result."""
    for i in range(plan.steps):
        sigma, target = plan.sigmas[i], plan.sigmas[i + 1]
        t = plan.timesteps[i]
        predicted = denoise(x, sigma, t)
        c_skip, c_out = _boundary_scalings(t, options.timestep_scaling)
        denoised = c_out * predicted + c_skip * x / (1 + sigma**2) ** 0.5  # x / sqrt(1+sigma^2): x_vp
        if i < plan.steps - 1:
            if noise is None:
                raise ValueError("lcm needs a noise source for runs of more than one step")
            x = denoised + target * noise()
        else:
            x = denoised
        x = after_step(callback, i, x, denoised)
    return x


VP_ALGORITHMS: dict[str, Algorithm] = {
    "ddim": Algorithm(plan=ddim_plan, run=sample_ddim, stochastic=False),
    "plms": Algorithm(plan=plms_plan, run=sample_plms, stochastic=False),
    "ddpm": Algorithm(plan=ddpm_plan, run=sample_ddpm, stochastic=True),
    "lcm": Algorithm(plan=lcm_plan, run=sample_lcm, stochastic=True),
}
