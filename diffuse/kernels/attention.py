"""Self-attention in bf16 on CPUs with AMX by diffuse's C kernel (attention_amx.c, which says
why it is faster than PyTorch's fused kernel); built and loaded like the other kernels of
diffuse.kernels, and used by diffuse.runtime.attention where it takes the shapes."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from diffuse.kernels import first_load, load_kernel

SOURCE = Path(__file__).with_name("attention_amx.c")
MAX_WIDTH = 160  # the widest head the kernel takes (attention_amx.c)
# Per head, at most this many scores (queries x keys: SD1.5's third level and middle block) ran
# no faster than PyTorch's kernel; every larger SD1.5 and SDXL shape, cross-attention included, did.
MAX_SCORES_LEFT = 256 * 256


def load_attention() -> tuple[ctypes.CDLL, Path]:
    loaded, library = load_kernel(SOURCE, "AMX-BF16 and AVX512-BF16, or Linux's permission to use AMX")
    loaded.attention_amx.restype = None
    loaded.attention_amx.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4
    loaded.attention_amx.argtypes += [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return loaded, library


@functools.cache
def _attention_kernel() -> tuple[ctypes.CDLL | None, str]:
    """load_attention's answer for this process (a build is tried once)."""
    return first_load(load_attention, "bf16 AMX attention")


def attention_status() -> str:
    return _attention_kernel()[1]


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel computes attention for these [B, heads, N, d] queries and [B, heads, M, d]
    keys and values: bf16 on the CPU outside autograd, heads up to 160 wide, each row contiguous,
    more than MAX_SCORES_LEFT scores per head, and the kernel built for this machine."""
    tensors = (q, k, v)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 4 for t in tensors)
        and not torch.is_grad_enabled()
        and all(t.stride(-1) == 1 for t in tensors)
        and q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_WIDTH
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2]
        and q.shape[2] * k.shape[2] > MAX_SCORES_LEFT
        and _attention_kernel()[0] is not None
    )


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for inputs `takes` accepts, as [B, heads, N, d] laid out
    [B, N, heads, d] in memory (the layout the caller flattens the heads back into)."""
    library, _ = _attention_kernel()
    batch, heads, n, d = q.shape
    m = k.shape[2]
    blocks = -(-m // 32)
    packed_width, out_width = -(-d // 32) * 32, -(-d // 16) * 16
    out = torch.empty((batch, n, heads, d), dtype=q.dtype).transpose(1, 2)
    packed_keys = torch.empty(batch * heads * blocks * packed_width * 32, dtype=torch.bfloat16)
    packed_values = torch.empty(batch * heads * blocks * out_width * 32, dtype=torch.bfloat16)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v, out)]
    library.attention_amx(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch, heads, n, m, d,
        *(s.data_ptr() for s in strides), d**-0.5, packed_keys.data_ptr(), packed_values.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
