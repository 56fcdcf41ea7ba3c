"""diffuse's AMX attention kernel (diffuse/kernels/attention_amx.c) against PyTorch's fused bf16
kernel, on the attention shapes of SD1.5 at 512x512 and SDXL at 1024x1024 (batch 2, as guidance
runs them): median times of interleaved calls, and each one's error against float32 attention
(relative RMS) on the same inputs.

    .venv/bin/python bench/attention_kernel.py              # on torch's default threads
    .venv/bin/python bench/attention_kernel.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import cpu_model  # noqa: E402

from diffuse import kernels
from diffuse.kernels import attention as amx_attention  # noqa: E402

# (model, what, batch, heads, queries, keys, width): each level's self- and cross-attention.
SHAPES = [
    ("SD1.5", "self, level 1", 2, 8, 4096, 4096, 40),
    ("SD1.5", "cross, level 1", 2, 8, 4096, 77, 40),
    ("SD1.5", "self, level 2", 2, 8, 1024, 1024, 80),
    ("SD1.5", "cross, level 2", 2, 8, 1024, 77, 80),
    ("SD1.5", "self, level 3", 2, 8, 256, 256, 160),
    ("SDXL", "self, level 2", 2, 10, 4096, 4096, 64),
    ("SDXL", "cross, level 2", 2, 10, 4096, 77, 64),
    ("SDXL", "self, level 3", 2, 20, 1024, 1024, 64),
    ("SDXL", "cross, level 3", 2, 20, 1024, 77, 64),
]


def inputs(batch: int, heads: int, n: int, m: int, d: int) -> tuple[torch.Tensor, ...]:
    """Laid out as the UNet's projections leave them: [B, tokens, heads, d] seen as [B, heads, tokens, d]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n, heads, d, generator=g).bfloat16().transpose(1, 2)
    k, v = (torch.randn(batch, m, heads, d, generator=g).bfloat16().transpose(1, 2) for _ in range(2))
    return q, k, v


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.float() - exact).norm() / exact.norm())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="interleaved calls of each (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"host: {cpu_model()}, torch {torch.__version__} on {args.threads} threads")
    print(kernels.attention_status())
    print(
        f"{'':24} {'shape (B, heads, N, M, d)':28} {'ours':>9} {'PyTorch':>9} {'ratio':>6}   error vs float32: ours, PyTorch's"
    )
    for model, what, *shape in SHAPES:
        q, k, v = inputs(*shape)
        if not amx_attention.takes(q, k, v):
            print(f"{model + ' ' + what:24} {str(tuple(shape)):28} left to PyTorch's kernel")
            continue
        ours, theirs = [], []
        for _ in range(args.repeats + 1):  # the first of each is a warm-up
            start = time.perf_counter()
            amx_attention.attention_bf16(q, k, v)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            theirs.append(time.perf_counter() - start)
        a, b = statistics.median(ours[1:]), statistics.median(theirs[1:])
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        errors = (
            relative_error(amx_attention.attention_bf16(q, k, v), exact),
            relative_error(F.scaled_dot_product_attention(q, k, v), exact),
        )
        print(
            f"{model + ' ' + what:24} {str(tuple(shape)):28} {a * 1e3:7.1f}ms {b * 1e3:7.1f}ms {b / a:5.2f}x"
            f"   {errors[0]:.2e}, {errors[1]:.2e}"
        )


if __name__ == "__main__":
    main()
