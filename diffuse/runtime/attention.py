"""Attention in bf16 on the CPU: one of diffuse's C kernels, or two plain matmuls and a softmax
per head (or group of heads).

With AMX, attention with heads up to 160 wide (all of SD1.5's, SD2's and SDXL's) and more than
256 x 256 scores per head runs in diffuse's AMX kernel, which was faster than PyTorch's fused
kernel on those shapes (bench/RESULTS.md); the smallest stay with the fused kernel, which
computes its products on the tiles too. On a CPU without AMX but with AVX512-BF16, the same
heads run in diffuse's AVX512-BF16 kernel, faster than the explicit form below at every SD
shape measured. Elsewhere (wider heads, such as the VAE's one of 512; CPUs without AVX512-BF16)
PyTorch's fused kernel runs far under the bf16 matmul peak on SD's 40-wide heads, and the
explicit form was faster on every SD1.5 shape measured. The explicit form's scores are rounded
to bf16 before the softmax, so it is less exact than the fused kernels, and PyTorch's stays the
path for float32 (the exact one), for GPUs and under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffuse import kernels
from diffuse.kernels import attention as attention_kernel
from diffuse.runtime.device import cpu_has_amx

# The most query x key scores one head's matmul makes at a time (4 MB in bf16): longer
# queries go in row chunks, so memory stays bounded at any image size and the scores are
# still in cache when the softmax and the second matmul read them (the size that ran
# fastest, bench/RESULTS.md).
MAX_SCORES = 2**21

# Value widths whose product with the scores ran faster padded with zero columns to the width
# beside them (SD1.5's 40- and 80-wide heads on Zen 4, measured before its attention kernel, so
# now for CPUs with AVX-512 but no BF16, or with the kernels off; bench/RESULTS.md); the
# padding's columns of the output are dropped, so the result is the same.
PADDED_VALUE_WIDTH = {40: 48, 80: 96}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] queries and [B, heads, M, d] keys
    and values (any strides), as [B, heads, N, d_v]; the softmax is diffuse.kernels' C
    kernel where this machine builds it, since PyTorch's spends its time on float32-exact
    exps for a bf16 result."""
    if attention_kernel.takes(q, k, v):
        return attention_kernel.attention_bf16(q, k, v)
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or torch.is_grad_enabled() or cpu_has_amx():
        return F.scaled_dot_product_attention(q, k, v)
    batch, heads, n, d = q.shape
    q = q * d**-0.5
    # Written as [B, N, heads, d_v], the layout the caller flattens the heads back into.
    out = torch.empty((batch, n, heads, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(1, 2)
    rows = max(1, MAX_SCORES // k.shape[2])
    # Heads whose scores fit the same budget together go in one call: each call is a parallel
    # region of its own, and when another program holds a core every region waits for it.
    group = max(1, MAX_SCORES // (min(rows, n) * k.shape[2]))
    width = v.shape[-1]
    padding = PADDED_VALUE_WIDTH.get(width, width) - width
    for b in range(batch):
        for h in range(0, heads, group):
            some = slice(h, h + group)
            # Copied once per head group, the keys' transpose is read by every row chunk's product
            # as one dense block, which ran faster than reading across the stacked projections.
            keys_t = k[b, some].transpose(1, 2).contiguous()
            values = F.pad(v[b, some], (0, padding)) if padding else v[b, some]
            for start in range(0, n, rows):
                scores = torch.matmul(q[b, some, start : start + rows], keys_t)
                if not kernels.softmax_bf16_(scores.view(-1, scores.shape[-1])):
                    scores = scores.softmax(-1)
                out[b, some, start : start + rows] = torch.matmul(scores, values)[..., :width]
    return out
