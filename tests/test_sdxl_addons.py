"""SDXL LoRAs against diffusers 0.42 + peft on its tiny random SDXL base, and exact restore.

A kohya-format SDXL LoRA (LDM UNet names as sd-scripts writes them, `lora_te1_` for CLIP-L and
`lora_te2_` for bigG) and a PEFT one (`unet.`, `text_encoder.`, `text_encoder_2.`) go through
diffusers' `load_lora_weights` + `fuse_lora`; its fused weights, renamed to diffuse's modules,
must equal ours after LoraMerge.apply on the three networks.
"""

from __future__ import annotations

import pytest
import torch
from test_lora import TEXT_TARGETS, UNET_TARGETS, _factors, _targets
from test_lora_restore import random_lora
from test_sdxl_pipeline import build_sdxl_reference

import diffuse
from diffuse.adapters import LoraError, LoraMerge, lora_from_state_dict
from diffuse.adapters.merge import model_base
from diffuse.checkpoints.clip_layout import from_transformers
from diffuse.checkpoints.unet_layout import config_from_diffusers, from_diffusers

WEIGHT_TOL = 2e-5
ATTENTION_TARGETS = UNET_TARGETS[:12]  # attention, feed-forward and the transformers' proj_in / proj_out
NETWORKS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, clip_vocab_dir):
    folder = tmp_path_factory.mktemp("tiny_sdxl_addons")
    build_sdxl_reference(clip_vocab_dir).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def reference(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False).to(torch.float32)


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return diffuse.load_pipeline(sdxl_folder, dtype="float32")


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in NETWORKS}


def kohya_sdxl_lora(reference, seed: int) -> dict[str, torch.Tensor]:
    """A random SDXL LoRA named as sd-scripts names it: the UNet's modules by their LDM names."""
    gen = torch.Generator().manual_seed(seed)
    unet = _targets(reference.unet, ATTENTION_TARGETS)
    ldm = from_diffusers({f"{n}.weight": n for n in unet}, config_from_diffusers(dict(reference.unet.config)))
    layers = {f"lora_unet_{key.removesuffix('.weight')}": unet[n] for key, n in ldm.items()}
    for prefix, encoder in (("lora_te1_", reference.text_encoder), ("lora_te2_", reference.text_encoder_2)):
        layers |= {prefix + n: m for n, m in _targets(encoder, TEXT_TARGETS).items()}
    rank = 2 + seed % 3
    state = {}
    for name, layer in layers.items():
        name = name.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = _factors(layer, rank, gen)
        state[f"{name}.alpha"] = torch.tensor(float(rank) * 1.5 + 0.25)
    return state


def peft_sdxl_lora(reference, seed: int) -> dict[str, torch.Tensor]:
    """A random diffusers / PEFT SDXL LoRA (no alphas: scale 1) over attention and both encoders."""
    gen = torch.Generator().manual_seed(seed)
    layers = {f"unet.{n}": m for n, m in _targets(reference.unet, UNET_TARGETS[:10]).items()}
    for prefix in ("text_encoder", "text_encoder_2"):
        layers |= {f"{prefix}.{n}": m for n, m in _targets(getattr(reference, prefix), TEXT_TARGETS).items()}
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = _factors(layer, 3, gen)
    return state


def fused_weights(reference, state: dict[str, torch.Tensor], weight: float) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' fused weights of the three networks under diffuse's names."""
    reference.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="a0")
    reference.fuse_lora(components=list(NETWORKS), lora_scale=weight, adapter_names=["a0"])

    def plain(module):
        return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if ".lora_" not in k}

    cfg = config_from_diffusers(dict(reference.unet.config))
    return {
        "unet": from_diffusers(plain(reference.unet), cfg),
        "text_encoder": from_transformers(plain(reference.text_encoder)),
        "text_encoder_2": from_transformers(plain(reference.text_encoder_2), with_projection=True),
    }


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.detach().clone() for net, m in networks(pipe).items() for k, v in m.state_dict().items()}


def assert_weights_match(pipe, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    for network in NETWORKS:
        state = getattr(pipe, network).state_dict()
        assert set(state) == set(expected[network]), network
        worst = max((state[k].float() - v.float()).abs().max().item() for k, v in expected[network].items())
        assert worst < WEIGHT_TOL, f"{network}: max weight difference {worst}"


def assert_bit_exact(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_an_sdxl_lora_merges_as_diffusers_fuses_it_and_restores_exactly(style, ours, reference):
    state = (kohya_sdxl_lora if style == "kohya" else peft_sdxl_lora)(reference, seed=1)
    weight = 0.75
    lora = lora_from_state_dict(state, style)
    assert {patch.network for patch in lora.patches} == set(NETWORKS)
    before = snapshot(ours)
    merge = LoraMerge(networks(ours))
    assert model_base(merge.networks) == "SDXL"
    merge.apply([(lora, weight, weight)])
    try:
        assert_weights_match(ours, fused_weights(reference, state, weight))
        changed = [k for k, v in snapshot(ours).items() if not torch.equal(v, before[k])]
        assert {k.split(".")[0] for k in changed} == set(NETWORKS)
    finally:
        merge.restore()
    assert_bit_exact(ours, before)


def test_the_kohya_unet_keys_are_ldm_names_of_levels_with_attention(ours, reference):
    """The tiny SDXL's first level has no transformer, its second two per block: the LDM names that
    sd-scripts writes reach input_blocks 4/5, middle_block 1 and output_blocks 0-2 only."""
    lora = lora_from_state_dict(kohya_sdxl_lora(reference, seed=2), "kohya")
    targets = {p.target for p in lora.patches if p.network == "unet"}
    blocks = {t.split("_transformer_blocks")[0].removesuffix("_proj_in").removesuffix("_proj_out") for t in targets}
    assert blocks == {
        "input_blocks_4_1",
        "input_blocks_5_1",
        "middle_block_1",
        *(f"output_blocks_{i}_1" for i in range(3)),
    }
    assert "input_blocks_4_1_transformer_blocks_1_attn2_to_k" in targets  # the second layer of a depth-2 level


def test_an_sd1_lora_on_sdxl_is_refused_with_the_reason(ours, reference_folders):
    sd1 = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    lora = lora_from_state_dict(random_lora(sd1, 3), "sd1_lora")
    before = snapshot(ours)
    with pytest.raises(LoraError, match=r"sd1_lora: made for SD 1.x / 2.x \(its key lora_te_text_model_.*SDXL"):
        LoraMerge(networks(ours)).apply([(lora, 1.0, 1.0)])
    unet_only = {k: v for k, v in random_lora(sd1, 3).items() if k.startswith("lora_unet_")}
    with pytest.raises(LoraError, match=r"match no module of this model \(SDXL\)|reads 768-wide text, this model's"):
        LoraMerge(networks(ours)).apply([(lora_from_state_dict(unet_only, "unet_only"), 1.0, 1.0)])
    tagged = lora_from_state_dict(unet_only, "tagged", metadata={"ss_v2": "False"})
    with pytest.raises(LoraError, match=r"made for SD 1.x \(its metadata says so\), this model is SDXL"):
        LoraMerge(networks(ours)).apply([(tagged, 1.0, 1.0)])
    assert_bit_exact(ours, before)


def test_an_sdxl_lora_on_sd1_is_refused_with_the_reason(reference, reference_folders):
    sd1 = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    sd1_networks = {"unet": sd1.unet, "text_encoder": sd1.text_encoder}
    lora = lora_from_state_dict(kohya_sdxl_lora(reference, seed=3), "xl_lora")
    with pytest.raises(LoraError, match=r"xl_lora: made for SDXL \(it changes a second text encoder: lora_te2_"):
        LoraMerge(sd1_networks).apply([(lora, 1.0, 1.0)])
    tagged = lora_from_state_dict(
        {k: v for k, v in kohya_sdxl_lora(reference, seed=3).items() if k.startswith("lora_unet_")},
        "tagged",
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    with pytest.raises(LoraError, match=r"made for SDXL \(its metadata says so\), this model is SD 1.x"):
        LoraMerge(sd1_networks).apply([(tagged, 1.0, 1.0)])
