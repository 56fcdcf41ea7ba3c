"""Multistep solvers: DPM++ 2M, DPM++ 2M SDE and UniPC.

They integrate the probability-flow ODE in lambda = -log(sigma), the log signal-to-noise ratio:
in the noise-slice picture x = x0 + sigma * noise, one first-order step from sigma to sigma_next
keeps the fraction sigma_next / sigma = exp(-h) of the noise slice and moves the rest of the way
to the x0 prediction (this is DDIM). The multistep solvers reuse the previous step's x0
prediction to estimate how x0 drifts along the way, and get second order for one model call per
step. (diffusers writes them for the variance-preserving latent with alpha = 1 / sqrt(1 + sigma^2)
and sigma_vp = sigma * alpha; its lambda = log(alpha / sigma_vp) is the same -log(sigma).)

Plans and the order of each step follow diffusers' DPMSolverMultistepScheduler (algorithm_type
"dpmsolver++" / "sde-dpmsolver++", midpoint) and UniPCMultistepScheduler (bh2, predicting x0).
"""

from __future__ import annotations

import math

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


def _check_options(name: str, options: SamplerOptions) -> None:
    if options.solver_order not in (1, 2):
        raise ValueError(f"{name} supports solver_order 1 or 2, got {options.solver_order}")
    if options.final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"unsupported final_sigmas_type {options.final_sigmas_type!r}; use 'zero' or 'sigma_min'")
    if options.sigma_schedule not in ("default", "karras", "exponential"):
        raise ValueError(
            f"unsupported sigma_schedule {options.sigma_schedule!r} for {name}; "
            "use 'default', 'karras' or 'exponential'"
        )


def _planned_levels(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> tuple[Tensor, Tensor]:
    """(timesteps int64, sigmas float32) of the model calls: the grid's own levels, or a ramp whose
    timesteps are rounded (Karras) or truncated (exponential) as the reference does."""
    train_sigmas = schedule.sigmas()
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    # Unlike DDIM's grid, cut from steps + 1 points; spaced in every case, which validates the spacing.
    timesteps = spaced_timesteps(schedule, steps, options, extra_point=True)
    if options.sigma_schedule == "karras":
        sigmas = karras_sigmas(sigma_min, sigma_max, steps, options.rho)
        return schedule.sigma_to_t(sigmas, torch.float64).round().to(torch.int64), sigmas
    if options.sigma_schedule == "exponential":
        sigmas = exponential_sigmas(sigma_min, sigma_max, steps)
        return schedule.sigma_to_t(sigmas, torch.float64).to(torch.int64), sigmas.to(torch.float32)
    return timesteps, train_sigmas[timesteps]


def _multistep_plan(
    name: str, schedule: NoiseSchedule, steps: int, options: SamplerOptions, final_min_from_spacing: bool
) -> Plan:
    check_steps(schedule, steps)
    _check_options(name, options)
    timesteps, sigmas = _planned_levels(schedule, steps, options)
    if options.final_sigmas_type == "zero":
        final = torch.zeros(1)
    elif final_min_from_spacing and options.sigma_schedule != "default":
        final = sigmas[-1:]  # UniPC ends at its own spacing's last level (for one step: sigma_max)
    else:
        final = schedule.sigmas()[:1]
    sigmas = torch.cat([sigmas, final]).to(torch.float32)
    # The reference's init_noise_sigma is 1 in the variance-preserving scale.
    init_noise_scale = float((1 + sigmas[0].double() ** 2) ** 0.5)
    return Plan(
        sigmas=sigmas, timesteps=timesteps.to(torch.float32), init_noise_scale=init_noise_scale, planned_steps=steps
    )


def plan_dpmpp(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """DPMSolverMultistepScheduler's discretization (both DPM++ 2M variants)."""
    return _multistep_plan("dpmpp_2m", schedule, steps, options, final_min_from_spacing=False)


def plan_unipc(schedule: NoiseSchedule, steps: int, options: SamplerOptions) -> Plan:
    """UniPCMultistepScheduler's discretization."""
    return _multistep_plan("unipc", schedule, steps, options, final_min_from_spacing=True)


# ---------------------------------------------------------------- samplers


def _log_snr_step(sigma: Tensor, sigma_next: Tensor) -> float:
    """h = lambda_next - lambda with lambda = -log(sigma)."""
    return math.log(sigma.item() / sigma_next.item())


def _dpmpp_first_order_last(plan: Plan, i: int, options: SamplerOptions) -> bool:
    # The reference takes a first-order last step below 15 planned steps (counted before any
    # img2img truncation); a last step to sigma 0 is first order anyway (it lands on x0).
    return i == plan.steps - 1 and options.lower_order_final and plan.planned_steps < 15


def _dpmpp_x0_estimate(
    plan: Plan, i: int, denoised: Tensor, previous: Tensor | None, options: SamplerOptions
) -> Tensor:
    """x0 to move towards over step i: this step's prediction, or for second order that prediction
    extrapolated (linearly in lambda, from the previous one) to the middle of the step."""
    if previous is None or options.solver_order == 1 or _dpmpp_first_order_last(plan, i, options):
        return denoised
    sigmas = plan.sigmas
    h = _log_snr_step(sigmas[i], sigmas[i + 1])
    if h == 0:  # karras/exponential ending at sigma_min repeat their last level: nothing moves
        return denoised
    r = _log_snr_step(sigmas[i - 1], sigmas[i]) / h
    return denoised + (denoised - previous) / (2 * r)


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM-Solver++(2M): deterministic, one model call per step."""
    previous = None
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        if sigma_next == 0:
            x = denoised  # nothing of the noise slice is left
        else:
            keep = (sigma_next / sigma).item()  # exp(-h)
            x = keep * x + (1 - keep) * _dpmpp_x0_estimate(plan, i, denoised, previous, options)
        previous = denoised
        x = after_step(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """DPM-Solver++(2M) SDE: each step also forgets part of the old noise slice and draws that
    much fresh noise, so the latent keeps total noise sigma_next but with new randomness.

    options.eta_ancestral scales how much is renewed (1: the reference's SDE, 0: plain 2M);
    options.s_noise scales the fresh noise.
    """
    if noise is None:
        raise ValueError("dpmpp_2m_sde draws fresh noise every step: pass a noise source")
    eta = options.eta_ancestral
    previous = None
    for i in range(plan.steps):
        sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
        denoised = denoise(x, sigma, plan.timesteps[i])
        if sigma_next == 0:
            x = denoised
        else:
            h = _log_snr_step(sigma, sigma_next)
            # Of the old noise slice keep exp(-h) (the ODE) times exp(-eta h) (renewal).
            keep = math.exp(-h - eta * h)
            x = keep * x + (1 - keep) * _dpmpp_x0_estimate(plan, i, denoised, previous, options)
            fresh = sigma_next.item() * math.sqrt(-math.expm1(-2 * eta * h)) * options.s_noise
            x = x + fresh * noise()
        previous = denoised
        x = after_step(callback, i, x, denoised)
    return x


def _unipc_rhos(h: float, r: float) -> tuple[float, float]:
    """Weights of the UniC-2 corrector (bh2, x0 form) on the older slope and on the new one.

    h is the corrected step's log-SNR length; r = (lambda_older - lambda_start) / h < 0 places
    the older prediction. UniPC's order conditions are [[1, 1], [r, 1]] rho = b, where with
    B(h) = expm1(-h):  g1 = expm1(-h) / -h - 1,  g2 = g1 / -h - 1/2,  b = (g1, 2 g2) / B(h).
    """
    b_h = math.expm1(-h)
    g1 = b_h / -h - 1
    g2 = g1 / -h - 0.5
    b1, b2 = g1 / b_h, 2 * g2 / b_h
    rho_older = (b1 - b2) / (1 - r)
    return rho_older, b1 - rho_older


def _unic_correct(start: Tensor, x0s: list[Tensor], denoised: Tensor, lam: list[float], i: int, order: int) -> Tensor:
    """UniC: rebuild step i-1 from its start, adding the slope towards the new prediction.

    Like the reference it does not read the predicted x: a callback's edit to it only steered
    the model call just made.
    """
    h = lam[i] - lam[i - 1]
    b_h = math.expm1(-h)  # = sigma_i / sigma_{i-1} - 1
    newest = x0s[-1]
    if order == 1:
        slope = 0.5 * (denoised - newest)
    else:
        r = (lam[i - 2] - lam[i - 1]) / h
        rho_older, rho_new = _unipc_rhos(h, r)
        slope = rho_older * (x0s[-2] - newest) / r + rho_new * (denoised - newest)
    return (b_h + 1) * start - b_h * newest - b_h * slope


def _unip_predict(x: Tensor, x0s: list[Tensor], lam: list[float], i: int, order: int) -> Tensor:
    """UniP: first order moves the noise slice towards x0 like DPM++; second order adds half the
    slope between this prediction (x0s[-1]) and the previous one."""
    denoised = x0s[-1]
    if lam[i + 1] == math.inf:  # sigma 0: nothing of the noise slice is left
        return denoised
    h = lam[i + 1] - lam[i]
    b_h = math.expm1(-h)
    x = (b_h + 1) * x - b_h * denoised
    if order == 2 and h > 0:  # (h = 0: a repeated final level, nothing moves)
        r = (lam[i - 1] - lam[i]) / h
        x = x - b_h * 0.5 * (x0s[-2] - denoised) / r
    return x


def sample_unipc(
    denoise: Denoiser,
    x: Tensor,
    plan: Plan,
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    options: SamplerOptions = SamplerOptions(),
    schedule: NoiseSchedule = NoiseSchedule(),
) -> Tensor:
    """UniPC (bh2, predicting x0): a UniP predictor step, then, once the model has been called at
    the new point, a UniC corrector that redoes that step using the new x0 prediction as well,
    at no extra model call. The last step is not corrected (no later prediction exists).
    """
    lam = [-math.log(s) if s > 0 else math.inf for s in plan.sigmas.tolist()]  # log-SNR of each level
    x0s: list[Tensor] = []  # the last two x0 predictions, newest last
    start, last_order = x, 0  # where the last predictor step started from, and its order
    for i in range(plan.steps):
        denoised = denoise(x, plan.sigmas[i], plan.timesteps[i])
        if i > 0:
            x = _unic_correct(start, x0s, denoised, lam, i, last_order)
        x0s = (x0s + [denoised])[-2:]
        order = min(options.solver_order, plan.steps - i) if options.lower_order_final else options.solver_order
        order = min(order, i + 1)  # warm-up: no older prediction on the first step
        start, last_order = x, order
        x = _unip_predict(x, x0s, lam, i, order)
        x = after_step(callback, i, x, denoised)
    return x


MULTISTEP_ALGORITHMS: dict[str, Algorithm] = {
    "dpmpp_2m": Algorithm(plan=plan_dpmpp, run=sample_dpmpp_2m, stochastic=False),
    "dpmpp_2m_sde": Algorithm(plan=plan_dpmpp, run=sample_dpmpp_2m_sde, stochastic=True),
    "unipc": Algorithm(plan=plan_unipc, run=sample_unipc, stochastic=False),
}
