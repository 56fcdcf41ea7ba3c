"""Noise schedules: how much noise each training timestep holds, and the plan a sampler walks.

Every sampler here works on the "noise slice" picture of the seed article in
its variance-exploding form: a noisy latent is  x = x0 + sigma * noise,  with
sigma falling from large to (near) zero over the steps. The UNet was trained on
the variance-preserving form  x_vp = sqrt(abar) x0 + sqrt(1 - abar) noise,
which is the same point scaled by 1/sqrt(1 + sigma^2), where
sigma = sqrt((1 - abar) / abar). `Plan` carries both the sigmas and the
timesteps the UNet is told, so each sampler can be one short function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

# x0 prediction for latents x at noise level sigma, with the UNet told timestep t.
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
# Fresh standard-normal noise shaped like the latents (drawn from the run's seeded generators).
NoiseSource = Callable[[], Tensor]
# Called after step i with the new latents and that step's x0 prediction; may return replacement latents.
StepCallback = Callable[[int, Tensor, Tensor], Optional[Tensor]]


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
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; use 'epsilon' or 'v_prediction'")

    def betas(self) -> Tensor:
        # float32 throughout, as the reference computes them: parity depends on the rounding.
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=torch.float32) ** 2
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float32)

    def alphas_cumprod(self) -> Tensor:
        """abar_t: the fraction of the clean latent's variance left at training timestep t."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t (ascending)."""
        abar = self.alphas_cumprod()
        return ((1 - abar) / abar) ** 0.5

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of a noise level, interpolating log-sigma between training steps."""
        log_sigmas = self.sigmas().log()
        log_sigma = sigma.to(torch.float32).clamp(min=1e-10).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas.reshape(1, -1)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=log_sigmas.numel() - 2)
        high = low + 1
        w = ((log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(sigma.shape)


@dataclass(frozen=True)
class Plan:
    """The discretization one run walks: `steps` model calls from sigmas[0] down to sigmas[-1].

    sigmas:    [steps + 1] float32, descending; the last is 0 for most samplers,
               or a small final noise level (DDIM, PLMS) that the pipeline
               removes by converting back to the UNet's scale.
    timesteps: [steps] float32, what the UNet is told at sigmas[i].
    init_noise_scale: txt2img starts from  noise * init_noise_scale.
    landing_sigmas: [steps] where step i's update lands, when the reference steps from
               timestep t to t - train_steps // steps rather than to the next planned
               timestep (DDIM, PLMS); the latent is then read at sigmas[i + 1].
               None: sigmas[1:].
    restart_sigmas: [steps] PLMS only: the level one such stride above each timestep,
               where its second warm-up call restarts the first step from.
    strength_steps: the step count img2img strength is measured in, when the plan makes
               more model calls than steps were asked for (PLMS repeats a timestep).
    schedule:  the training schedule the plan was made from, for samplers that also call
               the model between plan points (DPM2, DPM++ SDE/2S): its sigma_to_t gives
               the timestep of such an intermediate noise level.
    planned_steps: the step count the whole plan was made for, kept through img2img
               truncation: DPM++ 2M picks its last step's order from it, as the reference
               does. None: steps.
    """

    sigmas: Tensor
    timesteps: Tensor
    init_noise_scale: float
    landing_sigmas: Optional[Tensor] = None
    restart_sigmas: Optional[Tensor] = None
    strength_steps: Optional[int] = None
    schedule: Optional[NoiseSchedule] = None
    planned_steps: Optional[int] = None

    @property
    def steps(self) -> int:
        return self.timesteps.numel()

    def from_strength(self, strength: float) -> "Plan":
        """img2img: skip the first steps - int(steps * strength) steps, as the reference pipelines do."""
        steps = self.strength_steps if self.strength_steps is not None else self.steps
        start = steps - min(int(steps * strength), steps)
        return replace(self, sigmas=self.sigmas[start:], timesteps=self.timesteps[start:],
                       landing_sigmas=_tail(self.landing_sigmas, start),
                       restart_sigmas=_tail(self.restart_sigmas, start), strength_steps=None)


def _tail(per_step: Optional[Tensor], start: int) -> Optional[Tensor]:
    return None if per_step is None else per_step[start:]


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) spacing: uniform in sigma^(1/rho), dense near the clean end."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(torch.float32)


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


@dataclass(frozen=True)
class Algorithm:
    """One sampler: how it discretizes the schedule, and the loop that walks it.

    plan(schedule, steps, options) -> Plan
    run(denoise, x, plan, noise, callback, options) -> final latents (same scale as plan.sigmas[-1])
    """

    plan: Callable[[NoiseSchedule, int, SamplerOptions], Plan]
    run: Callable[..., Tensor]
    stochastic: bool


def after_step(callback: Optional[StepCallback], i: int, x: Tensor, denoised: Tensor) -> Tensor:
    """Hand step i's result to the callback; continue from its replacement if it returns one."""
    replaced = callback(i, x, denoised) if callback is not None else None
    return x if replaced is None else replaced


def make_denoiser(predict: Callable[[Tensor, Tensor], Tensor], prediction_type: str) -> Denoiser:
    """Wrap a UNet-style predictor (x_vp, t) -> epsilon or v into a Denoiser (x, sigma, t) -> x0.

    The UNet sees the variance-preserving latent x / sqrt(1 + sigma^2); its noise
    (or v) prediction is turned into the clean-latent estimate every sampler steps with.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")

    def denoise(x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        scale = (1 + sigma.to(torch.float32) ** 2) ** -0.5  # sqrt(abar): signal scale in the UNet's space
        out = predict(x * scale, t)
        if prediction_type == "epsilon":
            return x - sigma * out
        # v = sqrt(abar) noise - sqrt(1 - abar) x0, so x0 = sqrt(abar) x_vp - sqrt(1 - abar) v.
        return scale * (x * scale) - (sigma * scale) * out

    return denoise
