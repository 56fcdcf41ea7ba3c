"""C kernels for what PyTorch's operations do slowly on this project's CPUs, compiled on
first use with the machine's C compiler and loaded with ctypes.

There is one: softmax_bf16.c, a bf16 softmax for the attention (see there for why). It is
built once into the cache folder ($DIFFUSE_CACHE, else $XDG_CACHE_HOME/diffuse, else
~/.cache/diffuse) under a name that hashes its source and flags; later processes load the
built file. Where it can't be used (no compiler, not
Linux on x86-64, a CPU without AVX512-BF16, DIFFUSE_KERNELS=0), `softmax_bf16_` returns
False and the caller uses PyTorch's softmax; `status()` says which and why.
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
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("softmax_bf16.c")
# -fopenmp: the kernel's threads. Its libgomp.so.1 resolves to the copy PyTorch already
# loaded (same soname), so both share one OpenMP runtime and one pool of threads.
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
COMPILE_SECONDS = 120


class KernelUnavailable(Exception):
    """Why the kernel is not used here; the message is status()'s."""


def cache_folder() -> Path:
    if os.environ.get("DIFFUSE_CACHE"):
        return Path(os.environ["DIFFUSE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffuse"


def build(source: Path, folder: Path, compiler: str) -> Path:
    """The shared library compiled from `source` into `folder` (reused if built before),
    written atomically so a concurrent process never loads half a file."""
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode() + platform.machine().encode())
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


def load_softmax() -> tuple[ctypes.CDLL, Path]:
    """The softmax kernel, built if need be, and its file; KernelUnavailable says why not."""
    if os.environ.get("DIFFUSE_KERNELS", "1") == "0":
        raise KernelUnavailable("turned off by DIFFUSE_KERNELS=0")
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"written for x86-64 Linux, not {sys.platform} on {platform.machine()}")
    runtimes_before = openmp_runtimes()
    library = build(SOURCE, cache_folder(), os.environ.get("CC", "cc"))
    try:
        loaded = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelUnavailable(f"could not load {library}: {error}") from None
    if not loaded.cpu_supported():
        raise KernelUnavailable("this CPU lacks AVX512-BF16")
    added_runtimes = openmp_runtimes() - runtimes_before
    if runtimes_before and added_runtimes:
        # A second runtime's threads would compete with PyTorch's for the same cores.
        raise KernelUnavailable(
            f"it loaded OpenMP runtime {sorted(added_runtimes)} next to PyTorch's {sorted(runtimes_before)}"
        )
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


@functools.cache
def _softmax_kernel() -> tuple[ctypes.CDLL | None, str]:
    """load_softmax's answer for this process, a failure included (a build is tried once).
    The kernel only makes things faster, so an unforeseen failure of the machine (no home
    folder for the cache, an unreadable /proc) also means PyTorch's softmax, not an error."""
    try:
        library, path = load_softmax()
        return library, f"bf16 softmax kernel: {path}"
    except KernelUnavailable as reason:
        return None, f"bf16 softmax kernel not used: {reason}"
    except (OSError, RuntimeError) as error:
        return None, f"bf16 softmax kernel not used: {type(error).__name__}: {error}"


def status() -> str:
    """Whether the softmax kernel is in use here, and where from or why not."""
    return _softmax_kernel()[1]


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
