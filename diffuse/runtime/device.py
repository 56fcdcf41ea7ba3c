"""Where and in what precision the networks run: the device checked, the dtype chosen,
and malloc told to keep freed memory for the next activation."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls and convolutions natively (not by emulation)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which PyTorch's fused CPU attention uses for its bf16
    products (through oneDNN's brgemm) and otherwise emulates with AVX-512 loops."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (AVX512-VNNI, which every AMX CPU
    has too), without which oneDNN's int8 products run slower than its bf16 ones."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe and probe())


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library this process already runs on, where it is glibc (another libc, such as
    musl, numbers mallopt's parameters otherwise and has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of giving it
    back to the kernel. Returns whether it took effect; DIFFUSE_KEEP_FREED_MEMORY=0 leaves
    malloc alone.

    By default glibc serves every allocation over 32 MB with a fresh mapping and unmaps it
    when freed, so the next one page-faults all its pages in again, zero-filled by the
    kernel, which costs more than computing into them. Serving them from one heap that is
    never trimmed reuses the pages instead (one arena, so the server's worker thread shares
    it), for a heap that keeps its high-water mark (bench/RESULTS.md). It is process-wide
    and lasting, which is why it can be turned off.
    """
    libc = _glibc()
    if os.environ.get("DIFFUSE_KEEP_FREED_MEMORY", "1") == "0" or libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def give_back_freed_memory() -> None:
    """Hand the pages of the freed memory malloc keeps back to the kernel (glibc's malloc_trim).

    Called before a network whose activations come in other sizes than those of the one before
    (the VAE's decode after the UNet's steps): the heap's free chunks would not fit them, so they
    would be stacked on top of the kept memory, which then counts twice in the peak. And after
    weights leave memory (diffuse.runtime.weights_on_disk): even without keep_freed_memory, glibc
    keeps freed chunks under its mmap threshold (which grows to 32 MB as large blocks are freed)
    inside the heap, where the int8 copies made meanwhile rarely fit."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


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
            raise ValueError(
                f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist"
            )
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
