"""Giving a memory-mapped checkpoint's pages back once a tensor has been read.

safetensors files (and zip-format .ckpt files) are read through a memory map: a
tensor's bytes come in when first touched and then count in the process's resident
memory, as the file's pages, for as long as any tensor of that file is alive. Loading
touches every tensor (the finite check, then the conversion), so the whole file used
to stay resident beside the converted weights: on SD1.5 the peak was 5.2 GB in bf16
for 2.1 GB of weights, and in fp32 the convolution weights (copied to channels-last)
stayed resident twice until the process ended.

Here, once a tensor has been checked or converted, its pages are unmapped from the
process (madvise DONTNEED); the kernel keeps them in its page cache and maps them in
again if the tensor is read later. That is lossless because only addresses inside a
mapping of the checkpoint file itself are given back, and only while it is being
loaded: the loader renames, slices and copies those tensors but never writes into
them, so their pages are still the file's (a private mapping's page becomes the
process's own only when written). Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux's value on every architecture it runs on


@functools.cache
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def file_mappings(path: str | Path | None = None) -> list[tuple[int, int]]:
    """[start, end) address ranges this process maps from the file at `path`, or from any file
    (a mapping with an inode; /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.is_file():
        return []
    target = None if path is None else os.path.realpath(path)
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue  # an anonymous mapping
        if target is None:
            wanted = fields[4] != "0" and not fields[5].startswith("[")  # an inode: a file
        else:
            wanted = fields[5] == target
        if wanted:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class PageReturner:
    """Unmaps a tensor's whole pages when they lie in a mapping of the checkpoint file being loaded.

    Made once the file's tensors are read (the mappings exist then), used only until they are loaded."""

    def __init__(self, path: str | Path):
        self.ranges = file_mappings(path)

    def give_back(self, tensor: torch.Tensor) -> None:
        if not self.ranges or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
        if any(low <= start and end <= high for low, high in self.ranges):
            give_back_pages(tensor, end)


def give_back_pages(tensor: torch.Tensor, end: int | None = None) -> None:
    """The whole pages of a tensor read from a file's memory map, up to `end` (by default its last
    value), unmapped from the process; only for memory a file backs and nothing has written."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size() if end is None else end
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: a neighbour may share the edges
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and sys.platform.startswith("linux"):
        _madvise()(first, last - first, _MADV_DONTNEED)  # a hint: a failure leaves the pages resident
