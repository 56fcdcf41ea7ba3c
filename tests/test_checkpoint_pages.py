"""Loading gives a memory-mapped checkpoint's pages back as it goes (diffuse.checkpoints.pages),
and that never changes a value."""

import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffuse.checkpoints.fill import build_and_fill
from diffuse.checkpoints.pages import PageReturner, file_mappings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back on Linux only")


def resident_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def big_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(1024, 4096) for i in range(4)}  # 64 MB
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path, tensors


def test_pages_leave_and_the_values_stay(big_file):
    path, written = big_file
    state = safetensors.torch.load_file(path)
    assert file_mappings(path), "safetensors maps the file"
    assert file_mappings(path.parent / "elsewhere.safetensors") == []
    for tensor in state.values():
        tensor.sum()  # bring every page in
    before = resident_file_mb()
    pages = PageReturner(path)
    for tensor in state.values():
        pages.give_back(tensor)
    after = resident_file_mb()
    assert before - after > 50, (before, after)
    for name, tensor in state.items():  # read again: the same numbers, from the page cache
        assert torch.equal(tensor, written[name])


def test_memory_outside_the_file_is_left_alone(big_file):
    path, _ = big_file
    state = safetensors.torch.load_file(path)
    own = torch.randn(1024, 4096)
    kept = own.clone()
    PageReturner(path).give_back(own)
    assert torch.equal(own, kept)
    assert state  # the file stays mapped through the call


def test_a_fill_keeps_no_file_pages_and_gets_every_value(big_file):
    path, written = big_file

    class Four(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(4):
                setattr(self, f"layer{i}", torch.nn.Linear(4096, 1024, bias=False))

    for dtype in (torch.float32, torch.bfloat16):
        state = safetensors.torch.load_file(path)
        start = resident_file_mb()
        module = build_and_fill(Four, state, path, "four", dtype=dtype)
        # fp32 weights may stay backed by the file (no copy is made), but none is resident now
        assert resident_file_mb() - start < 10
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, written[name].to(dtype))
