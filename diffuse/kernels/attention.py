"""Attention in bf16 on the CPU by one of diffuse's C kernels, built and loaded by diffuse.kernels:
attention_amx.c on CPUs with AMX, attention_avx512.c on those with AVX512-BF16 but no AMX (each
file says why it is faster than the alternatives); used by diffuse.runtime.attention where
`takes` accepts the shapes."""

from __future__ import annotations

import torch

from diffuse.kernels import attention_library

MAX_WIDTH = 160  # the widest head either kernel takes
# Per head, at most this many scores (queries x keys: SD1.5's third level and middle block) ran no
# faster in the AMX kernel than in PyTorch's fused kernel; every larger SD1.5 and SDXL shape,
# cross-attention included, did. The AVX512-BF16 kernel was faster than the explicit form at every
# SD1.5 and SDXL shape, the smallest included (bench/RESULTS.md).
MAX_SCORES_LEFT = {"amx": 256 * 256, "avx512": 0}


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a kernel computes attention for these [B, heads, N, d] queries and [B, heads, M, d]
    keys and values: bf16 on the CPU outside autograd, heads up to 160 wide, each row contiguous,
    at least one key, more scores per head than MAX_SCORES_LEFT says for the kernel, and a kernel
    built for this machine."""
    tensors = (q, k, v)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 4 for t in tensors)
        and not torch.is_grad_enabled()
        and all(t.stride(-1) == 1 for t in tensors)
        and q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_WIDTH
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2] > 0
        and (library := attention_library()) is not None
        and q.shape[2] * k.shape[2] > MAX_SCORES_LEFT[library.kind]
    )


def packed_sizes(kind: str, m: int, d: int) -> tuple[int, int]:
    """The packed keys' and values' sizes per head, in bf16 elements, as each kernel lays them out:
    AMX tiles of 32 keys, the width rounded up to 32 for the keys and 16 for the values; for
    AVX512-BF16, pairs of values and of keys, 32 keys to a block."""
    blocks = -(-m // 32)
    if kind == "amx":
        return blocks * 32 * -(-d // 32) * 32, blocks * 32 * -(-d // 16) * 16
    return blocks * 32 * -(-d // 2) * 2, blocks * 32 * d


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for inputs `takes` accepts, as [B, heads, N, d] laid out
    [B, N, heads, d] in memory (the layout the caller flattens the heads back into)."""
    library = attention_library()
    batch, heads, n, d = q.shape
    m = k.shape[2]
    keys_size, values_size = packed_sizes(library.kind, m, d)
    out = torch.empty((batch, n, heads, d), dtype=q.dtype).transpose(1, 2)
    packed_keys = torch.empty(batch * heads * keys_size, dtype=torch.bfloat16)
    packed_values = torch.empty(batch * heads * values_size, dtype=torch.bfloat16)
    strides = [torch.tensor(t.stride()[:3], dtype=torch.int64) for t in (q, k, v, out)]
    library.attention_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch, heads, n, m, d,
        *(s.data_ptr() for s in strides), d**-0.5, packed_keys.data_ptr(), packed_values.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
