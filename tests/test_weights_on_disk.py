"""Weights moved to a file on disk (diffuse.runtime.weights_on_disk), as quantize="int8" does with
the bf16 weights its int8 copies are made from: same tensors, same values and layout, memory
that leaves the process once dropped, and the float32 retry giving that memory back."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_RUNTIME_UNET
from test_int8 import needs_int8
from torch import nn

from diffuse import numerics
from diffuse.models.unet import UNet
from diffuse.runtime import prepare, weights_on_disk
from diffuse.runtime.device import give_back_freed_memory, keep_freed_memory
from diffuse.runtime.int8 import INT8_LAYERS, packed_from
from diffuse.runtime.weights_on_disk import WeightsOnDisk


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bf16_param(*shape: int, channels_last: bool = False) -> nn.Parameter:
    t = torch.randn(*shape).bfloat16()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return nn.Parameter(t, requires_grad=False)


def test_moved_weights_keep_identity_values_and_layout(tmp_path):
    conv, row, odd = bf16_param(8, 5, 3, 3, channels_last=True), bf16_param(7, 9), bf16_param(3)
    params = [conv, row, odd, row]  # a repeat is moved once
    before = [(p.clone(), p.stride(), p.dtype) for p in (conv, row, odd)]
    held = WeightsOnDisk(params, folder=str(tmp_path))
    held.move(params)
    for p, (values, stride, dtype) in zip((conv, row, odd), before):
        assert torch.equal(p, values) and p.stride() == stride and p.dtype == dtype
        assert held.holds(p)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing is left behind
    held.drop([conv, row, odd])
    for p, (values, _, _) in zip((conv, row, odd), before):
        assert torch.equal(p, values)  # dropped pages come back from the file
    with torch.no_grad():
        row.add_(1)  # written through the mapping like any tensor
    assert torch.equal(row, before[1][0] + 1)


@pytest.mark.parametrize("keep_freed", [False, True])
def test_dropping_moved_weights_gives_their_memory_back(tmp_path, keep_freed):
    if keep_freed:
        keep_freed_memory()
    weight = bf16_param(4096, 4096)  # 32 MiB
    size = weight.numel() * weight.element_size()
    give_back_freed_memory()  # what making the weight freed, so that it does not count below
    start = resident_bytes()
    held = WeightsOnDisk([weight], folder=str(tmp_path))
    held.move([weight])
    give_back_freed_memory()  # as use_int8 does: malloc may be keeping freed memory (keep_freed_memory)
    assert resident_bytes() < start - size * 3 // 4  # written to the file, never through the mapping
    weight.sum()  # read (a reduction allocates nothing large): its pages come in
    assert resident_bytes() > start - size // 4
    held.drop([weight])
    assert resident_bytes() < start - size * 3 // 4
    assert held.holds(weight) and torch.isfinite(weight[:4]).all()


def test_a_weight_that_is_not_dense_is_refused(tmp_path):
    strided = nn.Parameter(torch.randn(6, 6).bfloat16()[:, ::2], requires_grad=False)
    with pytest.raises(ValueError, match=r"shape \(6, 3\) .* is not dense"):
        WeightsOnDisk([strided], folder=str(tmp_path)).move([strided])


def test_the_float32_retry_gives_mapped_memory_back(tmp_path):
    mapped, plain = bf16_param(16, 16), bf16_param(16, 16)
    module = nn.Module()
    module.mapped, module.plain = mapped, plain
    held = WeightsOnDisk([mapped], folder=str(tmp_path))
    held.move([mapped])
    values, pointer = mapped.clone(), mapped.data_ptr()
    with numerics.in_float32(module):
        assert mapped.dtype == torch.float32 and not held.holds(mapped)
    assert mapped.dtype == torch.bfloat16 and mapped.data_ptr() == pointer and torch.equal(mapped, values)
    assert plain.dtype == torch.bfloat16
    with numerics.in_float32(module):
        with torch.no_grad():
            mapped.mul_(2)  # changed meanwhile: the new values win over the mapped memory
    assert torch.equal(mapped, values * 2) and not held.holds(mapped)


@needs_int8
def test_int8_moves_exactly_the_weights_it_packs_from(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSE_SPILL_DIR", str(tmp_path))
    net = prepare(UNet(TINY_RUNTIME_UNET).eval(), "cpu", torch.bfloat16, quantize="int8")
    packed = {id(w) for layer in net.modules() if isinstance(layer, INT8_LAYERS) for w in packed_from(layer)}
    assert packed
    for name, param in net.named_parameters():
        on_disk = not param.untyped_storage().resizable()
        assert on_disk == (id(param) in packed), name
    x = torch.randn(2, 4, 8, 8).bfloat16()
    context = torch.randn(2, 5, TINY_RUNTIME_UNET.context_dim).bfloat16()
    with torch.no_grad():
        assert torch.isfinite(net(x, torch.tensor([500.0, 500.0]), context)).all()


@needs_int8
def test_int8_keeps_weights_in_memory_where_the_disk_is_full(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSE_SPILL_DIR", str(tmp_path))
    monkeypatch.setattr(weights_on_disk, "DISK_MARGIN", 1 << 62)
    net = prepare(UNet(TINY_RUNTIME_UNET).eval(), "cpu", torch.bfloat16, quantize="int8")
    assert all(param.untyped_storage().resizable() for param in net.parameters())


def file_backed_param(path, *shape: int) -> nn.Parameter:
    """A bf16 weight read straight from a file's private memory map, as the loader keeps a bf16
    tensor of a bf16 checkpoint."""
    values = torch.randn(*shape).bfloat16()
    values.view(torch.int16).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.bfloat16)
    return nn.Parameter(mapped.view(*shape), requires_grad=False)


def test_a_weight_a_file_already_backs_stays_and_its_pages_are_dropped(tmp_path):
    weight = file_backed_param(tmp_path / "weights.bin", 4096, 4096)  # 32 MiB
    size = weight.numel() * weight.element_size()
    pointer, values = weight.data_ptr(), weight[:64].clone()
    held = WeightsOnDisk([weight], folder=str(tmp_path / "spill"))  # no folder needed: nothing moves
    assert held.nbytes == 0 and held.file is None
    held.move([weight])
    assert weight.data_ptr() == pointer
    weight.sum()  # read: its pages come in
    give_back_freed_memory()
    start = resident_bytes()
    held.drop([weight])
    assert resident_bytes() < start - size * 3 // 4
    assert torch.equal(weight[:64], values)  # read again from the file


def test_a_file_backed_weight_written_since_is_not_dropped(tmp_path):
    weight = file_backed_param(tmp_path / "weights.bin", 64, 1024)  # 32 pages
    held = WeightsOnDisk([weight], folder=str(tmp_path))
    with torch.no_grad():
        weight.add_(1)  # a private mapping's written page is the process's own: dropping would lose it
    changed = weight.clone()
    held.drop([weight])
    assert torch.equal(weight, changed)


def test_a_missing_spill_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing \(\$DIFFUSE_SPILL_DIR\), does not exist"):
        WeightsOnDisk([bf16_param(4, 4)], folder=str(tmp_path / "missing"))
