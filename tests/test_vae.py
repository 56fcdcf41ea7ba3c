"""AutoencoderKL parity with diffusers, and the VAE checkpoint layouts.

The reference is the tiny random diffusers VAE of the sd1 fixture pipeline (three
levels, widths 32/64/64); a slow test repeats the parity check at SD's full size.
Tolerance: max abs error <= 1e-4 in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from parity import TOL, max_err
from safetensors.torch import load_file

from diffuse.checkpoints.vae_layout import (
    config_from_diffusers,
    config_from_original,
    diffusers_pairs,
    from_diffusers,
    to_diffusers,
)
from diffuse.models.configs import SD1
from diffuse.models.vae import AutoencoderKL
from diffuse.runtime import prepare


def ours_from(reference, prepared: bool = True) -> AutoencoderKL:
    """Our VAE built on the meta device and filled with the reference's weights (strictly),
    prepared for inference as the loader does unless `prepared` is False (the plain network
    training uses)."""
    cfg = config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model.load_state_dict(from_diffusers(reference.state_dict(), cfg), assign=True, strict=True)
    return prepare(model.eval(), "cpu", torch.float32) if prepared else model.eval()


@pytest.fixture(scope="module")
def reference(reference_pipes):
    return reference_pipes["sd1"].vae


@pytest.fixture(scope="module")
def ours(reference) -> AutoencoderKL:
    return ours_from(reference)


@pytest.fixture(scope="module")
def plain(reference) -> AutoencoderKL:
    return ours_from(reference, prepared=False)


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 32, 48)], ids=["square", "non-square"])
def test_encode_matches_diffusers(ours, plain, reference, shape, prepared):
    ours = ours if prepared else plain
    x = images(*shape)
    with torch.no_grad():
        got = ours.encode(x)
        want = reference.encode(x).latent_dist
    assert got.mean.shape == (shape[0], 4, shape[2] // 4, shape[3] // 4)
    errors = {name: max_err(getattr(got, name), getattr(want, name)) for name in ("mean", "logvar", "std")}
    errors["mode"] = max_err(got.mode(), want.mode())
    errors["kl"] = max_err(got.kl(), want.kl())  # summed over C*H*W, so looser in absolute terms
    print(f"encode {shape}: max abs errors {errors}")
    assert max(v for k, v in errors.items() if k != "kl") <= TOL
    assert errors["kl"] <= TOL * got.mean[0].numel()


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_decode_matches_diffusers(ours, plain, reference, prepared):
    ours = ours if prepared else plain
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours.decode(latents)
        want = reference.decode(latents).sample
    err = max_err(got, want)
    print(f"decode [2,4,8,8]: max abs error {err:.2e}")
    assert got.shape == (2, 3, 32, 32)
    assert err <= TOL


def test_inference_in_place_gives_what_training_computes(ours):
    """Without autograd the resnet blocks write into fresh outputs in place; with it they may not."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x = images(2, 3, 32, 32, seed=4)
    with torch.no_grad():
        decoded, encoded = ours.decode(latents), ours.encode(x).mean
    was = {name: p.requires_grad for name, p in ours.named_parameters()}
    try:
        with torch.enable_grad():
            trained = ours.requires_grad_(True).decode(latents)
            trained.sum().backward()  # the graph is intact: nothing it needs was overwritten
            assert torch.equal(trained.detach(), decoded)
            assert torch.equal(ours.encode(x).mean.detach(), encoded)
    finally:
        for name, p in ours.named_parameters():
            p.requires_grad_(was[name])
            p.grad = None


def test_sample_with_generator_matches_diffusers(ours, reference):
    x = images(2, 3, 32, 32, seed=2)
    with torch.no_grad():
        got = ours.encode(x).sample(torch.Generator().manual_seed(42))
        want = reference.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(42))
        mean = ours.encode(x).mode()
    err = max_err(got, want)
    print(f"sample: max abs error {err:.2e}")
    assert err <= TOL
    assert max_err(got, mean) > 1e-3  # the sample really is noisy, not the mean


def test_different_generators_give_different_samples(ours):
    posterior = ours.encode(images(1, 3, 32, 32))
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_layout_round_trip_is_bitwise(reference):
    state = reference.state_dict()
    cfg = config_from_diffusers(dict(reference.config))
    back = to_diffusers(from_diffusers(state, cfg), cfg)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


def test_original_names_match_diffusers_converter(ours, reference):
    """Our state dict, read by diffusers' own single-file converter, gives the reference's weights.

    This checks our parameter names against an independent statement of the original
    layout, including the reversed decoder level numbering and the 1x1-conv attention.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours_state = ours.state_dict()
    assert ours_state["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.2.upsample.conv.weight" in ours_state  # lowest resolution, applied first
    assert not any(k.startswith("decoder.up.0.upsample") for k in ours_state)
    assert "decoder.up.0.block.2.nin_shortcut.weight" not in ours_state  # full resolution: 32 -> 32 channels
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ours_state  # 64 -> 32 channels

    converted = convert_ldm_vae_checkpoint(
        {f"first_stage_model.{k}": v for k, v in ours_state.items()}, dict(reference.config)
    )
    want = reference.state_dict()
    assert sorted(converted) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(converted[key], tensor), key
    # And our own mapping says the same.
    ours_as_diffusers = to_diffusers(ours_state, ours.cfg)
    assert sorted(ours_as_diffusers) == sorted(want)


def test_pairs_are_one_to_one(reference):
    pairs = diffusers_pairs(config_from_diffusers(dict(reference.config)))
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)


def test_diffusers_folder_loads_strictly(reference_folders, reference):
    vae_dir = reference_folders["sd1"] / "vae"
    cfg = config_from_diffusers(json.loads((vae_dir / "config.json").read_text()))
    assert cfg.base_channels == 32 and cfg.channel_mult == (1, 2, 2) and cfg.num_res_blocks == 2
    assert cfg.scaling_factor == pytest.approx(reference.config.scaling_factor)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    result = model.load_state_dict(
        from_diffusers(load_file(vae_dir / "diffusion_pytorch_model.safetensors"), cfg), assign=True, strict=True
    )
    assert not result.missing_keys and not result.unexpected_keys


def test_config_from_original(ours):
    assert config_from_original(ours.state_dict()) == ours.cfg


def test_config_from_original_refuses_other_layouts(ours, reference):
    with pytest.raises(ValueError, match="first_stage_model"):
        config_from_original({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()})
    with pytest.raises(ValueError, match="diffusers"):
        config_from_original(reference.state_dict())
    with pytest.raises(ValueError, match="not an original-layout SD VAE"):
        config_from_original({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_quant_conv", False),
        ("use_post_quant_conv", False),
        ("mid_block_add_attention", False),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("shift_factor", 0.0609),
        ("latents_mean", [0.0] * 4),
    ],
)
def test_config_from_diffusers_refuses_unsupported(reference, field, value):
    config = {**dict(reference.config), field: value}
    with pytest.raises(ValueError, match=field):
        config_from_diffusers(config)


def test_config_from_diffusers_defaults_and_ignores_force_upcast(reference):
    config = {k: v for k, v in dict(reference.config).items() if k != "scaling_factor"}
    config["force_upcast"] = False
    assert config_from_diffusers(config).scaling_factor == 0.18215


@pytest.mark.slow
def test_full_size_sd_vae_matches_diffusers():
    """SD1.5's VAE architecture (widths 128/256/512/512, 2 blocks, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL as ReferenceVAE

    torch.manual_seed(0)
    reference = ReferenceVAE(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).eval()
    with torch.no_grad():  # as the fixtures do: no parameter left at an initial constant
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = ours_from(reference)
    assert model.cfg == SD1.vae
    assert config_from_original(model.state_dict()) == SD1.vae

    x = images(1, 3, 64, 64, seed=3)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = model.encode(x), reference.encode(x).latent_dist
        decoded, want_decoded = model.decode(latents), reference.decode(latents).sample
    errors = {
        "mean": max_err(got.mean, want.mean),
        "logvar": max_err(got.logvar, want.logvar),
        "decode": max_err(decoded, want_decoded),
    }
    print(f"full-size SD VAE: max abs errors {errors}")
    assert decoded.shape == (1, 3, 64, 64)
    assert max(errors.values()) <= TOL
