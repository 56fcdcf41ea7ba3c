"""The k-diffusion samplers: Euler, Heun, LMS, DPM2, their ancestral forms, DPM++ SDE and DPM++ 2S a.

Each one integrates the probability-flow ODE  dx/dsigma = (x - x0(x, sigma)) / sigma  (or its
SDE) in the variance-exploding picture x = x0 + sigma * noise: the derivative is the noise the
model sees in x, and a step of size dsigma removes that much of the noise slice. The ancestral
variants step a little further down (to sigma_down) and put back fresh noise (sigma_up) so the
latent lands at the next noise level with new randomness.

The plans follow diffusers' EulerDiscrete/Heun/LMS/KDPM2 schedulers: timesteps picked by the
spacing, sigmas interpolated at them (or a Karras/exponential ramp between the same ends), so a
model gives the same picture here as under those schedulers.
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
    check_steps,
    exponential_sigmas,
    karras_sigmas,
    spaced_timesteps,
)

# ---------------------------------------------------------------- plans


def _check_options(options: SamplerOptions) -> None:
    if options.interpolation_type != "linear":
        raise ValueError(
            f"interpolation_type {options.interpolation_type!r} is not supported by the k-samplers; use 'linear'"
        )
    if options.final_sigmas_type != "zero":
        raise ValueError(
            f"final_sigmas_type {options.final_sigmas_type!r} is not supported by the k-samplers, "
            "which end at sigma 0; use 'zero'"
        )
    if options.sigma_schedule not in ("default", "karras", "exponential"):
        raise ValueError(
            f"unsupported sigma_schedule {options.sigma_schedule!r}; use 'default', 'karras' or 'exponential'"
        )


def _k_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions, round_ramp_timesteps: bool = False) -> Plan:
    """Sigmas at the spaced timesteps, or a Karras/exponential ramp between the same two ends.

    round_ramp_timesteps: the reference's DPM2 schedulers tell the UNet whole timesteps on a
    Karras ramp (the sigmas themselves stay exact).
    """
    check_steps(schedule, steps)
    _check_options(options)
    timesteps = spaced_timesteps(schedule, steps, options, whole=False)
    sigmas = schedule.t_to_sigma(timesteps)
    sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
    if options.sigma_schedule == "karras":
        sigmas = karras_sigmas(sigma_min, sigma_max, steps, options.rho)
        timesteps = schedule.sigma_to_t(sigmas)
        if round_ramp_timesteps:
            timesteps = timesteps.round()
    elif options.sigma_schedule == "exponential":
        sigmas = exponential_sigmas(sigma_min, sigma_max, steps)
        timesteps = schedule.sigma_to_t(sigmas)
    sigmas = torch.cat([sigmas.to(torch.float32), torch.zeros(1)])
    # The reference starts txt2img from noise * sigma_max, except with "leading" spacing where it
    # uses sqrt(sigma_max^2 + 1) (the pure-noise latent of unit-variance data); kept for parity.
    top = sigmas.max()
    init = top if options.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Plan(sigmas=sigmas, timesteps=timesteps.to(torch.float32), init_noise_scale=float(init), planned_steps=steps)


def k_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """The plan of Euler (a), Heun, LMS, DPM++ SDE and DPM++ 2S a."""
    return _k_plan(schedule, steps, options)


def dpm2_plan(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """The plan of DPM2 (a): as k_plan, but whole timesteps on a Karras ramp, like the reference."""
    return _k_plan(schedule, steps, options, round_ramp_timesteps=True)


# ---------------------------------------------------------------- shared step pieces


def _ancestral_split(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split the move to sigma_next into a deterministic part down to sigma_down and fresh noise
    of size sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is the share of an
    exact ancestral (DDPM-like) step; eta = 0 keeps all the old noise (the ODE step)."""
    if eta == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_up, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _noise_source(noise: NoiseSource | None, name: str, eta: float) -> NoiseSource | None:
    if eta < 0:
        raise ValueError(f"eta_ancestral must be >= 0, got {eta}")
    if noise is None and eta > 0:
        raise ValueError(f"{name} adds fresh noise each step: pass a noise source (or eta_ancestral=0)")
    return noise


def _toward(denoised: Tensor, x: Tensor, ratio: Tensor) -> Tensor:
    """Shrink the noise slice x - denoised by `ratio`: the exact move of the ODE to the noise level
    ratio * sigma when the x0 prediction stays put (DPM-Solver++'s first-order step)."""
    return denoised + ratio * (x - denoised)


# ---------------------------------------------------------------- samplers


def sample_euler(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        x = after_step(callback, i, x, denoised)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """Euler down to sigma_down, then fresh noise up to the next level."""
    noise = _noise_source(noise, "euler_ancestral", options.eta_ancestral)
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, options.eta_ancestral)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise() * (options.s_noise * sigma_up)
        x = after_step(callback, i, x, denoised)
    return x


def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """Heun's method: an Euler step, then the average of the slopes at both ends (second order).
    The step to sigma 0 stays Euler, since the slope there is undefined."""
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            # The reference tells the UNet the next plan timestep here.
            t_next = plan.timesteps[i + 1] if i + 1 < plan.steps else schedule.sigma_to_t(sigma_next)
            slope_next = (x_euler - denoise(x_euler, sigma_next, t_next)) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        x = after_step(callback, i, x, denoised)
    return x


def _lagrange_weight(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral from sigma_i to sigma_{i+1} of the polynomial that is 1 at sigma_{i-j} and 0 at
    the other `order - 1` latest plan points: the weight of the slope from step i - j."""
    poly = [1.0]  # coefficients, lowest power first
    for k in range(order):
        if k != j:
            root, scale = sigmas[i - k], sigmas[i - j] - sigmas[i - k]
            shifted = [0.0] + poly  # tau * poly
            poly = [(shifted[p] - root * (poly[p] if p < len(poly) else 0.0)) / scale for p in range(len(shifted))]

    def antiderivative(s: float) -> float:
        return sum(c * s ** (p + 1) / (p + 1) for p, c in enumerate(poly))

    return antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])


def sample_lms(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
    order: int = 4,
) -> Tensor:
    """Linear multistep: integrate the polynomial through the last `order` slopes over each step.
    It restarts at first order on every run, img2img included."""
    sigmas = plan.sigmas.tolist()
    slopes: list[Tensor] = []  # newest last
    for i in range(plan.steps):
        denoised = denoise(x, plan.sigmas[i], plan.timesteps[i])
        slopes = slopes[-(order - 1) :] + [(x - denoised) / plan.sigmas[i]]
        current = min(i + 1, order)
        weights = [_lagrange_weight(sigmas, i, j, current) for j in range(current)]
        x = x + sum(w * s for w, s in zip(weights, reversed(slopes)))
        x = after_step(callback, i, x, denoised)
    return x


def _log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    """The noise level halfway between a and b in log-sigma (their geometric mean)."""
    return a.log().lerp(b.log(), 0.5).exp()


def _dpm2_step(
    denoise: Denoiser, schedule: NoiseSchedule, x: Tensor, slope: Tensor, sigma: Tensor, target: Tensor
) -> Tensor:
    """DPM-Solver-2: take the slope at the log-midpoint between sigma and target for the whole step."""
    sigma_mid = _log_midpoint(sigma, target)
    x_mid = x + slope * (sigma_mid - sigma)
    slope_mid = (x_mid - denoise(x_mid, sigma_mid, schedule.sigma_to_t(sigma_mid))) / sigma_mid
    return x + slope_mid * (target - sigma)


def sample_dpm2(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) in Karras' form; the step to sigma 0 stays Euler."""
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            x = _dpm2_step(denoise, schedule, x, slope, sigma, sigma_next)
        x = after_step(callback, i, x, denoised)
    return x


def sample_dpm2_ancestral(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM2 down to sigma_down, then fresh noise up to the next level."""
    noise = _noise_source(noise, "dpm2_ancestral", options.eta_ancestral)
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, options.eta_ancestral)
        slope = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigma)
        else:
            x = _dpm2_step(denoise, schedule, x, slope, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise() * (options.s_noise * sigma_up)
        x = after_step(callback, i, x, denoised)
    return x


def sample_dpmpp_2s_ancestral(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022) down to sigma_down, then fresh noise up to the next level.

    A first-order step to the log-midpoint gives a second x0 prediction, which then carries the
    whole step: both are the exact ODE move for a constant x0, so the method is second order.
    """
    noise = _noise_source(noise, "dpmpp_2s_ancestral", options.eta_ancestral)
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        sigma_down, sigma_up = _ancestral_split(sigma, sigma_next, options.eta_ancestral)
        if sigma_down == 0:
            x = denoised  # the Euler step to sigma 0
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_mid = _toward(denoised, x, sigma_mid / sigma)
            denoised_mid = denoise(x_mid, sigma_mid, schedule.sigma_to_t(sigma_mid))
            x = _toward(denoised_mid, x, sigma_down / sigma)
        if sigma_up > 0:
            x = x + noise() * (options.s_noise * sigma_up)
        x = after_step(callback, i, x, denoised)
    return x


def sample_dpmpp_sde(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM-Solver++ SDE, k-diffusion's `dpmpp_sde` with r = 1/2 (A1111's "DPM++ SDE").

    Each step: an ancestral first-order step to the log-midpoint for a second x0 prediction, then
    an ancestral first-order step over the whole interval with that prediction. Both stochastic
    parts draw fresh independent noise from `noise()`. k-diffusion draws them from a Brownian tree
    instead (correlated so that the path is consistent across step counts); independent draws
    keep every sampler on the one seeded noise stream, reproducible on any device, at the price
    of not reproducing A1111's exact pictures for this sampler.
    """
    eta = options.eta_ancestral
    noise = _noise_source(noise, "dpmpp_sde", eta)
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        if sigma_next == 0:
            x = denoised  # the Euler step to sigma 0
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            down, up = _ancestral_split(sigma, sigma_mid, eta)
            x_mid = _toward(denoised, x, down / sigma)
            if up > 0:
                x_mid = x_mid + noise() * (options.s_noise * up)
            denoised_mid = denoise(x_mid, sigma_mid, schedule.sigma_to_t(sigma_mid))
            down, up = _ancestral_split(sigma, sigma_next, eta)
            x = _toward(denoised_mid, x, down / sigma)
            if up > 0:
                x = x + noise() * (options.s_noise * up)
        x = after_step(callback, i, x, denoised)
    return x


K_ALGORITHMS: dict[str, Algorithm] = {
    "euler": Algorithm(plan=k_plan, run=sample_euler, stochastic=False),
    "euler_ancestral": Algorithm(plan=k_plan, run=sample_euler_ancestral, stochastic=True),
    "heun": Algorithm(plan=k_plan, run=sample_heun, stochastic=False),
    "lms": Algorithm(plan=k_plan, run=sample_lms, stochastic=False),
    "dpm2": Algorithm(plan=dpm2_plan, run=sample_dpm2, stochastic=False),
    "dpm2_ancestral": Algorithm(plan=dpm2_plan, run=sample_dpm2_ancestral, stochastic=True),
    "dpmpp_sde": Algorithm(plan=k_plan, run=sample_dpmpp_sde, stochastic=True),
    "dpmpp_2s_ancestral": Algorithm(plan=k_plan, run=sample_dpmpp_2s_ancestral, stochastic=True),
}
