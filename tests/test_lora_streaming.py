"""A LoRA file merged module by module, and the spilled originals kept for the next apply.

read_lora keeps only a safetensors file's scalars in memory and Patch.loaded reads each module's
tensors when it is merged; the merge must come out bit for bit as from tensors in memory, and a
file that changes under it must be refused with the model back on its own weights. The spill
file outlives a restore, so it must never hand back a weight that was changed since it was written.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_lora_restore import assert_unchanged, networks, random_lora, snapshot

import diffuse
from diffuse.adapters import LoraMerge, lora_from_state_dict, read_lora
from diffuse.adapters import merge as merge_module
from diffuse.adapters.library import LoraFile, LoraUse, MergedLoras
from diffuse.checkpoints.errors import CheckpointError


@pytest.fixture
def sd1(reference_folders):
    return diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")


def half_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.dim() else v for k, v in state.items()}  # as sd-scripts saves, alphas kept


def test_file_patches_hold_only_scalars_until_merged(sd1, tmp_path):
    state = half_precision(random_lora(sd1, 11, every=2))
    save_file(state, tmp_path / "lazy.safetensors")
    lora = read_lora(tmp_path / "lazy.safetensors")
    for patch in lora.patches:
        big = {name: t for name, t in patch.tensors.items() if t.numel() > 1}
        assert big and all(t.is_meta for t in big.values())
        loaded = patch.loaded()
        for name, tensor in loaded.tensors.items():
            assert torch.equal(tensor, state[patch.file_keys[name]])
        assert loaded.tensors["down"].dtype == torch.float16


def test_merge_from_file_equals_merge_from_memory(sd1, tmp_path):
    state = half_precision(random_lora(sd1, 12, every=2))
    save_file(state, tmp_path / "style.safetensors")
    merge = LoraMerge(networks(sd1))
    merge.apply([(lora_from_state_dict(state, "in memory"), 0.6, 0.9)])
    from_memory = snapshot(sd1)
    merge.restore()
    merge.apply([(read_lora(tmp_path / "style.safetensors"), 0.6, 0.9)])
    assert_unchanged(sd1, from_memory)


def test_file_changed_after_reading_is_refused_and_the_model_restored(sd1, tmp_path):
    path = tmp_path / "changing.safetensors"
    state = random_lora(sd1, 13, every=2)
    save_file(state, path)
    before = snapshot(sd1)
    lora = read_lora(path)
    last = list(state)[-2]  # a late module's tensor, so earlier modules are merged before it fails
    save_file({**state, last: torch.full_like(state[last], float("inf"))}, path)  # same size, new bytes
    merge = LoraMerge(networks(sd1))
    with pytest.raises(CheckpointError, match=rf"changing\.safetensors.*tensor {last} has .* non-finite"):
        merge.apply([(lora, 1.0, 1.0)])
    assert_unchanged(sd1, before)
    assert merge.applied == ()


def test_merged_set_forgotten_after_a_failed_merge(sd1, tmp_path, monkeypatch):
    save_file(random_lora(sd1, 14, every=2), tmp_path / "a.safetensors")
    save_file(random_lora(sd1, 15, every=3), tmp_path / "b.safetensors")
    use_a = LoraUse(LoraFile("a", tmp_path / "a.safetensors", "a"), 1.0, 1.0)
    use_b = LoraUse(LoraFile("b", tmp_path / "b.safetensors", "b"), 1.0, 1.0)
    merged = MergedLoras(networks(sd1))
    merged.use([use_a])
    with_a = snapshot(sd1)
    real = merge_module.contribution

    def failing(patch, weight, multiplier):
        if not patch.tensors["down"].is_meta:  # the merge, not the check before it
            raise RuntimeError("out of memory")
        return real(patch, weight, multiplier)

    monkeypatch.setattr(merge_module, "contribution", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        merged.use([use_b])  # `a` is restored first, then the merge of `b` fails
    monkeypatch.setattr(merge_module, "contribution", real)
    assert merged.active == ()
    merged.use([use_a])  # must merge again, not trust a key that no longer holds
    assert_unchanged(sd1, with_a)


def spill_size(merge: LoraMerge) -> int:
    return merge._originals.file.seek(0, 2)


def test_spill_file_is_reused_and_never_stale(sd1):
    merge = LoraMerge(networks(sd1), spill_above=0)
    first = lora_from_state_dict(random_lora(sd1, 16), "first")
    second = lora_from_state_dict(random_lora(sd1, 17, every=2), "second")
    before = snapshot(sd1)
    merge.apply([(first, 1.0, 1.0)])
    size = spill_size(merge)
    merge.apply([(second, 1.0, 1.0)])  # restores, then merges a subset: nothing new to write
    merge.restore()
    assert spill_size(merge) == size
    assert_unchanged(sd1, before)

    changed = next(sd1.unet.parameters())
    with torch.no_grad():
        changed.add_(1.0)  # changed in place after the spill was written: its copy there is stale
    edited = snapshot(sd1)
    merge.apply([(first, 0.5, 0.5)])
    merge.restore()
    assert_unchanged(sd1, edited)

    with torch.no_grad():
        changed.data = changed.data - 1.0  # new values in a new storage, not through an in-place op
    replaced = snapshot(sd1)
    merge.apply([(first, 0.5, 0.5)])
    merge.restore()
    assert_unchanged(sd1, replaced)
    assert spill_size(merge) == size  # rewritten in place, same size


def test_spill_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSE_SPILL_DIR", str(tmp_path))
    assert merge_module.spill_folder() == str(tmp_path)
    monkeypatch.delenv("DIFFUSE_SPILL_DIR")
    assert merge_module.spill_folder() in ("/var/tmp", __import__("tempfile").gettempdir())
