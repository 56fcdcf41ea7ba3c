"""The base -> refiner hand-off's arithmetic: where the plan of noise levels is cut, the sampler of
the model's part, the step numbers both parts report, and what the PNG records of it (A1111's
refiner; diffusers' denoising_end and denoising_start)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from diffuse.generation import Step
from diffuse.samplers import Sampler
from diffuse.samplers.schedule import Plan

if TYPE_CHECKING:
    from diffuse.pipeline import Pipeline

Callback = Callable[[Step], None]


def split_plan(plan: Plan, switch_at: float, train_timesteps: int) -> tuple[Plan, Plan]:
    """The base's and the refiner's parts of a plan: the base takes the steps whose timestep is at
    or above (1 - switch_at) of the training timesteps, the refiner the rest, as diffusers'
    denoising_end and denoising_start cut them. ValueError when either part would be empty."""
    cutoff = int(round(train_timesteps - switch_at * train_timesteps))
    k = int((plan.timesteps >= cutoff).sum())
    if not 0 < k < plan.steps:
        part = "the model" if k == 0 else "the refiner"
        raise ValueError(f"refiner_switch_at {switch_at} over {plan.steps} steps leaves none to {part}")
    base = replace(plan, sigmas=plan.sigmas[: k + 1], timesteps=plan.timesteps[:k])
    return base, replace(plan, sigmas=plan.sigmas[k:], timesteps=plan.timesteps[k:])


def head_sampler(sampler: Sampler) -> Sampler:
    """The sampler for the model's part of a hand-off: that part does not reach the schedule's end,
    so a multistep solver keeps its full order there, as diffusers' denoising_end does (the steps
    of lower order belong to the refiner's last steps, whose history starts afresh at the switch)."""
    return replace(sampler, options=replace(sampler.options, lower_order_final=False))


def counted(callback: Callback | None, before: int, total: int) -> Callback | None:
    """A hand-off's step reports numbered over both models' steps."""
    if callback is None:
        return None
    return lambda step: callback(replace(step, index=step.index + before, total=total))


def refiner_info(refiner: Pipeline | None, switch_at: float | None) -> dict:
    """A1111's "Refiner: name [hash]" and "Refiner switch at" for a hand-off (nothing without one)."""
    if refiner is None:
        return {}
    name = refiner.model_name if refiner.model_hash is None else f"{refiner.model_name} [{refiner.model_hash}]"
    return {"refiner": name, "refiner_switch_at": switch_at}
