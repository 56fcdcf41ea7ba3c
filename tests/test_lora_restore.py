"""LoraMerge's promises: restore is bit-exact (fp32 and bf16, prepared networks, in memory or spilled),
the same selection is a no-op, a failing apply leaves the model as it was, and each refusal says why."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import diffuse
from diffuse.adapters import LoraError, LoraMerge, lora_from_state_dict, read_lora
from diffuse.adapters import merge as merge_module
from diffuse.checkpoints.errors import CheckpointError


def random_lora(pipe, seed: int, every: int = 1) -> dict[str, torch.Tensor]:
    """A kohya LoRA (LDM names) on every `every`-th Linear / Conv2d of the UNet and text encoder."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, network in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        layers = [(n, m) for n, m in network.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for name, layer in layers[::every]:
            w = layer.weight
            key = prefix + name.replace(".", "_")
            down = torch.randn(3, *w.shape[1:], generator=gen) * 0.1
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = torch.randn(
                w.shape[0], 3, *([1, 1] if w.dim() == 4 else []), generator=gen
            )
            state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{net}.{k}": p.detach().clone(memory_format=torch.preserve_format)
        for net in ("unet", "text_encoder")
        for k, p in getattr(pipe, net).named_parameters()
    }


def assert_unchanged(pipe, before: dict[str, torch.Tensor]) -> None:
    for net in ("unet", "text_encoder"):
        for k, p in getattr(pipe, net).named_parameters():
            original = before[f"{net}.{k}"]
            assert torch.equal(p, original), f"{net}.{k} changed"
            assert p.stride() == original.stride(), f"{net}.{k} memory layout changed"


def networks(pipe):
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.fixture
def sd1(reference_folders):
    return diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spill_above", [0, merge_module.SPILL_ABOVE])
def test_restore_is_bit_exact_after_a_run(reference_folders, dtype, spill_above):
    pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype=dtype)  # prepared: fast layers swapped in
    before = snapshot(pipe)
    plain = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    merge = LoraMerge(networks(pipe), spill_above=spill_above)
    merge.apply([(lora_from_state_dict(random_lora(pipe, 0), "a"), 0.8, 1.0)])
    assert len(merge.applied) == 1
    changed = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    assert changed.tobytes() != plain.tobytes()
    merge.restore()
    assert merge.applied == ()
    assert_unchanged(pipe, before)
    again = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    assert again.tobytes() == plain.tobytes()


def test_same_selection_is_a_no_op_and_another_restores_first(sd1):
    first = lora_from_state_dict(random_lora(sd1, 1), "first")
    second = lora_from_state_dict(random_lora(sd1, 2, every=2), "second")
    merge = LoraMerge(networks(sd1))
    before = snapshot(sd1)
    merge.apply([(second, 1.0, 1.0)])
    only_second = snapshot(sd1)
    merge.restore()
    merge.apply([(first, 0.5, 0.7)])
    versions = [p._version for p in sd1.unet.parameters()]
    merge.apply([(first, 0.5, 0.7)])
    assert [p._version for p in sd1.unet.parameters()] == versions
    merge.apply([(second, 1.0, 1.0)])  # restores `first` before merging
    assert_unchanged(sd1, only_second)
    merge.apply([])
    assert_unchanged(sd1, before)


def test_failure_midway_restores_what_was_touched(sd1, monkeypatch):
    merge = LoraMerge(networks(sd1))
    before = snapshot(sd1)
    real, calls = merge_module.contribution, []

    def failing(patch, weight, multiplier):
        calls.append(patch.tensors["down"].device.type)  # the check runs the same math on meta tensors first
        if calls.count("cpu") == 5:
            raise RuntimeError("out of memory")
        return real(patch, weight, multiplier)

    monkeypatch.setattr(merge_module, "contribution", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        merge.apply([(lora_from_state_dict(random_lora(sd1, 3), "x"), 1.0, 1.0)])
    assert_unchanged(sd1, before)
    assert merge.applied == ()


def refused(sd1, lora, match: str) -> None:
    merge = LoraMerge(networks(sd1))
    ok = lora_from_state_dict(random_lora(sd1, 4, every=3), "ok")
    merge.apply([(ok, 1.0, 1.0)])
    with_ok = snapshot(sd1)
    with pytest.raises(LoraError, match=match):
        merge.apply([(ok, 1.0, 1.0), (lora, 1.0, 1.0)])
    assert_unchanged(sd1, with_ok)  # the selection merged before stays merged, untouched
    assert merge.applied[0][0] is ok


def test_unmatched_keys_are_listed(sd1):
    state = random_lora(sd1, 5, every=4)
    state["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = torch.zeros(2, 32)
    state["lora_unet_input_blocks_99_1_proj_in.lora_up.weight"] = torch.zeros(32, 2)
    refused(sd1, lora_from_state_dict(state, "partly"), r"2 of \d+ keys match no module.*input_blocks_99_1_proj_in")


def test_keys_matching_nothing(sd1):
    state = {
        "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2),
    }
    refused(sd1, lora_from_state_dict(state, "nothing"), "2 of 2 keys match no module")


def test_sd2_lora_on_sd1(sd1, reference_folders):
    sd2 = diffuse.load_pipeline(reference_folders["sd2"], dtype="float32")
    text_only = {k: v for k, v in random_lora(sd2, 6).items() if k.startswith("lora_te_")}
    refused(sd1, lora_from_state_dict(text_only, "sd2te"), "text encoder of another width.*32 wide")
    cross = {k: v for k, v in random_lora(sd2, 6).items() if "blocks_0_attn2_to_k" in k and "input_blocks_1_" in k}
    refused(sd1, lora_from_state_dict(cross, "sd2unet"), "another base: its cross-attention reads 48-wide text")
    tagged = lora_from_state_dict(random_lora(sd1, 6, every=5), "tagged", {"ss_v2": "True"})
    refused(sd1, tagged, r"made for SD 2.x \(its metadata says so\), this model is SD 1.x")


def test_refused_while_reading(sd1, tmp_path):
    state = random_lora(sd1, 7, every=5)
    bad = dict(state)
    bad[next(iter(bad))] = bad[next(iter(bad))].clone().fill_(float("nan"))
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="nan.safetensors.*non-finite"):
        read_lora(tmp_path / "nan.safetensors")
    with pytest.raises(LoraError, match="unsupported key.*lora_up.bias"):
        lora_from_state_dict({**state, "lora_unet_out_2.lora_up.bias": torch.zeros(4)}, "bias")
    with pytest.raises(LoraError, match="unsupported key.*lora_magnitude_vector"):
        lora_from_state_dict({**state, "unet.conv_in.lora_magnitude_vector": torch.zeros(4)}, "peft-dora")
    with pytest.raises(LoraError, match="no weight change beside them"):
        lora_from_state_dict({"lora_unet_out_2.alpha": torch.tensor(1.0)}, "alone")
    with pytest.raises(LoraError, match="lora tensors are incomplete.*lacks up"):
        lora_from_state_dict({"lora_unet_out_2.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "half")


def test_files_names_and_hashes(sd1, tmp_path):
    state = random_lora(sd1, 8, every=5)
    path = tmp_path / "my_style.safetensors"
    save_file(state, path, metadata={"ss_output_name": "MyStyle", "ss_v2": "False"})
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    lora = read_lora(path)
    assert (lora.name, lora.alias, lora.path, lora.base) == ("my_style", "MyStyle", path, "SD 1.x")
    assert lora.short_hash == hashlib.sha256(raw[8 + header :]).hexdigest()[:12]
    save_file(state, path, metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert read_lora(path).short_hash == "0123456789ab"
    pickled = tmp_path / "looks_like.safetensors"  # a torch.save file under a misleading name: the bytes decide
    torch.save(state, pickled)
    lora = read_lora(pickled)
    assert lora.short_hash == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]
    assert lora.metadata == {} and len(lora.patches) == len(state) // 3


@pytest.mark.skipif(not diffuse.kernels.quantize_available(), reason=diffuse.kernels.status())
def test_restore_is_bit_exact_on_int8_with_its_weights_on_disk(reference_folders):
    """Under quantize="int8" the merged weights live in a file (diffuse.runtime.weights_on_disk):
    the merge writes through it, the int8 copies are packed again from it, and the restore puts
    the original values back in the same memory, so the first image comes back exactly."""
    try:
        pipe = diffuse.load_pipeline(reference_folders["sd1"], dtype="bfloat16", quantize="int8")
    except ValueError as refused:  # a CPU without AVX512-VNNI
        pytest.skip(str(refused))
    on_disk = {k: p.data_ptr() for k, p in pipe.unet.named_parameters() if not p.untyped_storage().resizable()}
    assert on_disk
    before = snapshot(pipe)
    plain = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    merge = LoraMerge(networks(pipe))
    merge.apply([(lora_from_state_dict(random_lora(pipe, 0), "a"), 0.8, 1.0)])
    changed = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    assert changed.tobytes() != plain.tobytes()
    merge.restore()
    assert_unchanged(pipe, before)
    assert {k: p.data_ptr() for k, p in pipe.unet.named_parameters() if k in on_disk} == on_disk
    again = pipe.txt2img("a red circle", steps=2, width=32, height=32, seed=1, sampler="Euler").images[0]
    assert again.tobytes() == plain.tobytes()
