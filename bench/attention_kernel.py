"""diffuse's attention kernel for this CPU (diffuse/kernels/attention_amx.c with AMX,
attention_avx512.c with AVX512-BF16 and no AMX) against PyTorch's fused bf16 kernel and, on a CPU
without AMX, against the explicit form (two matmuls and diffuse's softmax, what
diffuse.runtime.attention runs without a kernel), on the attention shapes of SD1.5 at 512x512 and
SDXL at 1024x1024 (batch 2, as guidance runs them): median times of interleaved calls, and each
one's error against float32 attention (relative RMS) on the same inputs.

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

from diffuse import kernels  # noqa: E402
from diffuse.kernels import attention as attention_kernel  # noqa: E402
from diffuse.runtime import attention as runtime_attention  # noqa: E402
from diffuse.runtime.device import cpu_has_amx  # noqa: E402

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


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """diffuse.runtime.attention's explicit form, the path it takes where no kernel does."""
    takes = attention_kernel.takes
    attention_kernel.takes = lambda *qkv: False
    try:
        return runtime_attention.attention(q, k, v)
    finally:
        attention_kernel.takes = takes


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="interleaved calls of each (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"host: {cpu_model()}, torch {torch.__version__} on {args.threads} threads")
    print(kernels.attention_status())
    others = {"PyTorch": F.scaled_dot_product_attention}
    if not cpu_has_amx():
        others["explicit"] = explicit
    names = "".join(f" {name:>9} {'ratio':>6}" for name in others)
    print(f"{'':24} {'shape (B, heads, N, M, d)':28} {'ours':>9}{names}   error vs float32: ours, {', '.join(others)}")
    for model, what, *shape in SHAPES:
        q, k, v = inputs(*shape)
        if not attention_kernel.takes(q, k, v):
            print(f"{model + ' ' + what:24} {str(tuple(shape)):28} left to PyTorch's kernel")
            continue
        contenders = {"ours": attention_kernel.attention_bf16, **others}
        times = {name: [] for name in contenders}
        for _ in range(args.repeats + 1):  # the first of each is a warm-up
            for name, attend in contenders.items():
                start = time.perf_counter()
                attend(q, k, v)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        errors = ", ".join(f"{relative_error(attend(q, k, v), exact):.2e}" for attend in contenders.values())
        columns = "".join(f" {medians[name] * 1e3:7.1f}ms {medians[name] / medians['ours']:5.2f}x" for name in others)
        print(f"{model + ' ' + what:24} {str(tuple(shape)):28} {medians['ours'] * 1e3:7.1f}ms{columns}   {errors}")


if __name__ == "__main__":
    main()
