"""How the networks run on this machine: the precision chosen for them and their memory layout.

The one place that decides these, so the model files stay plain PyTorch:

- dtype "auto" (the default of `load_pipeline`) is bfloat16 on a CPU with native bf16
  dot products (AVX512-BF16 or AMX; oneDNN reports it) and on a CUDA GPU that has it,
  float16 on an older GPU, float32 otherwise. bf16 keeps float32's range, so the
  networks need no overflow care; the sampler's arithmetic and the latents stay float32
  whatever the networks use (diffuse.pipeline converts at the network boundary).
- On the CPU, convolution weights are kept channels-last (NHWC) for inference: oneDNN's
  convolutions read and write that layout directly, where a standard-layout tensor
  costs a reorder on each side of every convolution (measured: up to 1.6x on the VAE
  decoder's full-resolution layers). Outputs then stay channels-last all the way through.
  On a GPU they stay in the standard layout: there cuDNN ran SD1.5's VAE decoder slower
  channels-last (H100, fp16 at 512x512: 28.1 ms against 22.5 ms) and the UNet no faster.
- On Linux with glibc, freed memory is kept for the next allocation (keep_freed_memory).
- Attention in bf16 on the CPU is two matmuls and a softmax per head (attention), the
  softmax a C kernel where the machine can build it (diffuse.kernels).
- Linear layers on the CPU run as oneDNN 1x1 convolutions (Linear).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from diffuse import kernels

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls and convolutions natively (not by emulation)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of giving it
    back to the kernel. Returns whether it took effect; DIFFUSE_KEEP_FREED_MEMORY=0 leaves
    malloc alone.

    By default glibc serves every allocation over 32 MB with a fresh mapping and unmaps it
    when freed, so the next one page-faults all its pages in again (zero-filled by the
    kernel): about 0.2 ms per MB here, longer than copying the data. A 512x512 VAE decode
    faults in 1.8 GB of such activations. Serving them from one heap that is never
    trimmed reuses the pages instead (one arena, so the server's worker thread shares it).
    Measured on SD1.5 in bf16, 2 cores: VAE decode at 512 6.3-6.5 -> 5.2-5.3 s, UNet step
    5.66 -> 5.45-5.55 s, for more peak memory (the heap keeps its high-water mark: a whole
    bf16 image 3.1 -> 3.3 GB, fp32 5.4 -> 6.1 GB, one run each). It is process-wide and
    lasting, which is why it can be turned off.
    """
    if os.environ.get("DIFFUSE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # another libc (musl): other parameter numbers
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def resolve_device(device: str | torch.device) -> torch.device:
    """A device or its name ("cpu", "cuda", "cuda:1", "mps"), checked to exist here, so a
    missing GPU is one clear message before any weights are read."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but this torch sees no Apple GPU")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The fastest precision that keeps images close to float32's on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype or its name; "auto" picks by device (see auto_dtype); None means float32, the
    exact path that matches the reference implementations."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of float32, float16, bfloat16 or auto")
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def inference_layout(weight: torch.Tensor) -> torch.Tensor:
    """A weight in the inference layout for its device: convolution kernels (4-D) on the CPU
    channels-last, everything else contiguous."""
    channels_last = weight.dim() == 4 and weight.device.type == "cpu"
    return weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is stored that way (and that is not also standard order), else standard:
    what a layer's output should keep, so one channels-last tensor keeps the next ones so."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# The most query x key scores one head's matmul makes at a time (4 MB in bf16): longer
# queries go in row chunks, so memory stays bounded at any image size, and the scores are
# still in cache when the softmax and the second matmul read them. Measured on SD1.5's
# largest self-attention (4096 positions, 8 heads of 40, batch 2; 2 cores with 2 MB of L2
# each and 32 MB of L3): 2**24 scores per chunk 146 ms, 2**22 128, 2**21 122, 2**20 129,
# 2**19 145 ms.
MAX_SCORES = 2**21


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] queries and [B, heads, M, d] keys
    and values (any strides), as [B, heads, N, d_v].

    In bf16 on the CPU, without autograd, each head is two plain matmuls and a softmax:
    PyTorch's fused CPU kernel runs far under the bf16 matmul peak on SD's 40-wide heads
    (160 of 800 GFLOP/s here), and the explicit form was faster on every SD1.5 shape
    measured (2 cores, fused -> explicit in 4 MB chunks: 4096 positions, 8 heads of 40,
    batch 2: 268 -> 121 ms; 1024 of 80: 28 -> 11 ms; the VAE's one 512-wide head over
    4096: 165 -> 42 ms). Its scores are rounded to bf16 before the softmax, so it is less
    exact than the fused kernel (max error on random inputs 2.8e-3 against 6.8e-4), which
    stays the path for float32, the exact one.

    The softmax then took as long as both matmuls (4096 positions: 60 of 122 ms), most of
    it computing exps to float32 accuracy for a bf16 result; diffuse.kernels' softmax,
    where available, takes that attention to 87 ms (UNet step at 512: 2.41 -> 2.16 s).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v)
    batch, heads, n, d = q.shape
    q = q * d**-0.5
    # Written as [B, N, heads, d_v], the layout the caller flattens the heads back into.
    out = torch.empty((batch, n, heads, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(1, 2)
    rows = max(1, MAX_SCORES // k.shape[2])
    for b in range(batch):
        for h in range(heads):
            keys_t, values = k[b, h].transpose(0, 1), v[b, h]
            for start in range(0, n, rows):
                scores = torch.matmul(q[b, h, start : start + rows], keys_t)
                if not kernels.softmax_bf16_(scores):
                    scores = scores.softmax(-1)
                out[b, h, start : start + rows] = torch.matmul(scores, values)
    return out


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) that, on the CPU in float32 or
    bfloat16 without autograd, computes x W^T + b as a 1x1 convolution over the rows.

    PyTorch sends a float32 linear layer to MKL, which on AMD CPUs runs its AVX2 code even
    where the CPU has AVX-512, while oneDNN's convolutions pick their code by the CPU's
    features: on this project's 2-core AMD EPYC (AVX-512), SD's transformer shapes ran at
    160-207 GFLOP/s as float32 GEMMs and at 276-484 as 1x1 convolutions. The convolution
    is the same product read in the same memory, accumulated in float32 either way (its
    float32 results differ from MKL's in summation order only). Measured on SD1.5's
    UNet step at 512: float32 5.9 -> 4.8 s; bfloat16, where both go to oneDNN, 2.45 ->
    2.41 s. Training keeps F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_onednn = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
        if not on_onednn or torch.is_grad_enabled() or not x.numel():
            return F.linear(x, self.weight, self.bias)
        # [..., in] -> [1, in, rows, 1]: a channels-last view of the rows as they lie in memory.
        rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)
        out = F.conv2d(rows, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)
