"""An exponential moving average (EMA) of the trained weights, what diffusion models are sampled with.

Each optimizer step moves every averaged weight a little toward the live one:

    average <- average + (1 - d) * (weight - average),   d = min(decay, (1 + step) / (10 + step))

The averaged weights follow the trained ones with a lag of about 1 / (1 - decay) steps,
smoothing out the step-to-step noise of the last updates. The ramp in d keeps the first
steps from being dominated by the random initial weights: at step 0 the average moves 90%
of the way, and d only reaches `decay` after ~1 / (1 - decay) steps, so even a short run
(a few thousand steps, like the default model's) ends with a useful average.

The averages are models of their own, held next to the trained ones and saved in the same
checkpoint under "<name>.ema", so a resumed run carries on the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SUFFIX = ".ema"  # a trained model "unet" has its average checkpointed as "unet.ema"


def decay_at(decay: float, step: int) -> float:
    """The decay of the update that follows `step` completed optimizer steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """Moving averages of some models' parameters (buffers are copied as they are)."""

    def __init__(self, models: dict[str, nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be between 0 and 1, not {decay}")
        self.decay = decay
        self.live = dict(models)
        self.averages = {
            name + SUFFIX: copy.deepcopy(model).requires_grad_(False).eval() for name, model in models.items()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the live weights after the optimizer step that completed `step` steps (0-based: the first is 0)."""
        weight = 1.0 - decay_at(self.decay, step)
        for name, model in self.live.items():
            average = self.averages[name + SUFFIX]
            for mine, live in zip(average.parameters(), model.parameters()):
                mine.lerp_(live.detach(), weight)
            for mine, live in zip(average.buffers(), model.buffers()):
                mine.copy_(live)

    @torch.no_grad()
    def copy_to_live(self) -> None:
        """Replace the live weights by their averages (the raw ones stay in the checkpoints)."""
        for name, model in self.live.items():
            model.load_state_dict(self.averages[name + SUFFIX].state_dict())
