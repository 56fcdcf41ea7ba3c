"""Filling a network built on the meta device with a checkpoint's tensors.

Networks are built without memory (`torch.device("meta")`) and then take the
checkpoint's tensors directly, so loading a 4 GB checkpoint costs no random
initialisation and no second copy. Every mismatch is reported by name before
anything is assigned.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.pages import PageReturner
from diffuse.checkpoints.reader import check_finite

M = TypeVar("M", bound=nn.Module)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def build_and_fill(
    make: Callable[[], M],
    state: MutableMapping[str, torch.Tensor],
    path: str | Path,
    component: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> M:
    """Build `make()` on the meta device and load `state` into it, strictly.

    Raises CheckpointError naming the file, the component and the offending
    tensors for missing, unexpected, mis-shaped or non-finite weights, the last
    checked after the cast to `dtype`: float32 weights that are finite can still
    overflow float16 (65504) and would give black images. Once the names and
    shapes pass, `state` is consumed: each tensor leaves it as its converted copy
    (dtype, device, then `layout`) is made and checked, so a caller that holds no
    other reference gets each source tensor's memory back at once and the peak
    stays near one copy of the weights, not two. On any error nothing is assigned
    to a module and the caller is left with no network.
    """
    with torch.device("meta"):
        module = make()
    expected = module.state_dict()

    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(path, f"{component}: missing tensor(s) {_listing(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(
            path,
            f"{component}: unexpected tensor(s) {_listing(unexpected)}; "
            "the checkpoint does not match the detected architecture",
        )
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                path, f"{component}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(path, f"{component}: tensor {name} has dtype {got.dtype}, expected floating point")
    # Each tensor's file pages are given back once read (diffuse.checkpoints.pages): the
    # checkpoint is never resident in full beside the weights made from it.
    pages = PageReturner(path)
    ready = {}
    for k in expected:
        source = state.pop(k)
        tensor = source.to(device=device, dtype=dtype)
        # One pass over what will run: a cast keeps NaN and Inf, so this also catches the source's.
        if not bool(torch.isfinite(tensor).all()):
            _refuse_non_finite(f"{component}.{k}", source, tensor, path)
        ready[k] = layout(tensor) if layout is not None else tensor.contiguous()
        pages.give_back(source)  # checked and copied (or kept as is, backed by the file): not needed resident
    module.load_state_dict(ready, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _refuse_non_finite(name: str, source: torch.Tensor, cast: torch.Tensor, path: str | Path) -> None:
    """Raise for a tensor that is not finite once cast: as stored (NaN or Inf in the file), or
    only in the run's dtype (finite values beyond its range)."""
    check_finite({name: source}, path)  # raises when the file itself holds NaN or Inf
    dtype = str(cast.dtype).removeprefix("torch.")
    raise CheckpointError(
        path,
        f"tensor {name} overflows {dtype}: {int(torch.isinf(cast).sum())} of its "
        f"{cast.numel()} values are beyond {dtype}'s ±{torch.finfo(cast.dtype).max:g} "
        f"(largest {source.abs().max().item():g}); load it in float32",
    )
