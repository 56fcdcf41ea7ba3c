"""Original (CompVis / A1111-style) single-file checkpoints: one .safetensors or .ckpt
holding all three networks under fixed prefixes.

Our UNet and VAE use the original parameter names, so those two are a plain
prefix strip. The text encoder differs by family: SD1 stores transformers'
CLIP-L names, SD2 stores OpenCLIP-H names (clip_layout maps both); SDXL base
stores CLIP-L in transformers' names and OpenCLIP-bigG, with its projection,
under `conditioner.embedders.{0,1}.`; the SDXL refiner bigG alone under `conditioner.embedders.0.model.`.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffuse.checkpoints import clip_layout, unet_layout, vae_layout
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.keymap import dims, strip_prefix
from diffuse.models.configs import SD1, SD2, SDXL, SDXL_REFINER, PipelineConfig, TextEncoderConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, transformers' names
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP-bigG
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder, bigG

FAMILY_PRESETS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl_refiner": SDXL_REFINER}

# Head counts are not stored in weights: SD1's UNet uses 8 heads at every level,
# SD2's uses 64 channels per head. Both text encoders use 64 channels per head.
SD1_UNET_HEADS = 8
SD2_UNET_HEAD_DIM = 64

EDM_KEYS = {"edm_mean", "edm_std"}

# Tensors real checkpoints carry that no network here uses (the VAE's training loss).
_UNUSED_VAE_PREFIXES = ("loss.",)


def detect_family(state: dict[str, torch.Tensor], path: Path) -> str:
    """ "sd1", "sd2", "sdxl" or "sdxl_refiner", from which text encoders the checkpoint carries."""
    if EDM_KEYS & state.keys():
        # Playground v2.5: SDXL's networks trained for EDM sampling, which the samplers here do not do.
        raise CheckpointError(path, "an EDM-trained SDXL model (edm_mean, edm_std: Playground v2.5) is not supported")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in state):
        return "sd1"
    if any(k.startswith(SDXL_TEXT_2_PREFIX) for k in state):
        if not any(k.startswith(SDXL_TEXT_PREFIX) for k in state):
            raise CheckpointError(path, f"an SDXL checkpoint without its first text encoder ({SDXL_TEXT_PREFIX})")
        return "sdxl"
    embedders = {k.split(".")[2] for k in state if k.startswith("conditioner.embedders.")}
    if embedders == {"0"} and any(k.startswith(SDXL_REFINER_TEXT_PREFIX) for k in state):
        return "sdxl_refiner"
    if embedders:
        raise CheckpointError(path, "an SDXL-style checkpoint with text encoders diffuse does not know")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise CheckpointError(path, f"no Stable Diffusion UNet found (no tensor starts with {UNET_PREFIX!r})")
    raise CheckpointError(
        path, "no text encoder found (neither cond_stage_model.transformer. nor cond_stage_model.model.)"
    )


def split_single_file(
    state: dict[str, torch.Tensor], path: Path, config: PipelineConfig | None = None
) -> tuple[PipelineConfig, dict[str, dict[str, torch.Tensor]]]:
    """Split a single-file state dict into our three networks' state dicts and detect the architecture.

    `config` overrides detection (for architectures whose head counts differ from SD's).
    """
    family = detect_family(state, path)
    try:
        networks = split_networks(state, family)
    except ValueError as e:
        raise CheckpointError(path, f"unreadable {family.upper()} text encoder: {e}") from None
    return (config, networks) if config is not None else (detect_config(networks, family, path), networks)


def detect_config(networks: dict[str, dict[str, torch.Tensor]], family: str, path: Path) -> PipelineConfig:
    """The architecture, read off the networks' tensors where they tell it, the family's preset elsewhere."""
    preset = FAMILY_PRESETS[family]
    try:
        heads = {"num_heads": SD1_UNET_HEADS} if family == "sd1" else {"head_dim": SD2_UNET_HEAD_DIM}
        unet_cfg = unet_layout.config_from_original(networks["unet"], **heads)
        vae_cfg = vae_layout.config_from_original(networks["vae"])
        text_cfg = text_cfg_2 = None
        if preset.text_encoder is not None:
            activation = preset.text_encoder.activation
            text_cfg = clip_layout.config_from_weights(networks["text_encoder"], activation=activation)
        if preset.text_encoder_2 is not None:
            text_cfg_2 = projected_text_config(networks["text_encoder_2"], preset.text_encoder_2.activation)
    except ValueError as e:
        raise CheckpointError(path, f"unrecognized {family.upper()} architecture: {e}") from None
    return PipelineConfig(
        name=path.stem,
        text_encoder=text_cfg,
        unet=unet_cfg,
        # The latent scale is not in the weights; SDXL's VAE has its own.
        vae=replace(vae_cfg, scaling_factor=preset.vae.scaling_factor),
        prediction_type=sidecar_prediction_type(path) or preset.prediction_type,
        pad_token_id=preset.pad_token_id,
        sample_size=preset.sample_size,
        text_encoder_2=text_cfg_2,
        pad_token_id_2=preset.pad_token_id_2,
        size_embed_dim=preset.size_embed_dim,
        aesthetic_score=preset.aesthetic_score,
    )


def split_networks(state: dict[str, torch.Tensor], family: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each network's tensors under our names: unet, vae, text_encoder (and SDXL's text_encoder_2;
    the refiner's alone)."""
    networks = {
        "unet": strip_prefix(state, UNET_PREFIX),
        "vae": {k: v for k, v in strip_prefix(state, VAE_PREFIX).items() if not k.startswith(_UNUSED_VAE_PREFIXES)},
    }
    if family == "sd1":
        networks["text_encoder"] = clip_layout.from_transformers(strip_prefix(state, SD1_TEXT_PREFIX))
    elif family == "sd2":
        open_clip_state = strip_prefix(state, SD2_TEXT_PREFIX)
        layers = clip_layout.sd2_layers(open_clip_state)
        networks["text_encoder"] = clip_layout.from_open_clip(open_clip_state, layers=layers)
    else:
        if family == "sdxl":
            networks["text_encoder"] = clip_layout.from_transformers(strip_prefix(state, SDXL_TEXT_PREFIX))
        # SDXL uses every block of bigG: the penultimate for the context, the last for the pooled vector.
        big_g = strip_prefix(state, SDXL_TEXT_2_PREFIX if family == "sdxl" else SDXL_REFINER_TEXT_PREFIX)
        networks["text_encoder_2"] = clip_layout.from_open_clip(
            big_g, layers=clip_layout.open_clip_layers(big_g), with_projection=True
        )
    return networks


def projected_text_config(state: dict[str, torch.Tensor], activation: str) -> TextEncoderConfig:
    """The architecture of a text encoder with a text_projection, from its tensors."""
    cfg = clip_layout.config_from_weights(state, activation=activation)
    return replace(cfg, projection_dim=dims(state, "text_projection.weight", 2)[0])


def sidecar_prediction_type(path: Path) -> str | None:
    """Whether an inference .yaml beside the checkpoint (the A1111 convention) says v-prediction.

    The weights cannot tell an SD2 v-model (768-v) from an epsilon model (512-base).
    """
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(encoding="utf-8", errors="replace")
    return "v_prediction" if 'parameterization: "v"' in text or "parameterization: v" in text else "epsilon"


def join_single_file(
    family: str,
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor] | None,
    text_encoder_2: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our networks' state dicts as one original-layout state dict (the inverse of split_single_file);
    `text_encoder_2` is SDXL's bigG (the refiner's only encoder: `text_encoder` None)."""
    if family == "sd1":
        text = {SD1_TEXT_PREFIX + k: v for k, v in clip_layout.to_transformers(text_encoder).items()}
    elif family == "sd2":
        text = {SD2_TEXT_PREFIX + k: v for k, v in clip_layout.to_open_clip(text_encoder).items()}
    elif family == "sdxl" and text_encoder_2 is not None:
        text = {SDXL_TEXT_PREFIX + k: v for k, v in clip_layout.to_transformers(text_encoder).items()}
        text.update({SDXL_TEXT_2_PREFIX + k: v for k, v in clip_layout.to_open_clip(text_encoder_2).items()})
    elif family == "sdxl_refiner" and text_encoder_2 is not None:
        text = {SDXL_REFINER_TEXT_PREFIX + k: v for k, v in clip_layout.to_open_clip(text_encoder_2).items()}
    else:
        raise ValueError(
            "an SDXL checkpoint needs text_encoder_2" if family.startswith("sdxl") else f"unknown family {family!r}"
        )
    return {**{UNET_PREFIX + k: v for k, v in unet.items()}, **{VAE_PREFIX + k: v for k, v in vae.items()}, **text}


def save_single_file(state: dict[str, torch.Tensor], path: str | Path, fmt: str = "safetensors") -> Path:
    """Write a single-file checkpoint atomically: to a temporary file beside it, then rename.

    fmt "safetensors" or "ckpt" (torch's zip format, tensors under "state_dict").
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Mode 0o666 lets the umask decide the permissions, as for any file a user writes (mkstemp's are 0o600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    mode = os.stat(tmp).st_mode  # the writer below may create the file anew, with a mode of its own
    try:
        if fmt == "safetensors":
            save_file(tensors, tmp, metadata={"format": "pt"})
        elif fmt == "ckpt":
            torch.save({"state_dict": tensors}, tmp)
        else:
            raise ValueError(f"unknown checkpoint format {fmt!r}; use 'safetensors' or 'ckpt'")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
