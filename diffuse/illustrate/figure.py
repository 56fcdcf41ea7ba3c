"""A figure of the report: its kind, its file, the caption that states it in the run's own numbers.

Plots are drawn with matplotlib's Agg backend (no display, no network) into files beside the
report's index.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, whatever display the machine has

from matplotlib import pyplot  # noqa: E402

from diffuse.samplers.schedule import NoiseSchedule  # noqa: E402

DPI = 110


@dataclass
class Figure:
    kind: str  # "components", "tokens", "embeddings", "steps", "schedule", "forward_diffusion", ...
    file: str  # the image's file name, relative to the report's folder
    caption: str  # what the figure shows, in this run's numbers
    numbers: dict[str, Any] = field(default_factory=dict)  # the figure's numbers, written into report.json

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "caption": self.caption, **self.numbers}


def save(fig: pyplot.Figure, folder: Path, name: str) -> str:
    """Write a matplotlib figure as PNG into `folder`, close it, and return its file name."""
    fig.savefig(folder / name, dpi=DPI, bbox_inches="tight")
    pyplot.close(fig)
    return name


def note_figure(kind: str, out: Path, note: str) -> Figure:
    """A figure that says why this run has nothing of its kind to draw, so the report still has its place."""
    fig, ax = pyplot.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=10, wrap=True)
    return Figure(kind, save(fig, out, f"{kind}.png"), note, {})


def model_schedule(pipe) -> NoiseSchedule:
    """The noise schedule `pipe`'s model was trained with, as its samplers get it (scheduler config and
    prediction type); the same whichever sampler asks."""
    return pipe.get_sampler("Euler").schedule
