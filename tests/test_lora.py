"""LoRA parity with diffusers 0.42 + peft on the tiny random SD1/SD2 models, and exact restore.

Random kohya-format LoRAs (attention, feed-forward, proj_in/out, text encoder and LoCon
convolutions, rank 2-4, alpha != rank) and PEFT-format ones go through diffusers'
`load_lora_weights` + `fuse_lora`; its fused weights, renamed to diffuse's modules, must equal
ours after LoraMerge.apply, and so must the images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffuse
from diffuse.adapters import LoraMerge, lora_from_state_dict
from diffuse.checkpoints.clip_layout import from_transformers
from diffuse.checkpoints.unet_layout import from_diffusers

WEIGHT_TOL = 2e-5

UNET_TARGETS = (  # diffusers module name endings a kohya LoRA (with conv_dim: LoCon) trains
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: torch.nn.Module, endings: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(endings) and "lora" not in name
    }


def _factors(layer: torch.nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, torch.nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * 0.2
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * 0.2
    else:
        down = torch.randn(rank, layer.in_features, generator=gen) * 0.2
        up = torch.randn(layer.out_features, rank, generator=gen) * 0.2
    return down, up


def kohya_lora(reference, seed: int) -> dict[str, torch.Tensor]:
    """A random kohya LoRA over the reference pipeline's modules, named as sd-scripts names SD1/2."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    layers = {f"lora_unet_{n}": m for n, m in _targets(reference.unet, UNET_TARGETS).items()}
    layers |= {f"lora_te_text_model_{n.removeprefix('text_model.')}": m for n, m in _text_targets(reference).items()}
    # One rank and alpha per file: diffusers 0.42 renames kohya attention modules after reading the
    # alphas, so its per-module alpha_pattern misses them and they get the most common alpha.
    rank = 2 + seed % 3
    for name, layer in layers.items():
        down, up = _factors(layer, rank, gen)
        name = name.replace(".", "_")
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(float(rank) * 1.5 + 0.25)
    return state


def _text_targets(reference) -> dict[str, torch.nn.Module]:
    return _targets(reference.text_encoder, TEXT_TARGETS)


def peft_lora(reference, seed: int) -> dict[str, torch.Tensor]:
    """A random diffusers / PEFT LoRA (no alphas: scale 1) over attention and the text encoder."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    layers = {f"unet.{n}": m for n, m in _targets(reference.unet, UNET_TARGETS[:10]).items()}
    layers |= {f"text_encoder.{n}": m for n, m in _text_targets(reference).items()}
    for name, layer in layers.items():
        down, up = _factors(layer, 3, gen)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    return state


def fused_weights(reference, loras: list[dict], weights: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' fused UNet and text-encoder weights under diffuse's names."""
    names = [f"a{i}" for i in range(len(loras))]
    for name, state in zip(names, loras, strict=True):
        reference.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name=name)
    reference.set_adapters(names, adapter_weights=weights)
    reference.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)

    def plain(module):
        state = module.state_dict()
        return {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}

    unet = from_diffusers(plain(reference.unet), ours_cfg(reference))
    text = from_transformers(plain(reference.text_encoder))
    return {"unet": unet, "text_encoder": text}


def ours_cfg(reference):
    from diffuse.checkpoints.unet_layout import config_from_diffusers

    return config_from_diffusers(dict(reference.unet.config))


def assert_weights_match(ours, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    for network in ("unet", "text_encoder"):
        state = getattr(ours, network).state_dict()
        worst = max((state[k].float() - v.float()).abs().max().item() for k, v in expected[network].items())
        assert set(state) == set(expected[network])
        assert worst < WEIGHT_TOL, f"{network}: max weight difference {worst}"


@pytest.fixture
def reference(reference_folders, style):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(reference_folders[style], safety_checker=None)


@pytest.fixture
def ours(reference_folders, style):
    return diffuse.load_pipeline(reference_folders[style], dtype="float32")


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@pytest.mark.parametrize("weight", [0.6, 1.0])
def test_kohya_lora_matches_diffusers(reference, ours, weight):
    state = kohya_lora(reference, seed=1)
    expected = fused_weights(reference, [state], [weight])
    LoraMerge(networks(ours)).apply([(lora_from_state_dict(state, "kohya"), weight, weight)])
    assert_weights_match(ours, expected)


def test_two_kohya_loras_match_diffusers(reference, ours):
    first, second = kohya_lora(reference, seed=2), kohya_lora(reference, seed=3)
    expected = fused_weights(reference, [first, second], [0.6, 1.0])
    selection = [(lora_from_state_dict(first, "first"), 0.6, 0.6), (lora_from_state_dict(second, "second"), 1.0, 1.0)]
    LoraMerge(networks(ours)).apply(selection)
    assert_weights_match(ours, expected)


@pytest.mark.parametrize("weight", [0.6, 1.0])
def test_peft_lora_matches_diffusers(reference, ours, weight):
    state = peft_lora(reference, seed=4)
    expected = fused_weights(reference, [state], [weight])
    LoraMerge(networks(ours)).apply([(lora_from_state_dict(state, "peft"), weight, weight)])
    assert_weights_match(ours, expected)


def test_old_attention_processor_names_match_peft(reference, ours):
    """`to_q_lora.down` / `lora_linear_layer.up` spell the same LoRA as PEFT's lora_A / lora_B."""
    state = peft_lora(reference, seed=5)
    old = {}
    for key, tensor in state.items():
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        for p in ("q", "k", "v"):
            key = key.replace(f"attn1.to_{p}.lora.", f"attn1.processor.to_{p}_lora.")
        key = key.replace("attn2.to_out.0.lora.", "attn2.processor.to_out_lora.")
        old[key.replace("mlp.fc1.lora.", "mlp.fc1.lora_linear_layer.")] = tensor
    assert any("to_q_lora" in k for k in old) and any("to_out_lora" in k for k in old)
    expected = fused_weights(reference, [state], [0.6])
    LoraMerge(networks(ours)).apply([(lora_from_state_dict(old, "old"), 0.6, 0.6)])
    assert_weights_match(ours, expected)


def test_peft_alpha_from_metadata(reference, ours):
    """diffusers writes each component's lora_alpha to the metadata; a file without it has scale 1."""
    import json

    state = peft_lora(reference, seed=6)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 3, "unet.lora_alpha": 6, "text_encoder.r": 3})}
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    lora = lora_from_state_dict(state, "alpha", metadata)
    merge = LoraMerge(networks(ours))
    merge.apply([(lora, 0.0, 1.0)])
    doubled = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    merge.apply([(lora_from_state_dict(state, "plain"), 0.0, 2.0)])
    for key, value in ours.unet.state_dict().items():
        torch.testing.assert_close(doubled[key], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(before[k], doubled[k]) for k in before)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def test_images_with_two_loras_match_diffusers(reference_folders, clip_vocab_dir):
    """The issue's bar: images within 2/255 of diffusers' with two LoRAs merged (SD1, DDIM)."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(reference_folders["sd1"], safety_checker=None)
    ours = diffuse.load_pipeline(reference_folders["sd1"], dtype="float32")
    first, second = kohya_lora(reference, seed=7), kohya_lora(reference, seed=8)
    fused_weights(reference, [first, second], [0.6, 1.0])
    selection = [(lora_from_state_dict(first, "first"), 0.6, 0.6), (lora_from_state_dict(second, "second"), 1.0, 1.0)]
    LoraMerge(networks(ours)).apply(selection)
    prompt, steps = "a red circle above a blue square", 6
    expected = reference(
        prompt, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
        generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    got = ours.txt2img(prompt, steps=steps, guidance_scale=7.5, height=32, width=32, seed=3, sampler="DDIM")
    diff = np.abs(pixels(got.images) - pixels(expected)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
