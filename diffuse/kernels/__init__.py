"""C kernels for what PyTorch's operations do slowly on this project's CPUs, compiled on
first use with the machine's C compiler and loaded with ctypes.

There are four: attention_amx.c, bf16 attention on CPUs with AMX, and attention_avx512.c, the
same on CPUs with AVX512-BF16 but no AMX (one of the two is used, through
diffuse.kernels.attention); softmax_bf16.c, a bf16 softmax for the attention elsewhere; and
quantize_bf16.c, a bf16 tensor (or its LayerNorm, or its GroupNorm and SiLU) to 8 bits for
the int8 layers, and their weights to int8 at load time (see each for why). Each is built once into the cache
folder ($DIFFUSE_CACHE, else $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse) under a name
that hashes its source and flags; later processes load the built file. Where one can't be
used (no compiler, not Linux on x86-64, a CPU without the instructions it needs,
DIFFUSE_KERNELS=0), `softmax_bf16_` returns False and `quantize_bf16` None, and the caller
uses PyTorch's operations; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from diffuse.user_cache import cache_folder

SOURCE = Path(__file__).with_name("softmax_bf16.c")
QUANTIZE_SOURCE = Path(__file__).with_name("quantize_bf16.c")
AMX_ATTENTION_SOURCE = Path(__file__).with_name("attention_amx.c")
AVX512_ATTENTION_SOURCE = Path(__file__).with_name("attention_avx512.c")
# -fopenmp: the kernel's threads. Its libgomp.so.1 resolves to the copy PyTorch already
# loaded (same soname), so both share one OpenMP runtime and one pool of threads.
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
COMPILE_SECONDS = 120


class KernelUnavailable(Exception):
    """Why the kernel is not used here; the message is status()'s."""


def build(source: Path, folder: Path, compiler: str) -> Path:
    """The shared library compiled from `source` into `folder` (reused if built before: its name
    hashes the source, the headers beside it, which it may include, and the flags), written
    atomically so a concurrent process never loads half a file."""
    headers = b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(FLAGS).encode() + platform.machine().encode())
    library = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC to use another)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / library.name
            result = subprocess.run(
                [compiler, *FLAGS, str(source), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=COMPILE_SECONDS,
                check=False,
            )
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or ["no message"]
                first_error = next((line for line in lines if "error" in line), lines[-1])
                raise KernelUnavailable(f"{compiler} could not compile {source.name}: {first_error.strip()}")
            os.replace(built, library)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KernelUnavailable(f"could not build {source.name} in {folder}: {error}") from None
    return library


def openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (files, by name)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    return {path for path in paths if Path(path).name.startswith(("libgomp", "libiomp", "libomp"))}


def load_kernel(source: Path, cpu_needs: str) -> tuple[ctypes.CDLL, Path]:
    """The kernel compiled from `source`, built if need be, and its file; KernelUnavailable says
    why not (`cpu_needs` names what the kernel's cpu_supported() checks)."""
    if os.environ.get("DIFFUSE_KERNELS", "1") == "0":
        raise KernelUnavailable("turned off by DIFFUSE_KERNELS=0")
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"written for x86-64 Linux, not {sys.platform} on {platform.machine()}")
    runtimes_before = openmp_runtimes()
    library = build(source, cache_folder(), os.environ.get("CC", "cc"))
    try:
        loaded = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelUnavailable(f"could not load {library}: {error}") from None
    if not loaded.cpu_supported():
        raise KernelUnavailable(f"it needs {cpu_needs}, which this CPU does not offer")
    added_runtimes = openmp_runtimes() - runtimes_before
    if runtimes_before and added_runtimes:
        # A second runtime's threads would compete with PyTorch's for the same cores.
        raise KernelUnavailable(
            f"it loaded OpenMP runtime {sorted(added_runtimes)} next to PyTorch's {sorted(runtimes_before)}"
        )
    return loaded, library


def load_softmax() -> tuple[ctypes.CDLL, Path]:
    loaded, library = load_kernel(SOURCE, "AVX512-BF16")
    loaded.softmax_bf16_rows.restype = None
    loaded.softmax_bf16_rows.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return loaded, library


def load_quantize() -> tuple[ctypes.CDLL, Path]:
    loaded, library = load_kernel(QUANTIZE_SOURCE, "AVX-512")
    loaded.quantize_bf16.restype = ctypes.c_int
    loaded.quantize_bf16.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    loaded.layer_norm_quantize_bf16.restype = ctypes.c_int
    loaded.layer_norm_quantize_bf16.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    loaded.group_norm_silu_quantize_bf16.restype = ctypes.c_int
    loaded.group_norm_silu_quantize_bf16.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 3]
    loaded.group_norm_silu_quantize_bf16.argtypes += [
        ctypes.c_float,
        ctypes.c_int,
        *[ctypes.c_void_p] * 5,
        ctypes.c_int,
    ]
    loaded.quantize_rows_bf16.restype = None
    loaded.quantize_rows_bf16.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return loaded, library


def load_attention() -> tuple[ctypes.CDLL, Path]:
    """The AMX attention kernel where the CPU has AMX, else the AVX512-BF16 one; KernelUnavailable
    gives both reasons where neither can be used. The library's `kind` says which it is."""
    try:
        loaded, library = load_kernel(
            AMX_ATTENTION_SOURCE, "AMX-BF16 (and Linux's permission to use AMX) beside AVX512-BF16"
        )
        loaded.kind, entry = "amx", loaded.attention_amx
    except KernelUnavailable as no_amx:
        try:
            loaded, library = load_kernel(AVX512_ATTENTION_SOURCE, "AVX512-BF16")
        except KernelUnavailable as no_avx512:
            raise KernelUnavailable(f"the AMX one: {no_amx}; the AVX512-BF16 one: {no_avx512}") from None
        loaded.kind, entry = "avx512", loaded.attention_avx512
    entry.restype = None
    entry.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 4
    entry.argtypes += [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    loaded.attention_bf16 = entry
    return loaded, library


def first_load(load: Callable[[], tuple[ctypes.CDLL, Path]], name: str) -> tuple[ctypes.CDLL | None, str]:
    """load()'s answer, a failure included, and a line saying which. A kernel only makes things
    faster, so an unforeseen failure of the machine (no home folder for the cache, an
    unreadable /proc) also means PyTorch's operations, not an error."""
    try:
        library, path = load()
        return library, f"{name} kernel: {path}"
    except KernelUnavailable as reason:
        return None, f"{name} kernel not used: {reason}"
    except (OSError, RuntimeError) as error:
        return None, f"{name} kernel not used: {type(error).__name__}: {error}"


@functools.cache
def _softmax_kernel() -> tuple[ctypes.CDLL | None, str]:
    """load_softmax's answer for this process (a build is tried once)."""
    return first_load(load_softmax, "bf16 softmax")


@functools.cache
def _quantize_kernel() -> tuple[ctypes.CDLL | None, str]:
    """load_quantize's answer for this process (a build is tried once)."""
    return first_load(load_quantize, "bf16 quantize")


@functools.cache
def _attention_kernel() -> tuple[ctypes.CDLL | None, str]:
    """load_attention's answer for this process (a build is tried once)."""
    return first_load(load_attention, "bf16 attention")


def attention_library() -> ctypes.CDLL | None:
    """The attention kernel (diffuse.kernels.attention calls it), or None where none is used."""
    return _attention_kernel()[0]


def attention_status() -> str:
    return _attention_kernel()[1]


def quantize_available() -> bool:
    return _quantize_kernel()[0] is not None


def quantize_status() -> str:
    return _quantize_kernel()[1]


def status() -> str:
    """Whether each kernel is in use here, and where from or why not."""
    return f"{_softmax_kernel()[1]}; {_quantize_kernel()[1]}; {_attention_kernel()[1]}"


def softmax_bf16_(scores: torch.Tensor) -> bool:
    """softmax(scores, -1) in place for a 2-D bf16 CPU tensor whose rows are contiguous;
    False (and scores untouched) where the kernel is unavailable."""
    library, _ = _softmax_kernel()
    if library is None:
        return False
    if (
        scores.dtype != torch.bfloat16
        or scores.device.type != "cpu"
        or scores.dim() != 2
        or scores.stride(-1) != 1
        or scores.requires_grad
    ):
        raise ValueError(
            f"needs a 2-D bf16 CPU tensor with contiguous rows outside autograd, got {scores.dtype} "
            f"{tuple(scores.shape)} with strides {scores.stride()} on {scores.device}"
        )
    rows, cols = scores.shape
    if rows and cols:
        threads = torch.get_num_threads()
        scratch = torch.empty(threads * cols, dtype=torch.float32)
        library.softmax_bf16_rows(scores.data_ptr(), rows, cols, scores.stride(0), scratch.data_ptr(), threads)
    return True


# What quantize_bf16 quantizes (the C kernel's op codes).
QUANTIZED_OPS = {"values": 0, "product": 1}


def quantize_bf16(
    x: torch.Tensor,
    asymmetric: bool,
    op: str = "values",
    y: torch.Tensor | None = None,
    channels: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, float, int] | None:
    """x (a bf16 CPU tensor, contiguous or channels-last) as 8-bit integers, laid out as x, with
    one scale and zero point: uint8 over [min(x, 0), max(x, 0)] if asymmetric, else int8 over
    [-max|x|, max|x|] with zero point 0; x ~ (q - zero_point) * scale. With op "product" the
    values quantized are x * y (y laid out as x), computed in float32 and never written in bf16.
    `channels` (start, stop) of a channels-last x quantizes those channels alone, into a
    channels-last tensor of their own. None where the kernel is unavailable or the values hold a
    NaN or an infinity (the caller then computes in bf16, which carries them on)."""
    library, _ = _quantize_kernel()
    if library is None:
        return None
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if (
        x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or not (x.is_contiguous() or channels_last)
        or x.requires_grad
    ):
        raise ValueError(
            f"needs a contiguous or channels-last bf16 CPU tensor outside autograd, got {x.dtype} {tuple(x.shape)} "
            f"with strides {x.stride()} on {x.device}"
        )
    if (op == "product") != (y is not None) or op not in QUANTIZED_OPS:
        raise ValueError(f"op must be one of {sorted(QUANTIZED_OPS)}, with y exactly for 'product'; got {op!r}")
    if y is not None and (y.dtype != x.dtype or y.shape != x.shape or y.stride() != x.stride() or y.requires_grad):
        raise ValueError(f"y must be laid out as x: {y.dtype} {tuple(y.shape)} {y.stride()} against {x.stride()}")
    kind = torch.uint8 if asymmetric else torch.int8
    if channels is None:
        out, start, rows, width, row_stride = torch.empty_like(x, dtype=kind), 0, 1, x.numel(), x.numel()
    else:
        start, stop = channels
        if not channels_last or not 0 <= start < stop <= x.shape[1]:
            raise ValueError(f"channels {channels} need a channels-last x with them, got {tuple(x.shape)} {x.stride()}")
        b, c, h, w = x.shape
        out = torch.empty((b, stop - start, h, w), dtype=kind, memory_format=torch.channels_last)
        rows, width, row_stride = b * h * w, stop - start, c
    scale, zero_point = ctypes.c_float(1.0), ctypes.c_int32(0)
    failed = library.quantize_bf16(
        x.data_ptr() + start * x.element_size(),
        None if y is None else y.data_ptr(),
        QUANTIZED_OPS[op],
        rows,
        width,
        row_stride,
        int(asymmetric),
        out.data_ptr(),
        ctypes.byref(scale),
        ctypes.byref(zero_point),
        torch.get_num_threads(),
    )
    return None if failed else (out, scale.value, zero_point.value)


def layer_norm_quantize_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, asymmetric: bool
) -> tuple[torch.Tensor, float, int] | None:
    """layer_norm(x, [C], weight, bias, eps) (x a contiguous bf16 CPU tensor [..., C], weight and bias
    bf16 [C]) quantized as quantize_bf16 quantizes a tensor, the normalized values computed in
    float32 and never written in bf16. None where the kernel is unavailable or the values hold a
    NaN or an infinity."""
    library, _ = _quantize_kernel()
    if library is None:
        return None
    width = x.shape[-1] if x.dim() else 0
    tensors = (x, weight, bias)
    if (
        any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
        or x.requires_grad
        or weight.shape != (width,)
        or bias.shape != (width,)
    ):
        raise ValueError(
            "needs contiguous bf16 CPU tensors, x [..., C] outside autograd with weight and bias [C]; got "
            + ", ".join(f"{t.dtype} {tuple(t.shape)} {t.stride()} on {t.device}" for t in tensors)
        )
    rows = x.numel() // width if width else 0
    out = torch.empty_like(x, dtype=torch.uint8 if asymmetric else torch.int8)
    if not rows:
        return None
    stats = torch.empty(2 * rows, dtype=torch.float32)
    scale, zero_point = ctypes.c_float(1.0), ctypes.c_int32(0)
    failed = library.layer_norm_quantize_bf16(
        x.data_ptr(),
        rows,
        width,
        weight.data_ptr(),
        bias.data_ptr(),
        eps,
        int(asymmetric),
        out.data_ptr(),
        stats.data_ptr(),
        ctypes.byref(scale),
        ctypes.byref(zero_point),
        torch.get_num_threads(),
    )
    return None if failed else (out, scale.value, zero_point.value)


def quantize_rows_bf16(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """weight [out, ...] (bf16 on the CPU, each output channel's values one dense block, as in a
    contiguous or channels-last tensor) as int8 laid out as weight, with one float32 scale per
    output channel: max|row| / 127 (at least float32's smallest normal), values divided by it,
    rounded half to even and clamped to +-127, as PyTorch's float32 operations compute them. None
    where the kernel is unavailable."""
    library, _ = _quantize_kernel()
    if library is None:
        return None
    rows = weight.shape[0] if weight.dim() else 0
    width = weight.numel() // rows if rows else 0
    dense = weight.is_contiguous() or (weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last))
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not dense or weight.dim() < 2:
        raise ValueError(
            f"needs a contiguous or channels-last bf16 CPU weight [out, ...], got {weight.dtype} "
            f"{tuple(weight.shape)} with strides {weight.stride()} on {weight.device}"
        )
    out = torch.empty_like(weight, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    if rows and width:
        library.quantize_rows_bf16(
            weight.data_ptr(), rows, width, out.data_ptr(), scales.data_ptr(), torch.get_num_threads()
        )
    return out, scales


def group_norm_silu_quantize_bf16(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    asymmetric: bool,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, int] | None:
    """silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps)) for a channels-last
    bf16 CPU map x [B, C, H, W] (weight and bias bf16 [C], shift [B, C] or None), quantized as
    quantize_bf16 quantizes a tensor into a channels-last one; everything in float32 (the SiLU's
    exp to 2.6e-6), never written in bf16. None where the kernel is unavailable or the values hold
    a NaN or an infinity."""
    library, _ = _quantize_kernel()
    if library is None:
        return None
    channels = x.shape[1] if x.dim() == 4 else 0
    tensors = (x, weight, bias)
    if (
        x.dim() != 4
        or not x.is_contiguous(memory_format=torch.channels_last)
        or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in tensors)
        or x.requires_grad
        or not weight.is_contiguous()
        or not bias.is_contiguous()
        or weight.shape != (channels,)
        or bias.shape != (channels,)
        or groups < 1
        or channels % groups
        or (shift is not None and shift.shape != (x.shape[0], channels))
    ):
        raise ValueError(
            f"needs a channels-last bf16 CPU map outside autograd, weight and bias [C] in bf16, C divisible by "
            f"groups ({groups}) and shift [B, C]; got "
            + ", ".join(f"{t.dtype} {tuple(t.shape)} {t.stride()} on {t.device}" for t in tensors)
            + ("" if shift is None else f", shift {tuple(shift.shape)}")
        )
    batch, _, height, width = x.shape
    out = torch.empty_like(x, dtype=torch.uint8 if asymmetric else torch.int8, memory_format=torch.channels_last)
    if not x.numel():
        return None
    threads = torch.get_num_threads()
    sums = torch.empty(threads * batch * channels * 2, dtype=torch.float64)
    coefs = torch.empty(batch * channels * 2, dtype=torch.float32)
    shift = None if shift is None else shift.detach().float().contiguous()
    scale, zero_point = ctypes.c_float(1.0), ctypes.c_int32(0)
    failed = library.group_norm_silu_quantize_bf16(
        x.data_ptr(),
        batch,
        height * width,
        channels,
        groups,
        weight.data_ptr(),
        bias.data_ptr(),
        None if shift is None else shift.data_ptr(),
        eps,
        int(asymmetric),
        out.data_ptr(),
        sums.data_ptr(),
        coefs.data_ptr(),
        ctypes.byref(scale),
        ctypes.byref(zero_point),
        threads,
    )
    return None if failed else (out, scale.value, zero_point.value)
