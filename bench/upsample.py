"""The 2x upsampling's convolution (diffuse/runtime/upsample.py) three ways, in bf16 on the CPU:
plain (nearest upsample, then the 3x3 convolution), folded into four 2x2 phase kernels passed as a
plain tensor (what autograd-enabled calls use), and folded with the kernels packed in oneDNN's
layout (inference). Interleaved medians per shape, the ratios to plain, and the path
upsample_conv takes on this host at its defaults, which is what MIN_SOURCE_PIXELS and the
packed-kernel rule decide.

    .venv/bin/python bench/upsample.py
    .venv/bin/python bench/upsample.py --repeats 15
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import cpu_model, dense_peaks, interleaved, timed  # noqa: E402

import diffuse.runtime.upsample as upsample  # noqa: E402
from diffuse.runtime.device import cpu_has_amx  # noqa: E402

# (where, channels, source side, batch): SD1.5's UNet upsamplings at 512 (batch 2, as guidance runs
# them), its VAE decoder's, and smaller maps (the shipped 64x64 model's and odd sizes).
SHAPES = [
    ("UNet", 1280, 8, 2),
    ("UNet", 1280, 16, 2),
    ("UNet", 640, 32, 2),
    ("decoder", 512, 64, 1),
    ("decoder", 512, 128, 1),
    ("decoder", 256, 256, 1),
    ("small", 1280, 1, 2),
    ("small", 1280, 2, 2),
    ("small", 1280, 4, 2),
    ("small", 640, 8, 2),
    ("small", 320, 4, 2),
]


def contenders(channels: int, side: int, batch: int) -> dict:
    """One call each of the three forms, on copies of one convolution (each keeps its own folded kernels)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).bfloat16().requires_grad_(False)
    conv = conv.to(memory_format=torch.channels_last)
    folded, packed = copy.deepcopy(conv), copy.deepcopy(conv)
    x = torch.randn(batch, channels, side, side).bfloat16().contiguous(memory_format=torch.channels_last)

    def plain() -> torch.Tensor:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def folded_plain_kernels() -> torch.Tensor:
        with torch.enable_grad():  # frozen weights: folded, the kernels kept as a plain tensor
            return upsample.upsample_conv(x, folded)

    def folded_packed_kernels() -> torch.Tensor:
        return upsample.upsample_conv(x, packed)

    return {
        "plain": lambda: timed(plain),
        "folded": lambda: timed(folded_plain_kernels),
        "folded, packed": lambda: timed(folded_packed_kernels),
    }


def default_path(channels: int, side: int) -> str:
    """Which path upsample_conv takes at its defaults for this shape: whether it keeps phase kernels."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).bfloat16().to(memory_format=torch.channels_last)
    upsample.upsample_conv(torch.zeros(1, channels, side, side, dtype=torch.bfloat16), conv)
    return "folded" if getattr(conv, "_phase_cache", None) is not None else "plain"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per shape (default 9)")
    args = parser.parse_args()
    peaks = dense_peaks()
    print(f"host: {cpu_model()}, AMX {cpu_has_amx()}, torch {torch.__version__} on {torch.get_num_threads()} threads")
    print(f"GEMM peak (4096^3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"MIN_SOURCE_PIXELS {upsample.MIN_SOURCE_PIXELS}")
    defaults = {(c, s): default_path(c, s) for _, c, s, _ in SHAPES}
    minimum = upsample.MIN_SOURCE_PIXELS
    upsample.MIN_SOURCE_PIXELS = 0  # every form timed at every size
    try:
        for where, channels, side, batch in SHAPES:
            seconds = interleaved(contenders(channels, side, batch), args.repeats)
            plain = seconds["plain"]
            row = ", ".join(f"{name} {s * 1e3:.2f} ms ({plain / s:.2f}x)" for name, s in seconds.items())
            print(f"  {where:8s} {channels:5d} ch from {side:3d}x{side:<3d} batch {batch}: {row}; "
                  f"default path {defaults[(channels, side)]}")  # fmt: skip
    finally:
        upsample.MIN_SOURCE_PIXELS = minimum


if __name__ == "__main__":
    main()
