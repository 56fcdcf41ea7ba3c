"""Weights kept in a file on disk instead of in memory, read back only if something reads them.

Under quantize="int8" a layer's products run from its int8 copy, so its bf16 weight is read
again only to pack a new copy (after a LoRA is merged or taken out) or where the layer falls
back to bf16 or float32. Kept in RAM, those weights would be most of the process (SDXL's UNet:
5 GB of bf16 beside its 2.6 GB of int8). So once its int8 copy is packed, a weight's pages are
dropped from the process (`drop`); a later read brings them back from the page cache or the
disk, and the kernel writes them out and frees the cache as it needs the memory.

A weight read straight from the checkpoint's memory map (bf16 in the file, loaded as bf16) is
already on disk, unwritten: its whole pages are simply dropped, as diffuse.checkpoints.pages
drops them during the load. Any other weight (cast, or copied to channels-last) first moves
into an unlinked file in the spill folder, mapped shared (`move`): each parameter stays the
same tensor with the same shape, strides and dtype; only its memory is the file's.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterable

import torch
from torch import Tensor

from diffuse.checkpoints.pages import file_mappings, give_back_pages
from diffuse.runtime.device import give_back_freed_memory

# Left free on the spill folder's disk, so moving weights there never fills it.
DISK_MARGIN = 1 << 30
# The memory moved weights leave is given back to the kernel each time this much has been freed,
# since malloc may keep it (diffuse.runtime.device.keep_freed_memory) and the int8 copies made
# meanwhile rarely fit the holes.
GIVE_BACK_EVERY = 64 << 20


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


def _span(param: Tensor) -> tuple[int, int]:
    """The [start, end) addresses of a dense parameter's values."""
    start = param.data_ptr()
    return start, start + param.numel() * param.element_size()


class WeightsOnDisk:
    """These parameters on disk: those a file already backs as they are, the rest given room in one
    shared mapping of an unlinked file; `move` puts them there, `drop` takes their pages out of the
    process (the module docstring)."""

    def __init__(self, params: Iterable[Tensor], folder: str | None = None):
        unique = {id(p): p for p in params}
        mapped = file_mappings()
        # A file's own pages, with the version counter they had then: written since, a private
        # mapping's page is the process's own copy, which dropping would lose.
        self.in_place: dict[int, tuple[Tensor, int]] = {}
        # Each moved weight starts on a page of its own, so dropping one never drops part of another.
        self.ranges: dict[int, tuple[Tensor, int, int]] = {}
        total = 0
        for key, param in unique.items():
            start, end = _span(param)
            if not param.untyped_storage().resizable() and any(lo <= start and end <= hi for lo, hi in mapped):
                self.in_place[key] = (param, param._version)
                continue
            nbytes = end - start
            self.ranges[key] = (param, total, nbytes)
            total += _page_aligned(nbytes)
        folder = folder or spill_folder()
        if total and not os.path.isdir(folder):
            raise ValueError(f"the folder for weights on disk, {folder} ($DIFFUSE_SPILL_DIR), does not exist")
        if total and total + DISK_MARGIN > (stats := os.statvfs(folder)).f_bavail * stats.f_frsize:
            self.ranges, total = {}, 0  # no room on the disk: those weights stay in memory
        self.nbytes = total
        self.map, self.whole, self.file = None, None, None
        self.freed = 0
        if total:
            self.file = tempfile.TemporaryFile(prefix="diffuse-weights-", dir=folder)
            os.ftruncate(self.file.fileno(), total)
            self.map = mmap.mmap(self.file.fileno(), total, flags=mmap.MAP_SHARED)
            self.whole = torch.frombuffer(self.map, dtype=torch.uint8)

    @torch.no_grad()
    def move(self, params: Iterable[Tensor]) -> None:
        """These parameters' values written to the file, and their memory made the file's, with
        shapes and strides as they were (those a file already backs stay as they are). Written
        with pwrite, not through the mapping, so the pages land in the page cache without ever
        counting in the process's memory."""
        for param in params:
            if id(param) not in self.ranges or self.holds(param):  # left in place, or moved already
                continue
            _, offset, nbytes = self.ranges[id(param)]
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

    def holds(self, param: Tensor) -> bool:
        """Whether param's memory is this file's (a cast, as in a float32 retry, gives it new memory)."""
        known = self.ranges.get(id(param))
        if known is None or self.whole is None:
            return False
        return param.data_ptr() == self.whole.data_ptr() + known[1]

    def drop(self, params: Iterable[Tensor]) -> None:
        """These parameters' pages out of the process's memory; their values stay in their file."""
        for param in params:
            moved, in_place = self.ranges.get(id(param)), self.in_place.get(id(param))
            if moved is not None and self.holds(param):
                self.map.madvise(mmap.MADV_DONTNEED, moved[1], _page_aligned(moved[2]))
            elif in_place is not None and param._version == in_place[1]:
                give_back_pages(param)
