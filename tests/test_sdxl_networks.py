"""SDXL's networks against diffusers and transformers: the UNet with its vector conditioning y and
per-level transformer depths, and the second text encoder's penultimate and pooled, projected
outputs, each read from a diffusers folder through the loader's own code.

Two tiny SDXL bases: diffusers' test model (reference 3.8: levels without and with attention,
depths 1 and 2) and one of odd widths with three levels, depths 2 and 3 and text encoders of
different widths. Every weight is perturbed, so no zero-initialised tensor hides a wrong mapping.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffuse.checkpoints import clip_layout, single_file, unet_layout
from diffuse.checkpoints.diffusers_folder import read_diffusers_folder
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import SDXL, UNetConfig, check_pipeline, check_unet
from diffuse.models.unet import UNet

TOL = 1e-4

# (UNet fields, width of text encoder 1, width of text encoder 2, size sinusoid width)
VARIANTS = {
    "diffusers-tiny": (
        dict(
            block_out_channels=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            norm_num_groups=1,
        ),
        32,
        32,
        8,
    ),
    "odd-widths": (
        dict(
            block_out_channels=(6, 12, 18),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 3, 6),  # head counts: 4- and 3-channel heads
            transformer_layers_per_block=(1, 2, 3),
            norm_num_groups=3,
        ),
        24,
        40,
        6,
    ),
}


def perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def text_config(width: int, layers: int = 3):
    from transformers import CLIPTextConfig

    # eos_token_id other than 2, so transformers pools at the first end-of-text token as SDXL does.
    return CLIPTextConfig(
        vocab_size=100,
        hidden_size=width,
        intermediate_size=width + 5,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu",
        projection_dim=width - 4,
        bos_token_id=98,
        eos_token_id=99,
        pad_token_id=0,
    )


def build_folder(root, variant: str):
    """A diffusers SDXL folder (unet, vae, text_encoder, text_encoder_2) of tiny random networks."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    fields, width_1, width_2, size_dim = VARIANTS[variant]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **fields,
        layers_per_block=2,
        sample_size=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=size_dim,
        projection_class_embeddings_input_dim=(width_2 - 4) + 6 * size_dim,
        cross_attention_dim=width_1 + width_2,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(text_config(width_1))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(width_2))
    for seed, module in enumerate((unet, text_encoder, text_encoder_2)):
        perturb(module, seed)
    for name, module in [
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", text_encoder),
        ("text_encoder_2", text_encoder_2),
    ]:
        module.save_pretrained(root / name, safe_serialization=True)
    return unet.eval(), text_encoder.eval(), text_encoder_2.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    references = build_folder(root, request.param)
    config, weights = read_diffusers_folder(root, pad_token_id=0)
    return config, {name: state for name, (state, _) in weights.items()}, references


def filled(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)  # every tensor named and shaped as the folder has it
    return module.eval()


@torch.no_grad()
def test_unet_matches_diffusers(folder):
    config, states, (reference, _, _) = folder
    check_pipeline(config)
    assert config.size_embed_dim == reference.config.addition_time_embed_dim
    unet = filled(UNet(config.unet), states["unet"])
    generator = torch.Generator().manual_seed(1)
    batch, pooled_width = 2, config.text_encoder_2.projection_dim
    latents = torch.randn(batch, 4, 12, 10, generator=generator)
    context = torch.randn(batch, 7, config.unet.context_dim, generator=generator)
    pooled = torch.randn(batch, pooled_width, generator=generator)
    time_ids = torch.tensor([[64.0, 48.0, 3.0, 5.0, 64.0, 48.0], [40.0, 56.0, 0.0, 0.0, 48.0, 48.0]])
    t = torch.tensor([999, 37])
    want = reference(
        latents, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    y = torch.cat([pooled, reference.add_time_proj(time_ids.flatten()).reshape(batch, -1)], dim=1)
    got = unet(latents, t, context, y)
    assert (got - want).abs().max().item() <= TOL
    assert (unet(latents, t, context, torch.zeros_like(y)) - got).abs().max().item() > 1e-3  # y matters


@torch.no_grad()
@pytest.mark.parametrize("which", ["text_encoder", "text_encoder_2"])
def test_text_encoders_match_transformers(folder, which):
    config, states, (_, reference_1, reference_2) = folder
    reference = reference_1 if which == "text_encoder" else reference_2
    ours = filled(CLIPTextEncoder(getattr(config, which)), states[which])
    # Rows with the end-of-text token (99) at different places and padding (0) after it.
    ids = torch.tensor([[98, 5, 17, 42, 99, 0, 0, 0], [98, 7, 99, 0, 0, 0, 0, 0]])
    out = reference(ids, output_hidden_states=True)
    penultimate, pooled = ours.sdxl_outputs(ids, eos_token_id=99)
    assert (penultimate - out.hidden_states[-2]).abs().max().item() <= TOL
    want_pooled = out.text_embeds if which == "text_encoder_2" else out.pooler_output
    assert pooled.shape == want_pooled.shape
    assert (pooled - want_pooled).abs().max().item() <= TOL
    assert (ours(ids) - out.last_hidden_state).abs().max().item() <= TOL  # SD's own use is unchanged


def test_sdxl_base_config_reads_as_the_preset():
    """The SDXL base unet/config.json, as diffusers derives it (reference 3.2), is our SDXL preset's UNet,
    and writing the preset back gives a config that reads the same."""
    base = {
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
    }
    assert unet_layout.config_from_diffusers(base) == SDXL.unet
    written = unet_layout.config_to_diffusers(SDXL.unet, sample_size=128, size_embed_dim=256)
    assert {k: written[k] for k in base} == {**base, "block_out_channels": [320, 640, 1280]}
    assert unet_layout.config_from_diffusers(written) == SDXL.unet


def test_full_size_sdxl_unet_has_diffusers_tensors():
    """Every tensor of diffusers' full SDXL base UNet maps onto ours with its shape, and back (built on meta)."""
    from diffusers import UNet2DConditionModel

    config = unet_layout.config_to_diffusers(SDXL.unet, sample_size=128, size_embed_dim=256)
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(config)
        ours = UNet(SDXL.unet)
    want = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in unet_layout.from_diffusers(reference.state_dict(), SDXL.unet).items()} == want
    assert set(unet_layout.to_diffusers(ours.state_dict(), SDXL.unet)) == set(reference.state_dict())
    blocks = [m for m in ours.modules() if type(m).__name__ == "SpatialTransformer"]
    assert [len(b.transformer_blocks) for b in blocks] == [2, 2, 10, 10] + [10] + [10, 10, 10, 2, 2, 2]


def test_unet_takes_y_only_where_it_has_label_emb():
    plain = UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), heads=(2, 2), context_dim=8, norm_groups=4))
    conditioned = UNet(
        UNetConfig(model_channels=8, channel_mult=(1, 2), heads=(2, 2), context_dim=8, norm_groups=4, adm_in_channels=6)
    )
    latents, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="no vector conditioning"):
        plain(latents, 1, context, torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"y of shape \[2, 6\]"):
        conditioned(latents, 1, context)
    with pytest.raises(ValueError, match=r"y of shape \[2, 6\]"):
        conditioned(latents, 1, context, torch.zeros(2, 5))
    assert conditioned(latents, 1, context, torch.zeros(2, 6)).shape == latents.shape


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(transformer_depths=(0, 2)), "transformer_depths"),  # one per level
        (dict(transformer_depths=(0, 2, 0)), r"transformer_depths\[2\]"),  # an attending level without layers
        (dict(transformer_depths=(0, 2, 65)), r"transformer_depths\[2\]"),
        (dict(mid_transformer_depth=0), "mid_transformer_depth"),
        (dict(adm_in_channels=-1), "adm_in_channels"),
        (dict(transformer_depths=(0, 64, 64), num_res_blocks=16), "transformer layers"),
    ],
)
def test_sdxl_unet_fields_are_bounded(fields, message):
    with pytest.raises(ValueError, match=message):
        check_unet(replace(SDXL.unet, **fields))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(size_embed_dim=255), "size_embed_dim"),
        (dict(size_embed_dim=128), "adm_in_channels"),  # y would not be pooled + 6 sinusoids
        (dict(text_encoder_2=None), "text_encoder_2"),
        (dict(unet=replace(SDXL.unet, adm_in_channels=0)), "together"),  # two encoders but no y
        (dict(unet=replace(SDXL.unet, context_dim=1280)), "context_dim"),
        (dict(pad_token_id_2=49408), "pad_token_id_2"),
    ],
)
def test_sdxl_pipeline_fields_are_checked_together(fields, message):
    check_pipeline(SDXL)
    with pytest.raises(ValueError, match=message):
        check_pipeline(replace(SDXL, **fields))


def test_text_encoder_2_config_and_projection_are_read():
    config = text_config(48).to_dict()
    assert clip_layout.config_from_transformers(config, with_projection=True).projection_dim == 44
    assert clip_layout.config_from_transformers(config).projection_dim == 0  # CLIPTextModel: no projection weights
    with pytest.raises(ValueError, match="projection_dim"):
        clip_layout.config_from_transformers({**config, "projection_dim": 0}, with_projection=True)
    state = {"text_model.final_layer_norm.weight": torch.zeros(1), "text_projection.weight": torch.zeros(1)}
    assert set(clip_layout.from_transformers(state, with_projection=True)) == {
        "final_layer_norm.weight",
        "text_projection.weight",
    }
    assert set(clip_layout.from_transformers(state)) == {"final_layer_norm.weight"}


def meta_state(module_class, cfg) -> dict:
    with torch.device("meta"):  # shapes without memory: enough for reading an architecture off a file
        return module_class(cfg).state_dict()


def test_full_size_sdxl_single_file_is_detected():
    """An original SDXL base file (reference 3.5's prefixes, bigG in OpenCLIP's names and fused
    attention) reads back as the SDXL preset, every network under our names."""
    from diffuse.models.vae import AutoencoderKL

    ours = {
        "unet": meta_state(UNet, SDXL.unet),
        "vae": meta_state(AutoencoderKL, SDXL.vae),
        "text_encoder": meta_state(CLIPTextEncoder, SDXL.text_encoder),
        "text_encoder_2": meta_state(CLIPTextEncoder, SDXL.text_encoder_2),
    }
    state = single_file.join_single_file("sdxl", **ours)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    path = Path("sd_xl_base_1.0.safetensors")
    assert single_file.detect_family(state, path) == "sdxl"
    config, networks = single_file.split_single_file(state, path)
    assert config == replace(SDXL, name="sd_xl_base_1.0")
    assert {name: {k: v.shape for k, v in net.items()} for name, net in networks.items()} == {
        name: {k: v.shape for k, v in net.items()} for name, net in ours.items()
    }


def test_sdxl_single_file_round_trip_keeps_every_value(folder):
    """Our tiny SDXL networks through the single-file layout and back: every tensor the same,
    the projection transposed on the way out and back again (OpenCLIP applies it as x @ P)."""
    _, states, _ = folder
    state = single_file.join_single_file("sdxl", **states)
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(projection, states["text_encoder_2"]["text_projection.weight"].t())
    back = single_file.split_networks(state, "sdxl")
    assert set(back) == set(states)
    for name, net in states.items():
        assert set(back[name]) == set(net), name
        assert all(torch.equal(back[name][k], v) for k, v in net.items()), name


@pytest.mark.parametrize(
    "keys, message",
    [
        (["conditioner.embedders.1.model.ln_final.weight"], "first text encoder"),
        (["conditioner.embedders.2.foo"], "does not know"),
    ],
)
def test_other_sdxl_style_files_are_refused_by_name(keys, message):
    from diffuse.checkpoints.errors import CheckpointError

    state = dict.fromkeys(["model.diffusion_model.out.2.weight", *keys], torch.zeros(1))
    with pytest.raises(CheckpointError, match=message):
        single_file.detect_family(state, Path("x.safetensors"))


def tiny_xl_networks() -> dict[str, torch.nn.Module]:
    """A small SDXL base with 64-channel heads, as single-file detection assumes, on CLIP's vocabulary."""
    from diffuse.models.configs import TextEncoderConfig, VAEConfig
    from diffuse.models.vae import AutoencoderKL

    text_1 = TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=96)
    text_2 = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=160, activation="gelu", projection_dim=96)
    unet_cfg = replace(
        SDXL.unet, model_channels=64, channel_mult=(1, 2), attention_levels=(False, True), heads=(1, 2),
        transformer_depths=None, transformer_depth=2, context_dim=64 + 128, adm_in_channels=96 + 6 * 256,
    )  # fmt: skip
    vae_cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, scaling_factor=SDXL.vae.scaling_factor)
    torch.manual_seed(0)
    networks = {
        "unet": UNet(unet_cfg),
        "vae": AutoencoderKL(vae_cfg),
        "text_encoder": CLIPTextEncoder(text_1),
        "text_encoder_2": CLIPTextEncoder(text_2),
    }
    for seed, module in enumerate(networks.values()):
        perturb(module, seed)
    return networks


@pytest.fixture(scope="module")
def tiny_xl_file(tmp_path_factory):
    networks = tiny_xl_networks()
    states = {name: module.state_dict() for name, module in networks.items()}
    path = tmp_path_factory.mktemp("single") / "tiny_xl.safetensors"
    single_file.save_single_file(single_file.join_single_file("sdxl", **states), path)
    return path, networks


def test_an_sdxl_single_file_loads_and_draws(tiny_xl_file):
    """The small SDXL base single file loads through load_pipeline with both encoders and both
    tokenizers, its networks holding the file's values, and draws."""
    import diffuse

    path, networks = tiny_xl_file
    pipe = diffuse.load_pipeline(path, dtype="float32")
    configs = {name: module.cfg for name, module in networks.items()}
    assert pipe.config == replace(SDXL, name="tiny_xl", **configs)
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    for name, module in networks.items():
        got = getattr(pipe, name).state_dict()
        assert all(torch.equal(got[k].float(), v) for k, v in module.state_dict().items()), name
    image = pipe.txt2img("a red square", steps=1, width=64, height=64, seed=1).images[0]
    assert image.size == (64, 64)


@torch.no_grad()
def test_an_sdxl_model_converts_to_a_diffusers_folder(tiny_xl_file, tmp_path):
    """`diffuse convert` of an SDXL single file: diffusers' StableDiffusionXLPipeline reads the folder
    and its UNet and second text encoder compute what ours do; diffuse reads it back as it was."""
    from diffusers import StableDiffusionXLPipeline

    import diffuse
    from diffuse.checkpoints.export import save_diffusers_folder

    path, networks = tiny_xl_file
    pipe = diffuse.load_pipeline(path, dtype="float32")
    folder = save_diffusers_folder(pipe, tmp_path / "tiny_xl")
    again = diffuse.load_pipeline(folder, dtype="float32")
    assert again.config == replace(pipe.config, name="tiny_xl")
    assert again.tokenizer_2.pad_token_id == 0 and again.zeros_for_empty_prompt

    reference = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False).to(torch.float32)
    ids = pipe.tokenizer_2("a red square")
    out = reference.text_encoder_2(ids, output_hidden_states=True)
    penultimate, pooled = networks["text_encoder_2"].sdxl_outputs(ids, pipe.tokenizer_2.eos_token_id)
    assert (penultimate - out.hidden_states[-2]).abs().max().item() <= TOL
    assert (pooled - out.text_embeds).abs().max().item() <= TOL
    generator = torch.Generator().manual_seed(2)
    latents, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 192, generator=generator)
    pooled, time_ids = torch.randn(1, 96, generator=generator), torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    want = reference.unet(
        latents, 10, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    y = torch.cat([pooled, reference.unet.add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=1)
    assert (networks["unet"](latents, 10, context, y) - want).abs().max().item() <= TOL


@torch.no_grad()
def test_a_refiner_shaped_unet_matches_diffusers():
    """The refiner's shape (reference 3.3): the deepest level without attention, so the middle
    block's depth is its own (here 3, where the attending level has 2), and y of another width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        block_out_channels=(4, 8, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 2, 3),
        layers_per_block=1,
        norm_num_groups=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12 + 5 * 4,  # pooled + orig, crop and aesthetic score
        cross_attention_dim=12,
    ).eval()
    perturb(reference, 3)
    cfg = unet_layout.config_from_diffusers(reference.config)
    assert (cfg.transformer_depths, cfg.mid_depth) == ((0, 2, 0), 3)
    unet = filled(UNet(cfg), unet_layout.from_diffusers(reference.state_dict(), cfg))
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    pooled, time_ids = torch.randn(2, 12), torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0], [32.0, 48.0, 2.0, 1.0, 2.5]])
    want = reference(
        latents, 500, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
    ).sample
    y = torch.cat([pooled, reference.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    assert (unet(latents, 500, context, y) - want).abs().max().item() <= TOL
    assert (
        unet_layout.config_from_diffusers(unet_layout.config_to_diffusers(cfg, sample_size=8, size_embed_dim=4)) == cfg
    )
