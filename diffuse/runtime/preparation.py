"""prepare(): the networks made fast for inference on this machine, once, at load time: the
fast layers of diffuse.runtime.layers swapped in, and with quantize="int8" the int8 ones of
diffuse.runtime.int8, which build on them."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from diffuse.runtime.int8 import check_quantize, use_int8
from diffuse.runtime.layers import FAST_LAYERS, inference_layout

M = TypeVar("M", bound=nn.Module)


@torch.no_grad()
def prepare(module: M, device: str | torch.device, dtype: torch.dtype, quantize: str | None = None) -> M:
    """`module` (a text encoder, UNet or VAE, or anything holding them) made ready to run on
    `device` in `dtype`, in place: moved and cast (nothing to do for weights loaded so),
    weights in the device's inference layout, fast layers swapped in, and with quantize="int8"
    a UNet's products in int8 (diffuse.runtime.int8; bf16 on the CPU only). Idempotent."""
    check_quantize(quantize, device, dtype)
    module.to(device=device, dtype=dtype)
    for param in module.parameters():
        param.data = inference_layout(param.data)
    for layer in module.modules():
        fast = FAST_LAYERS.get(type(layer))
        if fast is not None:
            layer.__class__ = fast
    if quantize == "int8":
        use_int8(module)
    return module
