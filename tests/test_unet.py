"""UNet parity with diffusers, and the UNet checkpoint layouts.

The references are the tiny random diffusers UNets of the fixture pipelines (three
levels, widths 32/64/64, attention on two levels; sd2 with linear projections,
per-level heads and two transformer layers). Key layouts are also checked at SD's
full size against diffusers' own original->diffusers converter, without computing
anything (meta tensors); a slow test repeats the parity check at full SD1.5 size.
Tolerance: max abs error <= 1e-4 in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parity import TOL, max_err

from diffuse.checkpoints.unet_layout import (
    config_from_diffusers,
    config_from_original,
    diffusers_pairs,
    from_diffusers,
    to_diffusers,
)
from diffuse.models.configs import SD1, SD2, UNetConfig
from diffuse.models.unet import UNet
from diffuse.runtime import prepare


def ours_from(reference, prepared: bool = True) -> UNet:
    """Our UNet built on the meta device and filled with the reference's weights (strictly),
    prepared for inference as the loader does unless `prepared` is False (the plain network
    training uses)."""
    cfg = config_from_diffusers(reference.config)
    with torch.device("meta"):
        model = UNet(cfg)
    model.load_state_dict(from_diffusers(reference.state_dict(), cfg), assign=True, strict=True)
    return prepare(model.eval(), "cpu", next(model.parameters()).dtype) if prepared else model.eval()


def inputs(cfg: UNetConfig, batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random latents [B, in_channels, H, W] and text context [B, 7, context_dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, height, width, generator=g), torch.randn(
        batch, 7, cfg.context_dim, generator=g
    )


def perturbed(reference):
    """As the fixtures do: no parameter left at an initial constant, so a misplaced tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return reference.eval()


@pytest.fixture
def reference(reference_pipes, style):
    return reference_pipes[style].unet


@pytest.mark.parametrize(
    "size, timesteps",
    [
        ((16, 16), torch.tensor([10, 999])),
        ((16, 24), 500),  # non-square latent, one python-number timestep for the batch
        ((16, 24), torch.tensor(250.0)),  # a 0-d float tensor (schedulers may step at fractional t)
        ((20, 12), torch.tensor([1, 700])),  # sides that the down path halves to odd sizes
    ],
)
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_matches_diffusers(reference, size, timesteps, prepared):
    model = ours_from(reference, prepared)
    latents, context = inputs(model.cfg, 2, *size)
    with torch.no_grad():
        got = model(latents, timesteps, context)
        want = reference(latents, timesteps, context).sample
    err = max_err(got, want)
    print(f"{model.cfg.use_linear_projection=} {size} max abs err {err:.3g}")
    assert err <= TOL


def test_bf16_is_as_close_to_fp32_as_diffusers_bf16(reference):
    """In bf16 the timestep features are still computed in fp32, then cast, as diffusers does.
    Our bf16 path folds the upsample convolutions (diffuse.runtime.upsample), so it rounds
    differently from diffusers' bf16: the test is that it lands as close to the exact fp32
    answer as diffusers' bf16 does (within 1.5x of its error; both are ~2% of the output's range)."""
    bf16_reference = copy.deepcopy(reference).to(torch.bfloat16)  # the fixture is shared: cast a copy
    model = ours_from(bf16_reference)
    latents, context = (t.to(torch.bfloat16) for t in inputs(model.cfg, 2, 16, 16))
    timesteps = torch.tensor([10, 999])
    with torch.no_grad():
        got = model(latents, timesteps, context)
        want = bf16_reference(latents, timesteps, context).sample
        exact = reference(latents.float(), timesteps, context.float()).sample
    assert got.dtype == torch.bfloat16
    assert max_err(got.float(), exact) <= 1.5 * max_err(want.float(), exact)
    assert max_err(got.float(), exact) <= 0.03 * exact.abs().max().item()


def test_diffusers_round_trip_is_exact(reference):
    cfg = config_from_diffusers(reference.config)
    state = reference.state_dict()
    back = to_diffusers(from_diffusers(state, cfg), cfg)
    assert list(back) == list(state)
    assert all(back[k] is state[k] or torch.equal(back[k], state[k]) for k in state)


def test_config_from_original_reads_the_architecture(reference, style):
    model = ours_from(reference)
    heads = {"num_heads": 4} if style == "sd1" else {"head_dim": 16}  # the fixtures' heads: 4 / (2, 4, 4)
    assert config_from_original(model.state_dict(), **heads) == model.cfg


def test_inpainting_unet_with_9_input_channels(reference):
    """Inpainting checkpoints feed latent + mask + masked-image latent: 9 channels in, 4 out."""
    from diffusers import UNet2DConditionModel

    nine = perturbed(UNet2DConditionModel.from_config({**reference.config, "in_channels": 9}))
    model = ours_from(nine)
    assert (model.cfg.in_channels, model.cfg.out_channels) == (9, 4)
    assert config_from_original(model.state_dict(), head_dim=16).in_channels == 9
    latents, context = inputs(model.cfg, 2, 16, 16, seed=5)
    with torch.no_grad():
        err = max_err(
            model(latents, torch.tensor([3, 800]), context), nine(latents, torch.tensor([3, 800]), context).sample
        )
    assert err <= TOL


@pytest.mark.parametrize(
    "preset, heads, diffusers_config",
    [
        (SD1, {"num_heads": 8}, dict(cross_attention_dim=768, attention_head_dim=8)),
        (
            SD2,
            {"head_dim": 64},
            dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
        ),
    ],
)
def test_full_size_layout_matches_diffusers_converter(preset, heads, diffusers_config):
    """At SD's real size, on meta tensors: our names are the original checkpoint's names
    (diffusers' own ldm converter accepts all of them), and our mapping agrees with it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config)
        model = UNet(preset.unet)
    assert config_from_diffusers(reference.config) == preset.unet
    ours = model.state_dict()
    assert config_from_original(ours, **heads) == preset.unet

    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in ours.items()}, reference.config
    )
    mapped = to_diffusers(ours, preset.unet)
    assert set(converted) == set(mapped) == set(reference.state_dict())
    assert all(converted[k] is mapped[k] for k in mapped)  # the same tensor under the same name
    assert {k: v.shape for k, v in from_diffusers(reference.state_dict(), preset.unet).items()} == {
        k: v.shape for k, v in ours.items()
    }


def test_pairs_read_as_the_correspondence():
    pairs = dict(diffusers_pairs(SD1.unet))
    assert pairs["conv_in"] == "input_blocks.0.0"
    assert pairs["down_blocks.0.resnets.1.norm1"] == "input_blocks.2.0.in_layers.0"
    assert pairs["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert pairs["mid_block.attentions.0"] == "middle_block.1"
    assert pairs["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"  # no attention at the lowest level
    assert pairs["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert pairs["conv_norm_out"] == "out.0"


@pytest.mark.parametrize(
    "field, value",
    [
        ("addition_embed_type", "text_image"),  # Kandinsky's; SDXL's "text_time" is supported
        ("class_embed_type", "timestep"),
        ("transformer_layers_per_block", [[1, 2], 1, 1, 1]),  # depths differing within a level
        ("flip_sin_to_cos", False),
        ("freq_shift", 1),
        ("time_embedding_type", "fourier"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("only_cross_attention", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("act_fn", "gelu"),
        ("conv_in_kernel", 1),
        ("up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    ],
)
def test_config_from_diffusers_refuses_unsupported(reference, field, value):
    config = {**reference.config, field: value}
    with pytest.raises(ValueError, match=field):
        config_from_diffusers(config)


def test_config_from_diffusers_head_counts():
    """diffusers' attention_head_dim means the NUMBER of heads when num_attention_heads is unset."""
    assert config_from_diffusers({"attention_head_dim": 8}).heads == (8, 8, 8, 8)
    assert config_from_diffusers({"attention_head_dim": [5, 10, 20, 20]}).heads == (5, 10, 20, 20)
    assert config_from_diffusers({"transformer_layers_per_block": [2, 2, 2, 2]}).transformer_depth == 2


def test_config_from_original_refuses_non_sd_state():
    model_state = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), heads=(2, 2), context_dim=16)).state_dict()
    with pytest.raises(ValueError, match="Stable Diffusion UNet"):
        config_from_original({"encoder.conv_in.weight": torch.zeros(1)}, num_heads=8)
    with pytest.raises(ValueError, match="label_emb"):
        config_from_original({**model_state, "label_emb.0.0.weight": torch.zeros(1)}, num_heads=8)
    with pytest.raises(ValueError, match="exactly one"):
        config_from_original(model_state)
    without_level = {k: v for k, v in model_state.items() if not k.startswith("input_blocks.2.")}
    with pytest.raises(ValueError, match="input_blocks"):
        config_from_original(without_level, num_heads=2)


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers():
    """SD1.5's UNet architecture (widths 320/640/1280/1280, 8 heads, 768-d context), random weights."""
    from diffusers import UNet2DConditionModel

    reference = perturbed(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8))
    model = ours_from(reference)  # shares the reference's tensors but the convolution kernels laid out channels-last
    assert model.cfg == SD1.unet
    assert config_from_original(model.state_dict(), num_heads=8) == SD1.unet

    latents, context = inputs(model.cfg, 2, 32, 32, seed=7)
    context = context.repeat(1, 11, 1)[:, :77]  # a full-length prompt's 77 tokens
    with torch.no_grad():
        got = model(latents, torch.tensor([10, 999]), context)
        want = reference(latents, torch.tensor([10, 999]), context).sample
    err = max_err(got, want)
    print(f"full-size SD1.5 UNet: max abs err {err:.3g} (output max {want.abs().max().item():.3g})")
    assert err <= TOL
