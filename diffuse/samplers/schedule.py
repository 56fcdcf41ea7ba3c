"""Noise schedules, timestep spacing and the plan a sampler walks.

Every sampler here works on the "noise slice" picture of the seed article in
its variance-exploding form: a noisy latent is  x = x0 + sigma * noise,  with
sigma falling from large to (near) zero over the steps. The UNet was trained on
the variance-preserving form  x_vp = sqrt(abar) x0 + sqrt(1 - abar) noise,
which is the same point scaled by 1/sqrt(1 + sigma^2), where
sigma = sqrt((1 - abar) / abar).

This module holds what all samplers share: the training schedule with its
sigma <-> timestep conversions, the timestep spacings, the sigma ramps, the
eps/v conversion and the `Plan` (sigmas and timesteps) each sampler walks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# x0 prediction for latents x at noise level sigma, with the UNet told timestep t.
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
# Fresh standard-normal noise shaped like the latents (drawn from the run's seeded generators).
NoiseSource = Callable[[], Tensor]
# Called after step i with the new latents and that step's x0 prediction; may return replacement latents.
StepCallback = Callable[[int, Tensor, Tensor], Tensor | None]

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward-diffusion schedule a model was trained with (SD 1.x/2.x: scaled linear, 1000 steps)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}; use 'scaled_linear' or 'linear'")
        _check_prediction_type(self.prediction_type)

    def betas(self) -> Tensor:
        # float32 throughout, as the reference computes them: parity depends on the rounding.
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)

    def alphas_cumprod(self) -> Tensor:
        """abar_t: the fraction of the clean latent's variance left at training timestep t."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t (ascending)."""
        abar = self.alphas_cumprod()
        return ((1 - abar) / abar) ** 0.5

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The noise level at (possibly fractional) timesteps t, linear between training steps (float64)."""
        table = self.sigmas().to(torch.float64)
        t = t.to(torch.float64).clamp(0, table.numel() - 1)
        low = t.floor().clamp(max=table.numel() - 2).long()
        return table[low] + (table[low + 1] - table[low]) * (t - low)

    def sigma_to_t(self, sigma: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (fractional) timestep of a noise level, interpolating log-sigma between training steps.

        `dtype` is the precision the reference works in: float32 for the k-samplers, float64 for
        the multistep solvers, whose exponential ramp truncates these values.
        """
        log_sigmas = self.sigmas().log().to(dtype)
        log_sigma = sigma.to(dtype).clamp(min=1e-10).log().reshape(-1)
        # The training level at or just below each sigma (log_sigmas ascend), kept inside the table.
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(sigma.shape)


@dataclass(frozen=True)
class SamplerOptions:
    """Every knob that changes a sampler's numbers. Names and defaults follow diffusers'
    scheduler_config.json, so a model folder's scheduler settings carry over unchanged."""

    timestep_spacing: str = "leading"  # "leading" | "linspace" | "trailing": which training timesteps to visit
    steps_offset: int = 1  # added to "leading" timesteps (SD's configs use 1)
    sigma_schedule: str = "default"  # "default" (the timesteps' own sigmas) | "karras" | "exponential"
    interpolation_type: str = "linear"  # sigmas at fractional timesteps: "linear" | "log_linear"
    rho: float = 7.0  # Karras spacing exponent
    eta: float = 0.0  # DDIM: 0 deterministic, 1 as much fresh noise as DDPM
    s_noise: float = 1.0  # ancestral samplers: scale of the fresh noise
    solver_order: int = 2  # multistep solvers (DPM++, UniPC)
    lower_order_final: bool = True  # multistep: first-order last step(s) for stability at few steps
    final_sigmas_type: str = "zero"  # "zero" | "sigma_min": where multistep/k solvers end
    set_alpha_to_one: bool = False  # DDIM/PLMS: whether the step after timestep 0 is noise-free
    original_inference_steps: int = 50  # LCM: the distillation grid
    timestep_scaling: float = 10.0  # LCM boundary-condition scale
    skip_prk_steps: bool = True  # PNDM: False asks for its Runge-Kutta warm-up, which PLMS does not do
    eta_ancestral: float = 1.0  # ancestral/SDE k-samplers: 0 no fresh noise, 1 the full ancestral share


# ---------------------------------------------------------------- spacing and ramps


def check_steps(schedule: NoiseSchedule, steps: int) -> None:
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")


def spaced_timesteps(
    schedule: NoiseSchedule, steps: int, options: SamplerOptions, *, whole: bool = True, extra_point: bool = False
) -> Tensor:
    """The training timesteps a plan of `steps` model calls visits, descending, per diffusers' timestep_spacing.

    whole: int64 timesteps on the training schedule (DDIM-line and multistep schedulers); otherwise
        float32, with linspace's points left fractional (the k-samplers interpolate sigmas there).
    extra_point: space steps + 1 points and drop the cleanest (the multistep schedulers' grid);
        trailing spacing counts `steps` points down from the noisiest timestep either way.
    The float arithmetic follows numpy's linspace/arange as the references use them, so that
    timesteps landing on .5 round alike (half to even).
    """
    check_steps(schedule, steps)
    points = steps + 1 if extra_point else steps
    timesteps = _spacing(schedule.num_train_timesteps, steps, points, options, round_linspace=whole)
    if extra_point and options.timestep_spacing != "trailing":
        timesteps = timesteps[:-1]
    if not whole:
        return timesteps.to(torch.float32)
    timesteps = timesteps.to(torch.int64)
    if not 0 <= timesteps[-1] <= timesteps[0] < schedule.num_train_timesteps:
        raise ValueError(
            f"leading spacing with steps_offset={options.steps_offset} and {steps} steps "
            f"reaches timestep {int(timesteps[0])}, outside the {schedule.num_train_timesteps} "
            "training timesteps"
        )
    return timesteps


def _spacing(train: int, steps: int, points: int, options: SamplerOptions, round_linspace: bool) -> Tensor:
    """`points` timesteps (float64, descending) by options.timestep_spacing; trailing takes `steps` of them."""
    index = torch.arange(points, dtype=torch.float64)
    if options.timestep_spacing == "leading":
        # Evenly spaced from 0, shifted up by steps_offset (SD: 1, so the last step is t=1).
        return (index * (train // points)).flip(0) + options.steps_offset
    if options.timestep_spacing == "linspace":
        # Both ends included; numpy's linspace of one point is just its start.
        values = index * ((train - 1) / max(points - 1, 1))
        values[-1] = train - 1 if points > 1 else 0
        return (values.round() if round_linspace else values).flip(0)
    if options.timestep_spacing == "trailing":
        # Evenly spaced down from the noisiest timestep. numpy's arange takes its stride as the
        # difference of its first two values, rounding included; it can also yield one point too
        # many (61 steps: a 62nd at timestep -1), which a plan leaves out.
        stride = (train - train / steps) - train
        return (train + index[:steps] * stride).round() - 1
    raise ValueError(
        f"unsupported timestep_spacing {options.timestep_spacing!r}; use {', '.join(map(repr, TIMESTEP_SPACINGS))}"
    )


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) spacing: uniform in sigma^(1/rho), dense near the clean end (float32)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(torch.float32)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> Tensor:
    """Evenly spaced in log-sigma (float64)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """The discretization one run walks: `steps` model calls from sigmas[0] down to sigmas[-1].

    sigmas:    [steps + 1] float32, descending; the last is 0 for most samplers,
               or a small final noise level (DDIM, PLMS) that the pipeline
               removes by converting back to the UNet's scale.
    timesteps: [steps] float32, what the UNet is told at sigmas[i].
    init_noise_scale: txt2img starts from  noise * init_noise_scale.
    planned_steps: the step count the plan was made for, kept through img2img truncation:
               strength is measured in it (PLMS makes one model call more), and samplers
               whose reference stride or order depends on it read it.
    """

    sigmas: Tensor
    timesteps: Tensor
    init_noise_scale: float
    planned_steps: int

    @property
    def steps(self) -> int:
        return self.timesteps.numel()

    def from_strength(self, strength: float) -> Plan:
        """img2img on a whole plan: skip its first planned_steps - int(planned_steps * strength)
        steps, as the reference pipelines do."""
        steps = self.planned_steps
        start = steps - min(int(steps * strength), steps)
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:])


@dataclass(frozen=True)
class Algorithm:
    """One sampler: how it discretizes the schedule, and the loop that walks it.

    plan(schedule, steps, options) -> Plan
    run(denoise, x, plan, noise, callback, options, schedule) -> final latents (same scale as plan.sigmas[-1])
    """

    plan: Callable[[NoiseSchedule, int, SamplerOptions], Plan]
    run: Callable[..., Tensor]
    stochastic: bool


def after_step(callback: StepCallback | None, i: int, x: Tensor, denoised: Tensor) -> Tensor:
    """Hand step i's result to the callback; continue from its replacement if it returns one."""
    replaced = callback(i, x, denoised) if callback is not None else None
    return x if replaced is None else replaced


# ---------------------------------------------------------------- what the UNet predicts


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def prediction_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma_vp: Tensor, prediction_type: str) -> Tensor:
    """What a UNet trained for `prediction_type` outputs at x_vp = alpha x0 + sigma_vp noise:
    the noise itself, or v = alpha noise - sigma_vp x0 (Salimans & Ho 2022)."""
    _check_prediction_type(prediction_type)
    return noise if prediction_type == "epsilon" else alpha * noise - sigma_vp * x0


def predicted_x0(x: Tensor, sigma: Tensor, alpha: Tensor, prediction: Tensor, prediction_type: str) -> Tensor:
    """The clean latent a UNet output implies for x = x0 + sigma noise, with alpha = 1 / sqrt(1 + sigma^2)
    the signal scale of the latent it saw (x_vp = alpha x): the inverse of prediction_target."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x - sigma * prediction
    # v = alpha noise - sigma_vp x0 and x_vp = alpha x0 + sigma_vp noise give x0 = alpha x_vp - sigma_vp v.
    return alpha * (x * alpha) - (sigma * alpha) * prediction


def make_denoiser(predict: Callable[[Tensor, Tensor], Tensor], prediction_type: str) -> Denoiser:
    """Wrap a UNet-style predictor (x_vp, t) -> epsilon or v into a Denoiser (x, sigma, t) -> x0.

    The UNet sees the variance-preserving latent x / sqrt(1 + sigma^2); its noise
    (or v) prediction is turned into the clean-latent estimate every sampler steps with.
    """
    _check_prediction_type(prediction_type)

    def denoise(x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        alpha = (1 + sigma.to(torch.float32) ** 2) ** -0.5  # sqrt(abar): signal scale in the UNet's space
        return predicted_x0(x, sigma, alpha, predict(x * alpha, t), prediction_type)

    return denoise
