"""Weights kept in a file on disk instead of in memory, read back only if something reads them.

Under quantize="int8" a layer's products run from its int8 copy, so its bf16 weight is read
again only to pack a new copy (after a LoRA is merged or taken out) or where the layer falls
back to bf16 or float32. Kept in RAM, those weights would be most of the process (SDXL's UNet:
5 GB of bf16 beside its 2.6 GB of int8). They move into an unlinked file in the spill folder,
mapped shared: each parameter stays the same tensor with the same shape, strides and dtype,
only its memory is the file's. Once its int8 copy is packed, a weight's pages are dropped from
the process (`drop`); a later read brings them back from the page cache or the disk, and
the kernel writes them out and frees the cache as it needs the memory.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable

import torch
from torch import Tensor

from diffuse.runtime.device import give_back_freed_memory

# Left free on the spill folder's disk, so moving weights there never fills it.
DISK_MARGIN = 1 << 30
# The memory moved weights leave is given back to the kernel each time this much has been freed,
# since malloc may keep it (diffuse.runtime.device.keep_freed_memory) and the int8 copies made
# meanwhile rarely fit the holes.
GIVE_BACK_EVERY = 256 << 20


def spill_folder() -> str:
    """Where weights and spilled originals go: $DIFFUSE_SPILL_DIR, else /var/tmp, which systems
    keep on disk (/tmp is often a RAM-backed tmpfs, where a file would cost the memory it is
    meant to save)."""
    chosen = os.environ.get("DIFFUSE_SPILL_DIR")
    if chosen:
        return chosen
    return "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()


def _page_aligned(nbytes: int) -> int:
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


class WeightsOnDisk:
    """Room in one shared mapping of an unlinked file for these parameters; `move` gives them
    its memory, `drop` takes their pages out of the process (the module docstring)."""

    def __init__(self, params: Iterable[Tensor], folder: str | None = None):
        unique = {id(p): p for p in params}
        # Each weight starts on a page of its own, so dropping one never drops part of another.
        self.ranges: dict[int, tuple[Tensor, int, int]] = {}
        total = 0
        for key, param in unique.items():
            nbytes = param.numel() * param.element_size()
            self.ranges[key] = (param, total, nbytes)
            total += _page_aligned(nbytes)
        self.map, self.whole, self.file = None, None, None
        self.freed = 0
        if total:
            self.file = tempfile.TemporaryFile(prefix="diffuse-weights-", dir=folder or spill_folder())
            os.ftruncate(self.file.fileno(), total)
            self.map = mmap.mmap(self.file.fileno(), total, flags=mmap.MAP_SHARED)
            self.whole = torch.frombuffer(self.map, dtype=torch.uint8)

    @torch.no_grad()
    def move(self, params: Iterable[Tensor]) -> None:
        """These parameters' values written to the file, and their memory made the file's, with
        shapes and strides as they were. Written with pwrite, not through the mapping, so the
        pages land in the page cache without ever counting in the process's memory."""
        for param in params:
            _, offset, nbytes = self.ranges[id(param)]
            if self.holds(param):
                continue
            if not param.is_contiguous() and not param.is_contiguous(memory_format=torch.channels_last):
                raise ValueError(f"a weight of shape {tuple(param.shape)} with strides {param.stride()} is not dense")
            # A dense tensor's values lie in one run of its storage, in the order its strides give.
            span = param.data.as_strided((param.numel(),), (1,)).view(torch.uint8)
            data, done = memoryview(span.numpy()), 0
            while done < nbytes:  # a write may take fewer bytes than asked (Linux: at most 2 GB)
                done += os.pwrite(self.file.fileno(), data[done:], offset + done)
            raw = self.whole[offset : offset + nbytes]
            param.data = raw.view(param.dtype).as_strided(param.shape, param.stride())
            self.freed += nbytes
            if self.freed >= GIVE_BACK_EVERY:
                give_back_freed_memory()
                self.freed = 0

    @classmethod
    def fits(cls, params: Iterable[Tensor], folder: str | None = None) -> bool:
        """Whether the spill folder's disk has room for these parameters and the margin."""
        needed = sum(_page_aligned(p.numel() * p.element_size()) for p in {id(p): p for p in params}.values())
        stats = os.statvfs(folder or spill_folder())
        return stats.f_bavail * stats.f_frsize >= needed + DISK_MARGIN

    def holds(self, param: Tensor) -> bool:
        """Whether param's memory is still this file's (a cast, as in a float32 retry, gives it new memory)."""
        known = self.ranges.get(id(param))
        if known is None or self.whole is None:
            return False
        return param.data_ptr() == self.whole.data_ptr() + known[1]

    def drop(self, params: Iterable[Tensor]) -> None:
        """These parameters' pages out of the process's memory; their values stay in the file."""
        for param in params:
            known = self.ranges.get(id(param))
            if known is not None and self.holds(param):
                self.map.madvise(mmap.MADV_DONTNEED, known[1], _page_aligned(known[2]))
