"""Numerics a result can be trusted by: no NaN or infinity ever becomes an image.

Every network output a generation uses (each UNet call, each VAE decode and encode, the
text encoder's context) is checked to be finite. A non-finite value in a reduced precision
(bfloat16, float16: fp16's overflow in the VAE is the classic case) reruns that component
in float32; in float32 it is an error (NonFiniteError) and no image is made.

The float32 component is the same module cast in place, up and back down (in_float32): a
weight loaded in bf16 or fp16 is exactly representable in float32, so the round trip is
lossless, keeps each tensor's memory layout (channels-last kernels stay so) and costs one
float32 copy of that network alone, where a separate float32 copy would keep both in memory
for the whole run. Derived weights follow by themselves: the folded upsample kernels
(diffuse.runtime.upsample) are keyed on their weight's storage and dtype, and the layers
diffuse.runtime.prepare swapped in pick their path by the dtype of each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Self, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

# What the generation info's nan_fallback says for each checked component.
LABELS = {
    "UNet": "UNet float32",
    "VAE decoder": "VAE float32",
    "VAE encoder": "VAE float32",
    "text encoder": "text encoder float32",
}


class NonFiniteError(ValueError):
    """A network's output held NaN or infinity even in float32: no image was made."""


def all_finite(*tensors: Tensor) -> bool:
    """Whether every value of every tensor is finite: one min/max reduction each (NaN
    propagates through both, an infinity is the min or the max), one sync for all."""
    ends = [end.float() for t in tensors if t.numel() for end in torch.aminmax(t)]
    return not ends or bool(torch.stack(ends).isfinite().all())


def network_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a network computes in: its first floating-point parameter's."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


@contextlib.contextmanager
def in_float32(module: nn.Module) -> Iterator[nn.Module]:
    """The module's reduced-precision parameters and buffers cast to float32 in place for the
    block, each back to its own dtype afterwards (also on error). The tensors keep their
    identity (only .data changes), so anything holding a parameter still holds the live one."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in tensors]
    # Memory PyTorch did not allocate (a file mapping: diffuse.runtime.weights_on_disk) is given
    # back afterwards rather than a new copy, so those weights stay on disk: the values are the
    # same, a cast up and back down being exact, unless something wrote to the tensor meanwhile.
    mapped = [None if t.untyped_storage().resizable() else (t.data, t._version) for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.float()  # .float() keeps the strides: channels-last stays channels-last
        yield module
    finally:
        for t, dtype, original in zip(tensors, dtypes, mapped):
            unchanged = original is not None and t._version == original[1]
            t.data = original[0] if unchanged else t.data.to(dtype)


class Fallback:
    """One generation's float32 fallbacks: which components were rerun (`taken`, labels as the
    generation info records them) and, used as a context manager, the casts to undo at its end."""

    def __init__(self, taken: list[str] | None = None) -> None:
        self.taken = [] if taken is None else taken
        self._undo = contextlib.ExitStack()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._undo.close()

    def run(
        self,
        module: nn.Module,
        component: str,
        compute: Callable[[], T],
        *,
        outputs: Callable[[T], tuple[Tensor, ...]] = lambda out: (out,),
        where: str = "",
        stay: bool = False,
    ) -> T:
        """compute(), checked; if its outputs are not all finite and `module` runs in a reduced
        precision, compute() again with the module in float32: for that call only, or with `stay`
        until this Fallback ends. compute() must read the module's dtype when it runs.

        Raises NonFiniteError naming `component` and `where` (e.g. " at step 7 of 20") when
        float32 gives non-finite values too."""
        out = compute()
        if all_finite(*outputs(out)):
            return out
        dtype = network_dtype(module)
        if dtype == torch.float32:
            raise NonFiniteError(f"the {component}'s output had non-finite values{where} in float32; no image was made")
        if stay:
            self._undo.enter_context(in_float32(module))
            out = compute()
        else:
            with in_float32(module):
                out = compute()
        if not all_finite(*outputs(out)):
            raise NonFiniteError(
                f"the {component}'s output had non-finite values{where} in float32 (as in "
                f"{str(dtype).removeprefix('torch.')}); no image was made"
            )
        if LABELS[component] not in self.taken:
            self.taken.append(LABELS[component])
        return out
