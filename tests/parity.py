"""What the parity tests share: the tolerance and how an error is measured."""

from __future__ import annotations

import torch

TOL = 1e-4  # max abs error against the reference, fp32


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()
