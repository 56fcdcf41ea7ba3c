"""SDXL single files between diffuse and diffusers, both ways, on the tiny random base and refiner.

diffuse writes the original (SGM) layout and diffusers' from_single_file reads it; offline, its
architecture comes from the diffusers folder of the same tiny model (`config=`), as it would
from the hub for a real one. Back: the original layout made from diffusers' own state dicts by
the mapping of diffusers' scripts/convert_diffusers_to_original_sdxl.py (written out below, so
that nothing of diffuse's decides it), read by diffuse.

A single file does not carry the tiny models' head counts (real SDXL's are 64 channels each),
so diffuse reads these with the architecture given, as diffusers does.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from test_sdxl_pipeline import NEGATIVE, PROMPT, STEPS, assert_same_images, ours, reference_pipe
from test_sdxl_refiner import assert_refines_as_diffusers, reference_refiner, refiner

import diffuse
from diffuse.checkpoints import single_file
from diffuse.checkpoints.export import save_diffusers_folder, save_single_file_checkpoint

__all__ = ["ours", "reference_pipe", "reference_refiner", "refiner"]  # fixtures

NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(pipe, reference, cast: torch.dtype = torch.float32) -> None:
    """Every tensor of each network diffusers holds, equal to the reference's (cast as written)."""
    for name in NETWORKS:
        if getattr(reference, name) is None:
            assert getattr(pipe, name) is None, name
            continue
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(got[key], value.to(cast)), f"{name}.{key}"


# ------------------------------------------------------------------ diffuse writes, diffusers reads


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["float32", "float16"])
def test_diffusers_reads_the_base_diffuse_writes_as_a_single_file(dtype, ours, sdxl_folder, reference_pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = save_single_file_checkpoint(ours, tmp_path / "tiny_xl.safetensors", dtype=dtype)
    written = single_file_state(path)
    assert single_file.detect_family(written, path) == "sdxl"
    assert {v.dtype for v in written.values()} == {dtype or torch.float32}
    from_file = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(sdxl_folder), local_files_only=True, add_watermarker=False, torch_dtype=dtype
    )
    assert_same_weights(from_file, reference_pipe, cast=dtype or torch.float32)
    if dtype is not None:
        return
    expected = from_file(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images
    again = diffuse.load_pipeline(path, dtype="float32", config=ours.config)
    result = again.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=5.0, sampler="Euler", seed=7)
    assert_same_images(result.images, expected)


def test_diffusers_reads_the_refiner_diffuse_writes_as_a_single_file(refiner, refiner_folder, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    path = save_single_file_checkpoint(refiner, tmp_path / "tiny_refiner.safetensors")
    assert single_file.detect_family(single_file_state(path), path) == "sdxl_refiner"
    from_file = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(path), config=str(refiner_folder), local_files_only=True, add_watermarker=False
    )
    assert from_file.text_encoder is None and from_file.config.requires_aesthetics_score
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, add_watermarker=False)
    assert_same_weights(from_file, reference)
    assert_refines_as_diffusers(refiner, from_file)


def single_file_state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ the original layout, read by diffuse


def test_diffuse_reads_the_base_in_the_original_layout(ours, reference_pipe, tmp_path):
    path = tmp_path / "sgm_base.safetensors"
    save_file(original_layout(reference_pipe, big_g_prefix="conditioner.embedders.1.model."), str(path))
    from_file = diffuse.load_pipeline(path, dtype="float32", config=ours.config)
    assert from_file.config == ours.config and from_file.tokenizer_2.pad_token_id == 0
    for name in NETWORKS:
        want = getattr(ours, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(from_file, name).state_dict().items()), name
    expected = reference_pipe(
        PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3)
    ).images
    assert_same_images(
        from_file.txt2img(PROMPT, steps=STEPS, guidance_scale=5.0, sampler="Euler", seed=3).images, expected
    )


def test_diffuse_reads_the_refiner_in_the_original_layout(refiner, reference_refiner, tmp_path):
    path = tmp_path / "sgm_refiner.safetensors"
    save_file(original_layout(reference_refiner, big_g_prefix="conditioner.embedders.0.model."), str(path))
    from_file = diffuse.load_pipeline(path, dtype="float32", config=refiner.config)
    assert from_file.text_encoder is None and from_file.config.aesthetic_score
    for name in ("unet", "vae", "text_encoder_2"):
        want = getattr(refiner, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(from_file, name).state_dict().items()), name


def test_a_single_file_written_twice_reads_the_same_and_converts_back_to_the_folder(ours, tmp_path):
    """diffuse's own round trip: single file -> diffuse -> diffusers folder -> diffuse, nothing lost."""
    path = save_single_file_checkpoint(ours, tmp_path / "a.safetensors")
    again = diffuse.load_pipeline(path, dtype="float32", config=ours.config)
    folder = save_diffusers_folder(again, tmp_path / "folder")
    back = diffuse.load_pipeline(folder, dtype="float32")
    assert back.config == replace(ours.config, name="folder")
    for name in NETWORKS:
        want = getattr(ours, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(back, name).state_dict().items()), name


def test_the_single_file_writer_refuses_before_writing(ours, tmp_path):
    with pytest.raises(ValueError, match=r"ends in \.safetensors or \.ckpt"):
        save_single_file_checkpoint(ours, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="unsupported save dtype"):
        save_single_file_checkpoint(ours, tmp_path / "model.safetensors", dtype=torch.int8)
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    with pytest.raises(ValueError, match="already exists"):
        save_single_file_checkpoint(ours, tmp_path / "taken.safetensors")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
    written = save_single_file_checkpoint(ours, tmp_path / "mine.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not mkstemp's 0o600


def test_a_v_prediction_model_gets_the_inference_yaml_readers_look_for(ours, tmp_path):
    path = tmp_path / "v.safetensors"
    v_model = replace(ours, config=replace(ours.config, prediction_type="v_prediction"))
    save_single_file_checkpoint(v_model, path)
    assert single_file.sidecar_prediction_type(path) == "v_prediction"
    with pytest.raises(ValueError, match="another prediction type"):
        save_single_file_checkpoint(ours, tmp_path / "v.ckpt")
    save_single_file_checkpoint(ours, path, overwrite=True)
    assert single_file.sidecar_prediction_type(path) is None


# ------------------------------------------------------------------ diffusers' script's mapping, as data
# (stable-diffusion, diffusers) pairs of scripts/convert_diffusers_to_original_sdxl.py; its fixed level
# counts are the real SDXL's, so the VAE's reversed up-block numbering is taken from the model here.

UNET_KEYS = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
TEXT_KEYS = [
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]


def unet_layers() -> list[tuple[str, str]]:
    layers = []
    for i in range(3):
        for j in range(2):
            layers.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i > 0:
                layers.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(4):
            layers.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i < 2:
                layers.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layers.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layers.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    layers.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
    layers.append(("middle_block.1.", "mid_block.attentions.0."))
    layers += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return layers


def vae_layers(levels: int) -> list[tuple[str, str]]:
    layers = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(levels):
        layers += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        if i < levels - 1:
            layers.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            layers.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        layers += [(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
    return layers + [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]


VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def renamed(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, diffusers_name in pairs:
        key = key.replace(diffusers_name, original)
    return key


def original_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = renamed(key, UNET_KEYS)
        name = renamed(name, UNET_RESNET) if "resnets" in key else name
        out["model.diffusion_model." + renamed(name, unet_layers())] = value
    return out


def original_vae(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = renamed(key, vae_layers(levels))
        if "attentions" in key:
            name = renamed(name, VAE_ATTENTION)
            value = value[..., None, None] if value.ndim == 2 else value  # linear -> 1x1 conv
        out["first_stage_model." + name] = value
    return out


def original_big_g(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's names, q, k, v fused into in_proj; the projection as SGM keeps it (x @ P), which
    the script leaves under transformers' name."""
    pattern = re.compile("|".join(re.escape(hf) for _, hf in TEXT_KEYS))
    to_original = {hf: original for original, hf in TEXT_KEYS}
    out, fused = {}, {}
    for key, value in state.items():
        q_k_v = re.match(r"(.*)\.([qkv])_proj\.(weight|bias)$", key)
        if q_k_v:
            fused.setdefault((q_k_v[1], q_k_v[3]), {})[q_k_v[2]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        else:
            out[pattern.sub(lambda m: to_original[m[0]], key)] = value
    for (prefix, kind), parts in fused.items():
        name = pattern.sub(lambda m: to_original[m[0]], prefix)
        out[f"{name}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def original_layout(reference, big_g_prefix: str) -> dict[str, torch.Tensor]:
    """A diffusers SDXL pipeline's networks as one SGM state dict."""
    state = {
        **original_unet(reference.unet.state_dict()),
        **original_vae(reference.vae.state_dict(), len(reference.vae.config.block_out_channels)),
        **{big_g_prefix + k: v for k, v in original_big_g(reference.text_encoder_2.state_dict()).items()},
    }
    if reference.text_encoder is not None:
        # CLIP-L as transformers 4 saved it (with "text_model."), which the script copies unchanged.
        clip_l = {
            k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in reference.text_encoder.state_dict().items()
        }
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()})
    return {k: v.detach().contiguous() for k, v in state.items()}


def test_an_edm_trained_sdxl_file_is_refused_by_name(ours, tmp_path):
    """Playground v2.5 holds SDXL's networks and its EDM latent statistics; drawn as SDXL it would be wrong."""
    from diffuse.checkpoints.errors import CheckpointError

    path = save_single_file_checkpoint(ours, tmp_path / "playground.safetensors")
    state = {**single_file_state(path), "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"playground.safetensors: .*EDM-trained SDXL model"):
        diffuse.load_pipeline(path, dtype="float32", config=ours.config)


# ------------------------------------------------------------------ full size, on the meta device

# sgm's configs/inference/sd_xl_base.yaml, the parts diffusers reads to build its networks' configs.
SD_XL_BASE_YAML = {
    "model": {
        "params": {
            "scale_factor": 0.13025,
            "network_config": {
                "params": {
                    "adm_in_channels": 2816,
                    "num_classes": "sequential",
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4],
                    "num_head_channels": 64,
                    "use_linear_in_transformer": True,
                    "transformer_depth": [1, 2, 10],
                    "context_dim": 2048,
                }
            },
            "first_stage_config": {
                "params": {
                    "ddconfig": {
                        "z_channels": 4,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                    }
                }
            },
        }
    }
}


# sd_xl_refiner.yaml differs in its UNet: wider, four levels, depth 4, bigG's context and five sinusoids in y.
SD_XL_REFINER_UNET = {
    "adm_in_channels": 2560,
    "model_channels": 384,
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": 4,
    "context_dim": 1280,
}


def sgm_yaml(family: str) -> dict:
    if family == "sdxl":
        return SD_XL_BASE_YAML
    network = SD_XL_BASE_YAML["model"]["params"]["network_config"]["params"] | SD_XL_REFINER_UNET
    params = SD_XL_BASE_YAML["model"]["params"] | {"network_config": {"params": network}}
    return {"model": {"params": params}}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_a_full_size_sdxl_file_holds_every_tensor_diffusers_converts(family):
    """diffuse's full-size SDXL base (or refiner) in the single-file layout (on meta: shapes, no memory) through
    diffusers' own converters, its networks configured from sgm's yaml: every tensor of diffusers'
    UNet, VAE and transformers text encoders, at its shape, and nothing else."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffuse.models.clip import CLIPTextEncoder
    from diffuse.models.configs import SDXL, SDXL_REFINER
    from diffuse.models.unet import UNet
    from diffuse.models.vae import AutoencoderKL as OurVAE

    preset, yaml = {"sdxl": SDXL, "sdxl_refiner": SDXL_REFINER}[family], sgm_yaml(family)
    with torch.device("meta"):
        ours = {
            "unet": UNet(preset.unet).state_dict(),
            "vae": OurVAE(preset.vae).state_dict(),
            "text_encoder": None if preset.text_encoder is None else CLIPTextEncoder(preset.text_encoder).state_dict(),
            "text_encoder_2": CLIPTextEncoder(preset.text_encoder_2).state_dict(),
        }
        state = single_file.join_single_file(family, **ours)
        unet_config = sfu.create_unet_diffusers_config_from_ldm(yaml, state)
        vae_config = sfu.create_vae_diffusers_config_from_ldm(yaml, state)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu"))  # fmt: skip
        big_g = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280)
        )  # fmt: skip
        expected = {
            "unet": UNet2DConditionModel(**unet_config).state_dict(),
            "vae": AutoencoderKL(**vae_config).state_dict(),
            "text_encoder": clip_l.state_dict(),
            "text_encoder_2": big_g.state_dict(),
        }
        big_g_prefix = "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."
        converted = {
            "unet": sfu.convert_ldm_unet_checkpoint(state, unet_config),
            "vae": sfu.convert_ldm_vae_checkpoint(state, vae_config),
            # transformers 5's CLIPTextModel has no "text_model." level; diffusers strips it likewise
            "text_encoder": {
                k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(state).items()
            },
            "text_encoder_2": sfu.convert_open_clip_checkpoint(big_g, state, prefix=big_g_prefix),
        }
    heads = [5, 10, 20] if family == "sdxl" else [6, 12, 24, 24]  # reference 3.2 and 3.3
    assert unet_config["attention_head_dim"] == heads and unet_config["addition_embed_type"] == "text_time"
    if family == "sdxl_refiner":
        assert converted["text_encoder"] == {}  # the refiner has bigG alone
        del expected["text_encoder"], converted["text_encoder"]
    for name in expected:
        assert shapes(converted[name]) == shapes(expected[name]), name
