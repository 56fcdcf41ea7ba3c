"""Writing a loaded Pipeline back out as a standard diffusers model folder.

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/config.json + model.safetensors                (transformers' CLIPTextModel)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json
    text_encoder_2/, tokenizer_2/   SDXL's second encoder (CLIPTextModelWithProjection) and its tokenizer
    unet/config.json + diffusion_pytorch_model.safetensors
    vae/config.json  + diffusion_pytorch_model.safetensors
    vae/latent_rgb.json     the step-preview matrix, when the pipeline has its own (diffuse only)

plus any `extra_files` the caller adds (files diffusers and the loader do not read, such
as the shipped model's CLIP image tower).

Or as one original-layout (CompVis / SGM) single file, as A1111, ComfyUI and diffusers'
from_single_file read it: the weights alone (single_file.join_single_file), see
save_single_file_checkpoint.

The configs are the inverses of the ones the loader reads (unet_layout, vae_layout,
clip_layout), each checked to read back as the architecture it came from, so the
folder rebuilds exactly this pipeline in diffuse and in diffusers.

Everything is written into a hidden sibling folder and renamed into place at the end:
the target path holds either nothing, the old folder, or the complete new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from diffuse.checkpoints import clip_layout, single_file, unet_layout, vae_layout
from diffuse.checkpoints.diffusers_folder import PREVIEW_MATRIX_FILE, preview_matrix_json
from diffuse.metadata import atomic_write
from diffuse.pipeline import Pipeline
from diffuse.preview import check_preview_matrix
from diffuse.samplers.schedule import NoiseSchedule, SamplerOptions

WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def save_diffusers_folder(
    pipe: Pipeline,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write `pipe` as a diffusers folder at `folder` and return its path.

    `dtype` casts the weights as they are written (e.g. torch.float16 to ship half the
    size); None keeps the pipeline's own. An existing non-empty folder is refused unless
    `overwrite`, in which case it is replaced only once the new one is complete.
    `extra_files` (relative path -> bytes) are written into the same new folder, so they
    appear together with it or not at all; they may not replace a file of the folder's own.
    """
    folder = Path(folder).expanduser()
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"unsupported save dtype {dtype}; use one of float32, float16, bfloat16")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} already exists and is not empty; pass overwrite=True to replace it")
    configs = component_configs(pipe)  # before any writing: an unexpressible pipeline fails here
    extras = {_extra_path(name): data for name, data in (extra_files or {}).items()}
    if pipe.preview_matrix is not None:
        check_preview_matrix(pipe.preview_matrix, pipe.config.vae.latent_channels)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.partial"
    staging.mkdir()
    try:
        write_json(staging / "model_index.json", model_index(pipe))
        write_json(staging / "scheduler" / "scheduler_config.json", scheduler_config(pipe))
        if pipe.tokenizer is not None:  # the SDXL refiner has bigG's alone
            pipe.tokenizer.save(staging / "tokenizer")
        if pipe.tokenizer_2 is not None:
            pipe.tokenizer_2.save(staging / "tokenizer_2")
        states = component_states(pipe)
        for name, config in configs.items():
            write_json(staging / name / "config.json", config)
            write_safetensors(staging / name / WEIGHTS[name], states.pop(name), dtype)
        if pipe.preview_matrix is not None:
            write_json(staging / PREVIEW_MATRIX_FILE, preview_matrix_json(pipe.preview_matrix))
        for relative, data in extras.items():
            if (staging / relative).exists():
                raise ValueError(f"extra file {relative} would replace the folder's own file of that name")
            atomic_write(staging / relative, lambda f, data=data: f.write(data))
        move_into_place(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_single_file_checkpoint(
    pipe: Pipeline, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write `pipe` as one original-layout checkpoint at `path` (.safetensors, or .ckpt for torch's
    zip format) and return its path.

    The file holds the weights alone: whoever reads it back takes the architecture from tensor
    shapes and the family's conventions (64-channel UNet heads for SD2 and SDXL, the family's latent
    scale, the CLIP vocabulary), as for any downloaded single file. The one fact the A1111 convention
    keeps beside it, v-prediction, is written as the inference .yaml that readers look for.
    """
    path = Path(path).expanduser()
    fmt = SINGLE_FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: a single-file checkpoint ends in .safetensors or .ckpt")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"unsupported save dtype {dtype}; use one of float32, float16, bfloat16")
    if path.is_dir() or (path.exists() and not overwrite):
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    sidecar = path.with_suffix(".yaml")
    stale = sidecar.is_file() and single_file.sidecar_prediction_type(path) != pipe.config.prediction_type
    if stale and not overwrite:
        raise ValueError(f"{sidecar} says another prediction type; pass overwrite=True to replace it")
    family = single_file_family(pipe)
    text = pipe.text_encoder.state_dict() if pipe.text_encoder is not None else None
    text_2 = pipe.text_encoder_2.state_dict() if pipe.text_encoder_2 is not None else None
    state = single_file.join_single_file(family, pipe.unet.state_dict(), pipe.vae.state_dict(), text, text_2)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    single_file.save_single_file(state, path, fmt)
    if stale or (pipe.config.prediction_type == "v_prediction" and not sidecar.is_file()):
        if pipe.config.prediction_type == "v_prediction":
            atomic_write(sidecar, lambda f: f.write(V_PREDICTION_YAML.encode("utf-8")))
        else:
            sidecar.unlink()  # a replaced v-model's sidecar would misread this one
    return path


SINGLE_FILE_FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt"}
# What single_file.sidecar_prediction_type (and A1111, from its configs' yaml) reads as v-prediction.
V_PREDICTION_YAML = 'model:\n  params:\n    parameterization: "v"\n'


def single_file_family(pipe: Pipeline) -> str:
    """Which original layout holds this pipeline's text encoders: SDXL's (base or refiner) by its
    second encoder, else SD1's CLIP-L (quick_gelu) or SD2's OpenCLIP (gelu) by the activation the
    reader assumes for each."""
    cfg = pipe.config
    if cfg.text_encoder_2 is not None:
        return "sdxl" if cfg.text_encoder is not None else "sdxl_refiner"
    for family in ("sd1", "sd2"):
        if cfg.text_encoder.activation == single_file.FAMILY_PRESETS[family].text_encoder.activation:
            return family
    raise ValueError(f"no single-file layout has a text encoder with activation {cfg.text_encoder.activation!r}")


# ---------------------------------------------------------------- what goes in the files


def component_configs(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    """Each network's config.json, checked to describe exactly the network it came from."""
    cfg = pipe.config
    encoders = text_encoders(pipe)
    configs = {
        "unet": unet_layout.config_to_diffusers(
            cfg.unet, sample_size=cfg.sample_size, size_embed_dim=cfg.size_embed_dim
        ),
        # The VAE works in pixels: the trained image side is the latent side times its downsampling.
        "vae": vae_layout.config_to_diffusers(cfg.vae, sample_size=cfg.image_size),
    }
    read_back = {
        "unet": (unet_layout.config_from_diffusers(configs["unet"]), cfg.unet),
        "vae": (vae_layout.config_from_diffusers(configs["vae"]), cfg.vae),
    }
    for name, (encoder_cfg, tokenizer) in encoders.items():
        configs[name] = clip_layout.config_to_transformers(
            encoder_cfg,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with_projection = bool(encoder_cfg.projection_dim)
        read_back[name] = (
            clip_layout.config_from_transformers(configs[name], with_projection=with_projection),
            encoder_cfg,
        )
    for name, (got, want) in read_back.items():
        if got != want:
            raise ValueError(
                f"{name}: the diffusers config cannot express this architecture ({want} reads back as {got})"
            )
    return configs


def text_encoders(pipe: Pipeline) -> dict[str, tuple]:
    """Each text encoder's config with the tokenizer that feeds it, which must pad as the config says
    (the folder states the pad token once, in the tokenizer)."""
    cfg = pipe.config
    pairs, pads = {}, []
    if cfg.text_encoder is not None or pipe.text_encoder is not None or pipe.tokenizer is not None:
        if cfg.text_encoder is None or pipe.text_encoder is None or pipe.tokenizer is None:
            raise ValueError("the pipeline needs its text_encoder config, network and tokenizer together")
        pairs["text_encoder"] = (cfg.text_encoder, pipe.tokenizer)
        pads.append((pipe.tokenizer, cfg.pad_token_id, "pad_token_id"))
    if cfg.text_encoder_2 is not None or pipe.text_encoder_2 is not None or cfg.unet.adm_in_channels:
        if cfg.text_encoder_2 is None or pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
            raise ValueError("an SDXL pipeline needs text_encoder_2 in its config, its network and tokenizer_2")
        pairs["text_encoder_2"] = (cfg.text_encoder_2, pipe.tokenizer_2)
        pads.append((pipe.tokenizer_2, cfg.pad_token_id_2, "pad_token_id_2"))
    for tokenizer, pad, field in pads:
        if tokenizer.pad_token_id != pad:
            raise ValueError(
                f"the tokenizer pads with id {tokenizer.pad_token_id} but the pipeline config says {field}={pad}"
            )
    return pairs


def component_states(pipe: Pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Each network's tensors under diffusers' / transformers' names (text_projection, where an
    encoder has one, is already transformers' name)."""
    states = {
        "unet": unet_layout.to_diffusers(pipe.unet.state_dict(), pipe.config.unet),
        "vae": vae_layout.to_diffusers(pipe.vae.state_dict(), pipe.config.vae),
    }
    if pipe.text_encoder is not None:
        states["text_encoder"] = clip_layout.to_transformers(pipe.text_encoder.state_dict())
    if pipe.text_encoder_2 is not None:
        states["text_encoder_2"] = clip_layout.to_transformers(pipe.text_encoder_2.state_dict())
    return states


def model_index(pipe: Pipeline) -> dict[str, Any]:
    """Which class reads each subfolder; the optional safety components are absent."""
    # A 9-channel UNet takes the mask and the masked image: diffusers' inpainting pipeline.
    inpaint = pipe.config.unet.in_channels == 9
    if pipe.text_encoder_2 is not None and pipe.text_encoder is None:
        # The SDXL refiner: diffusers runs it as an img2img pipeline with empty first-encoder slots.
        return {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "scheduler": ["diffusers", scheduler_config(pipe)["_class_name"]],
            "text_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": pipe.zeros_for_empty_prompt,
            "requires_aesthetics_score": pipe.config.aesthetic_score,
        }
    if pipe.text_encoder_2 is not None:
        return {
            "_class_name": "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline",
            "scheduler": ["diffusers", scheduler_config(pipe)["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "force_zeros_for_empty_prompt": pipe.zeros_for_empty_prompt,
        }
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
        "scheduler": ["diffusers", scheduler_config(pipe)["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def scheduler_config(pipe: Pipeline) -> dict[str, Any]:
    """The model's own scheduler settings, or SD's (PNDM) when it has none; the prediction
    type is always the model's, since that is what the loader reads it from."""
    if pipe.scheduler_config:
        config = dict(pipe.scheduler_config)
        config.setdefault("_class_name", "PNDMScheduler")
    else:
        options = SamplerOptions()
        config = {
            "_class_name": "PNDMScheduler",
            **dataclasses.asdict(NoiseSchedule()),
            "trained_betas": None,
            "clip_sample": False,
            "set_alpha_to_one": options.set_alpha_to_one,
            "skip_prk_steps": options.skip_prk_steps,
            "steps_offset": options.steps_offset,
            "timestep_spacing": options.timestep_spacing,
        }
    config["prediction_type"] = pipe.config.prediction_type
    return config


# ---------------------------------------------------------------- writing


def _extra_path(name: str | Path) -> Path:
    """An extra file's place in the folder: a relative path that stays inside it."""
    path = Path(name)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(f"extra file {str(name)!r} must be a relative path inside the folder")
    return path


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    # Contiguous CPU tensors, as safetensors stores each one's bytes; only floating weights are cast.
    tensors = {
        k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
        for k, v in state.items()
    }
    data = safetensors_bytes(tensors, metadata={"format": "pt"})  # transformers insists on the format tag
    del tensors
    atomic_write(path, lambda f: f.write(data))


def move_into_place(staging: Path, folder: Path, overwrite: bool, refusal: str | None = None) -> None:
    """Rename the finished folder to its name; with `overwrite`, the old one is set aside
    first and deleted only after the new one is in place. Without it, a non-empty folder is
    refused with `refusal` (or a message saying it exists)."""
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(refusal or f"{folder} already exists and is not empty; pass overwrite=True to replace it")
        old = folder.parent / f".{folder.name}.{secrets.token_hex(4)}.old"
        os.rename(folder, old)
        try:
            os.rename(staging, folder)
        except BaseException:
            os.rename(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        # An empty folder (or none) is replaced by the rename itself.
        os.replace(staging, folder)
