"""2x nearest-neighbour upsampling followed by a 3x3 convolution, computed at the low resolution.

Both the UNet and the VAE decoder grow their feature maps this way. Upsampling first
and then convolving spends 9 multiply-adds per output pixel and channel pair, yet
after a nearest upsample each 3x3 window covers only 2x2 distinct source pixels. So
each of the four output phases (even/odd row, even/odd column) is a 2x2 convolution
of the source, with the 3x3 kernel's taps summed where they land on the same source
pixel. That is 4 multiply-adds instead of 9: the same map, with 56% fewer FLOPs and no
4x-sized intermediate (in the VAE decoder these convolutions are a quarter of the work).

Rows of a 3x3 kernel w (columns alike), for output row 2i + phase:
    phase 0 reads source rows i-1, i   with taps  w[0],        w[1] + w[2]
    phase 1 reads source rows i,   i+1 with taps  w[0] + w[1], w[2]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.models.unet import memory_format_of
from diffuse.runtime.device import cpu_has_amx


def _fold_rows(weight: Tensor, phase: int, dim: int) -> Tensor:
    """Sum the kernel taps of one phase along `dim` (2: rows, 3: columns): 3 taps -> 2."""
    first, middle, last = weight.unbind(dim)
    taps = (first, middle + last) if phase == 0 else (first + middle, last)
    return torch.stack(taps, dim)


def phase_kernels(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> [4 * C_out, C_in, 2, 2]: output channel p * C_out + c is phase
    p = 2 * row_phase + column_phase of channel c. Half-precision taps are summed in float32
    and rounded once."""
    folded = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    kernels = [_fold_rows(_fold_rows(folded, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]
    return torch.cat(kernels).to(weight.dtype)


# Below this many source pixels the 2x2 convolution's kernels ran so far under the CPU's
# peak that the plain path was faster (bench/RESULTS.md: kernels not packed, on the AMX host).
MIN_SOURCE_PIXELS = 256

# Where the folding pays: on a GPU, cuDNN ran the plain path as fast or faster (bench/RESULTS.md).
FOLD_ON_DEVICES = ("cpu",)


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, stride-1, padding-1 conv."""
    foldable = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.groups == 1
    # With packed kernels, a CPU without AMX (Zen 4) folded faster than the plain path at every
    # size measured, 1x1 sources included (bench/RESULTS.md); AMX hosts keep the threshold until measured.
    packs = _packs(conv.weight)
    small = x.shape[-2] * x.shape[-1] < MIN_SOURCE_PIXELS and not (packs and not cpu_has_amx())
    if not foldable or small or x.device.type not in FOLD_ON_DEVICES:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    b, _, h, w = x.shape
    c_out = conv.out_channels
    kernels, bias = _folded(conv, packs)
    # One 2x2 convolution computes all four phases at every position of the source padded
    # by one pixel (padding inside the convolution: no padded copy of x). Phase (row, col)
    # of output pixel (2i + row, 2j + col) is channel (2 * row + col) * C + c at (i + row, j + col).
    if kernels.is_mkldnn:
        all_phases = torch.ops.mkldnn._convolution_pointwise(
            x, kernels, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
    else:
        all_phases = F.conv2d(x, kernels, bias, padding=1)
    # Interleaving the phases is one copy: that address is linear in (c, i, row, j, col),
    # so a strided view of all_phases lists the output's elements in the output's order.
    s_b, s_c, s_h, s_w = all_phases.stride()
    phases_in_output_order = all_phases.as_strided(
        (b, c_out, h, 2, w, 2),
        (s_b, s_c, s_h, 2 * c_out * s_c + s_h, s_w, c_out * s_c + s_w),
        all_phases.storage_offset(),
    )
    # The output keeps the layout the convolution chose (channels-last when its weights are).
    out = torch.empty(
        (b, c_out, 2 * h, 2 * w), dtype=all_phases.dtype, device=x.device, memory_format=memory_format_of(all_phases)
    )
    out.unflatten(2, (h, 2)).unflatten(4, (w, 2)).copy_(phases_in_output_order)
    return out


@dataclass
class FoldedKernels:
    """A convolution's phase kernels and repeated bias, kept on it as a cache: a copy or pickle of
    the module starts without it (oneDNN's packed tensors can be neither copied nor pickled)."""

    key: tuple
    kernels: Tensor
    bias: Tensor | None

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return type(None), ()


def _packs(weight: Tensor) -> bool:
    """Whether the phase kernels of this weight are kept packed for oneDNN (_folded's `packed`)."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.is_contiguous(memory_format=torch.channels_last)  # the runtime's layout (inference_layout)
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    )


def _folded(conv: nn.Conv2d, packed: bool) -> tuple[Tensor, Tensor | None]:
    """The phase kernels and repeated bias. Folding a large kernel costs about as much as the
    convolution, so for inference they are kept on the module until its weights change
    (in-place edits bump the tensor's version, loading replaces the tensor). Under autograd
    they are folded on every call, so gradients flow to the 3x3 weights. Kept for bf16 on the
    CPU outside autograd, they are packed in oneDNN's own layout (an opaque mkldnn tensor):
    passed as a plain tensor, oneDNN repacked a copy of the kernels at every call."""
    weight, bias = conv.weight, conv.bias
    if torch.is_grad_enabled() and weight.requires_grad:
        return phase_kernels(weight), None if bias is None else bias.repeat(4)
    key = (
        weight.data_ptr(),
        weight._version,
        weight.dtype,
        weight.device,
        None if bias is None else (bias.data_ptr(), bias._version),
        packed,
    )
    cached = getattr(conv, "_phase_cache", None)
    if cached is None or cached.key != key:
        with torch.no_grad():
            kernels = phase_kernels(weight).contiguous(memory_format=memory_format_of(weight))
            if packed:
                # Packed for a 64x64 source; the layout it gets was the one the products took at every size tried.
                example_input = [1, weight.shape[1], 64, 64]
                kernels = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    kernels.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, example_input
                )
            cached = FoldedKernels(key, kernels, None if bias is None else bias.repeat(4))
        conv._phase_cache = cached
    return cached.kernels, cached.bias
