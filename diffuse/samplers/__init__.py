"""Samplers by the names people use: A1111's labels ("DPM++ 2M Karras", "Euler a") and diffusers' configs.

A `Sampler` is an algorithm key, the options that change its numbers, and the model's training
noise schedule. Everything sampler-specific lives in the three algorithm modules; this file only
translates names and scheduler_config.json dicts into them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

from torch import Tensor

from diffuse.samplers.k_samplers import K_ALGORITHMS
from diffuse.samplers.multistep import MULTISTEP_ALGORITHMS
from diffuse.samplers.schedule import (
    Algorithm,
    Denoiser,
    NoiseSchedule,
    NoiseSource,
    Plan,
    SamplerOptions,
    StepCallback,
)
from diffuse.samplers.vp_samplers import VP_ALGORITHMS

ALGORITHMS: dict[str, Algorithm] = {**K_ALGORITHMS, **MULTISTEP_ALGORITHMS, **VP_ALGORITHMS}

# A1111 label -> (algorithm key, A1111's own aliases for it).
_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Euler": ("euler", ("k_euler",)),
    "Euler a": ("euler_ancestral", ("k_euler_a", "k_euler_ancestral")),
    "Heun": ("heun", ("k_heun",)),
    "LMS": ("lms", ("k_lms",)),
    "DPM2": ("dpm2", ("k_dpm_2",)),
    "DPM2 a": ("dpm2_ancestral", ("k_dpm_2_a",)),
    "DPM++ SDE": ("dpmpp_sde", ("k_dpmpp_sde",)),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", ("k_dpmpp_2s_a",)),
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m",)),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", ("k_dpmpp_2m_sde",)),
    "DDIM": ("ddim", ()),
    "PLMS": ("plms", ()),
    "UniPC": ("unipc", ()),
    "LCM": ("lcm", ("k_lcm",)),
    "DDPM": ("ddpm", ()),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(_LABELS)


def sampler_aliases(label: str) -> tuple[str, ...]:
    """A1111's other names for the sampler `label` (what its /sdapi/v1/samplers lists as aliases)."""
    return _LABELS[label][1]


_LABEL_OF_ALGORITHM = {algorithm: label for label, (algorithm, _) in _LABELS.items()}

# A1111's "Schedule type" <-> SamplerOptions.sigma_schedule ("Automatic": the sampler's own spacing).
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Karras", "Exponential")
_SIGMA_SCHEDULE_OF_TYPE = {"Automatic": "default", "Karras": "karras", "Exponential": "exponential"}
_TYPE_OF_SIGMA_SCHEDULE = {v: k for k, v in _SIGMA_SCHEDULE_OF_TYPE.items()}
# Trailing words of a name that pick the schedule type ("ka": A1111's old "k_dpmpp_2m_ka").
_SCHEDULE_SUFFIXES = {"karras": "karras", "ka": "karras", "exponential": "exponential"}
# The samplers whose sigmas can follow a Karras or exponential ramp (the rest visit whole timesteps).
_RAMPED = set(K_ALGORITHMS) | set(MULTISTEP_ALGORITHMS)
# The samplers whose fresh-noise share SamplerOptions.eta_ancestral sets.
_ANCESTRAL = {"euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"}


def _compact(text: str) -> str:
    """Case, spaces, underscores and dashes ignored; "++" read as "pp" ("DPM++ 2M" ~ "dpmpp_2m")."""
    return re.sub(r"[\s_\-]+", "", text.lower()).replace("++", "pp")


# Every spelling we accept, compacted -> label: the label itself, the algorithm key, A1111's aliases.
_LABEL_OF_KEY: dict[str, str] = {
    _compact(alias): label for label, (algorithm, aliases) in _LABELS.items() for alias in (label, algorithm, *aliases)
}


@dataclass(frozen=True)
class Sampler:
    """One sampling method ready to plan and run: algorithm key, options and training schedule."""

    algorithm: str
    options: SamplerOptions = SamplerOptions()
    schedule: NoiseSchedule = NoiseSchedule()

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown sampler algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}")
        if self.options.sigma_schedule not in _TYPE_OF_SIGMA_SCHEDULE:
            raise ValueError(
                f"unsupported sigma_schedule {self.options.sigma_schedule!r}; "
                f"use one of {', '.join(_TYPE_OF_SIGMA_SCHEDULE)}"
            )

    @property
    def name(self) -> str:
        """A1111's sampler label, e.g. "DPM++ 2M"."""
        return _LABEL_OF_ALGORITHM[self.algorithm]

    @property
    def schedule_type(self) -> str:
        """A1111's "Schedule type": "Automatic", "Karras" or "Exponential"."""
        return _TYPE_OF_SIGMA_SCHEDULE[self.options.sigma_schedule]

    @property
    def label(self) -> str:
        """What a user types to get this sampler back, e.g. "DPM++ 2M Karras"."""
        return self.name if self.schedule_type == "Automatic" else f"{self.name} {self.schedule_type}"

    @property
    def stochastic(self) -> bool:
        """Whether a run draws fresh noise (DDIM does when eta > 0; ancestral ones unless eta_ancestral = 0)."""
        if self.algorithm == "ddim":
            return self.options.eta > 0
        if self.algorithm in K_ALGORITHMS and ALGORITHMS[self.algorithm].stochastic:
            return self.options.eta_ancestral > 0
        return ALGORITHMS[self.algorithm].stochastic

    def plan(self, steps: int) -> Plan:
        return ALGORITHMS[self.algorithm].plan(self.schedule, steps, self.options)

    def run(
        self,
        denoise: Denoiser,
        x: Tensor,
        plan: Plan,
        noise: NoiseSource | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Walk `plan` from x at plan.sigmas[0]; `noise` gives fresh N(0, 1) noise for stochastic samplers."""
        return ALGORITHMS[self.algorithm].run(denoise, x, plan, noise, callback, self.options, self.schedule)


def _parse_name(name: str) -> tuple[str, str | None]:
    """A1111 label (case/space tolerant) or alias -> (label, sigma schedule from a trailing word or None)."""
    words = [w for w in re.split(r"[\s_]+", name.strip()) if w]
    suffix = None
    if len(words) > 1 and words[-1].lower() in _SCHEDULE_SUFFIXES:
        suffix = _SCHEDULE_SUFFIXES[words.pop().lower()]
    label = _LABEL_OF_KEY.get(_compact("".join(words)))
    if label is None:
        raise ValueError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)} "
            f"(optionally followed by 'Karras' or 'Exponential')"
        )
    return label, suffix


def _parse_schedule_type(schedule_type: str | None) -> str | None:
    """ "Karras"/"Exponential" -> sigma schedule; None or "Automatic" -> None (no override)."""
    if schedule_type is None:
        return None
    for known, sigma_schedule in _SIGMA_SCHEDULE_OF_TYPE.items():
        if schedule_type.strip().lower() == known.lower():
            return None if known == "Automatic" else sigma_schedule
    raise ValueError(f"unknown schedule type {schedule_type!r}; valid: {', '.join(SCHEDULE_TYPES)}")


def _schedule_from_config(config: dict) -> NoiseSchedule:
    """The training noise schedule a scheduler_config.json describes (SD's defaults for what it leaves out)."""
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler_config: trained_betas (an explicit beta table) is not supported")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler_config: rescale_betas_zero_snr=True is not supported")
    names = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    return NoiseSchedule(**{k: config[k] for k in names if config.get(k) is not None})


def _options_from_config(config: dict) -> SamplerOptions:
    """The SamplerOptions a scheduler_config.json sets: same-named fields, and the sigma ramp flags."""
    if config.get("use_beta_sigmas"):
        raise ValueError("scheduler_config: use_beta_sigmas=True is not supported (use Karras or exponential sigmas)")
    if config.get("use_karras_sigmas") and config.get("use_exponential_sigmas"):
        raise ValueError("scheduler_config: use_karras_sigmas and use_exponential_sigmas are both set")
    ours = {f.name for f in fields(SamplerOptions)} - {"sigma_schedule"}
    values = {k: v for k, v in config.items() if k in ours and v is not None}
    if config.get("use_karras_sigmas"):
        values["sigma_schedule"] = "karras"
    elif config.get("use_exponential_sigmas"):
        values["sigma_schedule"] = "exponential"
    return SamplerOptions(**values)


def _checked(sampler: Sampler) -> Sampler:
    """Plan once so that an unsupported option fails here, naming itself, rather than mid-generation."""
    sampler.plan(1)
    return sampler


def get_sampler(
    name: str, scheduler_config: dict | None = None, schedule_type: str | None = None, eta: float | None = None
) -> Sampler:
    """A sampler by A1111 name: "Euler a", "dpm++ 2m karras", "k_dpmpp_2m", "euler_ancestral", ...

    A trailing "Karras"/"Exponential" or `schedule_type` picks the sigma ramp ("Automatic": the
    sampler's default, or what scheduler_config asks for). `scheduler_config` (a model's diffusers
    scheduler_config.json) supplies the training schedule and the options it sets; without it,
    Stable Diffusion's. `eta` (A1111's field) is DDIM's eta, or the share of fresh noise of the
    ancestral and SDE samplers; samplers without one ignore it, as A1111 does.
    """
    label, from_name = _parse_name(name)
    from_type = _parse_schedule_type(schedule_type)
    if from_name and from_type and from_name != from_type:
        raise ValueError(f"sampler {name!r} asks for the {from_name} schedule but schedule_type is {schedule_type!r}")
    config = scheduler_config or {}
    algorithm = _LABELS[label][0]
    options = _options_from_config(config)
    chosen = from_name or from_type
    if chosen is not None:
        if algorithm not in _RAMPED:
            raise ValueError(
                f"{label} visits whole training timesteps and has no {chosen} schedule type; use 'Automatic'"
            )
        options = replace(options, sigma_schedule=chosen)
    elif algorithm not in _RAMPED:
        options = replace(options, sigma_schedule="default")  # a model's Karras setting is for ramped samplers
    if eta is not None:
        if algorithm == "ddim":
            options = replace(options, eta=eta)
        elif algorithm in _ANCESTRAL:
            options = replace(options, eta_ancestral=eta)
    return _checked(Sampler(algorithm, options, _schedule_from_config(config)))


# diffusers scheduler class -> algorithm key (DPMSolverMultistep: by its algorithm_type).
_DIFFUSERS_CLASSES = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm2",
    "KDPM2AncestralDiscreteScheduler": "dpm2_ancestral",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "plms",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}
_DPM_ALGORITHM_TYPES = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}

# Config fields that no SamplerOptions field models: accepted only at the value that leaves the
# method as implemented here (per class where diffusers' defaults differ).
_FIXED = {
    "clip_sample": False,
    "thresholding": False,
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
    "euler_at_final": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "lambda_min_clipped": -math.inf,
    "predict_x0": True,
    "disable_corrector": [],
    "solver_p": None,
    "shift_terminal": None,
}
_FIXED_PER_CLASS = {
    ("DPMSolverMultistepScheduler", "solver_type"): "midpoint",
    ("UniPCMultistepScheduler", "solver_type"): "bh2",
    ("DDPMScheduler", "variance_type"): "fixed_small",
    ("DPMSolverMultistepScheduler", "variance_type"): None,
}
# Fields that only matter when one of the fixed switches above is on.
_IRRELEVANT = {"dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift", "time_shift_type"}
_HANDLED = {
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
    "trained_betas",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "algorithm_type",
}


def sampler_from_diffusers_config(config: dict) -> Sampler:
    """The sampler equivalent to a diffusers scheduler config (`scheduler.config`, or scheduler_config.json)."""
    class_name = config.get("_class_name")
    if class_name is None:
        raise ValueError("scheduler config has no _class_name (as scheduler_config.json files carry)")
    if class_name not in _DIFFUSERS_CLASSES:
        raise ValueError(f"unsupported scheduler class {class_name!r}; supported: {', '.join(_DIFFUSERS_CLASSES)}")
    algorithm = _DIFFUSERS_CLASSES[class_name]
    if class_name == "DPMSolverMultistepScheduler":
        algorithm_type = config.get("algorithm_type", "dpmsolver++")
        if algorithm_type not in _DPM_ALGORITHM_TYPES:
            raise ValueError(
                f"DPMSolverMultistepScheduler algorithm_type {algorithm_type!r} is not supported; "
                f"supported: {', '.join(_DPM_ALGORITHM_TYPES)}"
            )
        algorithm = _DPM_ALGORITHM_TYPES[algorithm_type]
    ours = {f.name for f in fields(SamplerOptions)}
    unsupported = []
    for key, value in config.items():
        if key.startswith("_") or key in ours or key in _HANDLED or key in _IRRELEVANT:
            continue
        if (class_name, key) in _FIXED_PER_CLASS:
            expected = _FIXED_PER_CLASS[(class_name, key)]
        elif key in _FIXED:
            expected = _FIXED[key]
        else:
            unsupported.append(f"{key}={value!r} (unknown field)")
            continue
        if value != expected:
            unsupported.append(f"{key}={value!r} (supported: {expected!r})")
    if unsupported:
        raise ValueError(f"{class_name} config has unsupported settings: {'; '.join(unsupported)}")
    options = _options_from_config(config)
    if options.sigma_schedule != "default" and algorithm not in _RAMPED:
        raise ValueError(f"{class_name} has no {options.sigma_schedule} sigmas")
    return _checked(Sampler(algorithm, options, _schedule_from_config(config)))


__all__ = [
    "ALGORITHMS",
    "SAMPLER_NAMES",
    "SCHEDULE_TYPES",
    "Sampler",
    "get_sampler",
    "sampler_from_diffusers_config",
]
