"""The figures of one recorded run, in the order the report shows them.

Each maker is `maker(pipe, rec, out) -> Figure`: it draws from the Recording (and, where a figure
needs more of the model, from the pipeline's own parts), writes its PNG into the report folder `out`
and states what it shows in the run's own numbers.
"""

from __future__ import annotations

from collections.abc import Callable

from diffuse.illustrate.figures_run_guidance import attention, guidance
from diffuse.illustrate.figures_run_steps import decode_steps, schedule, steps
from diffuse.illustrate.figures_run_text import components, embeddings, tokens
from diffuse.illustrate.figures_run_vector import vector

MAKERS: dict[str, Callable] = {
    "components": components,
    "tokens": tokens,
    "embeddings": embeddings,
    "vector": vector,
    "steps": steps,
    "schedule": schedule,
    "guidance": guidance,
    "attention": attention,
}

__all__ = ["MAKERS", "decode_steps"]
