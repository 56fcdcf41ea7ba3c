"""Attention in bf16 on CPUs with AMX by diffuse's C kernel (attention_amx.c, which says why it
is faster than PyTorch's fused kernel), built and loaded by diffuse.kernels; used by
diffuse.runtime.attention where it takes the shapes."""

from __future__ import annotations

import torch

from diffuse.kernels import attention_library

MAX_WIDTH = 160  # the widest head the kernel takes (attention_amx.c)
# Per head, at most this many scores (queries x keys: SD1.5's third level and middle block) ran
# no faster than PyTorch's kernel; every larger SD1.5 and SDXL shape, cross-attention included, did.
MAX_SCORES_LEFT = 256 * 256


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
        and attention_library() is not None
    )


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for inputs `takes` accepts, as [B, heads, N, d] laid out
    [B, N, heads, d] in memory (the layout the caller flattens the heads back into)."""
    library = attention_library()
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
