"""Reading a diffusers-format model folder (model_index.json, unet/, vae/, text_encoder/, ...).

File NAMES here only pick which file in the folder holds a component's weights,
as the folder convention defines them; each file's FORMAT is still decided from
its bytes by the reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.configs import PipelineConfig
from ..preview import check_preview_matrix
from . import clip_layout, unet_layout, vae_layout
from .errors import CheckpointError
from .reader import read_state_dict

# diffuse's own addition to the convention: the latent -> RGB step-preview matrix fitted to the
# folder's VAE (diffuse.preview). diffusers ignores it, as it ignores any file it does not ask for.
PREVIEW_MATRIX_FILE = Path("vae") / "latent_rgb.json"

# Weight file names a diffusers/transformers save may use, best first. Variants
# (".fp16") come after the full-precision file so the original weights win.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "missing (a diffusers folder needs it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from None


def read_component_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of one component folder (e.g. `unet/`), following a shard index if there is one."""
    for stem in _WEIGHT_STEMS:
        for suffix in _WEIGHT_SUFFIXES:
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(index, "shard index has an empty weight_map")
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(read_state_dict(folder / Path(shard).name))
                return state, index
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return read_state_dict(single), single
    raise CheckpointError(folder, "no weights file found (expected e.g. diffusion_pytorch_model.safetensors or model.safetensors)")


def read_diffusers_folder(root: Path, pad_token_id: int) -> tuple[PipelineConfig, dict[str, tuple[dict[str, torch.Tensor], Path]]]:
    """The pipeline config and, per component, its tensors in OUR layout and the file they came from.

    `pad_token_id` comes from the folder's own tokenizer files, read by the caller.
    """
    unet_json = read_json(root / "unet" / "config.json")
    unet_cfg = unet_layout.config_from_diffusers(unet_json)
    vae_cfg = vae_layout.config_from_diffusers(read_json(root / "vae" / "config.json"))
    text_cfg = clip_layout.config_from_transformers(read_json(root / "text_encoder" / "config.json"))
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    prediction_type = read_json(scheduler_path).get("prediction_type", "epsilon") if scheduler_path.is_file() else "epsilon"
    # A config saved with sample_size null (diffusers' own default) means SD's 64.
    sample_size = unet_json.get("sample_size") or 64

    unet_state, unet_file = read_component_weights(root / "unet")
    vae_state, vae_file = read_component_weights(root / "vae")
    text_state, text_file = read_component_weights(root / "text_encoder")
    weights = {
        "unet": (unet_layout.from_diffusers(unet_state, unet_cfg), unet_file),
        "vae": (vae_layout.from_diffusers(vae_state, vae_cfg), vae_file),
        "text_encoder": (clip_layout.from_transformers(text_state), text_file),
    }
    config = PipelineConfig(
        name=root.name,
        text_encoder=text_cfg,
        unet=unet_cfg,
        vae=vae_cfg,
        prediction_type=prediction_type,
        pad_token_id=pad_token_id,
        sample_size=int(sample_size if isinstance(sample_size, int) else sample_size[0]),
    )
    return config, weights


def preview_matrix_json(matrix: torch.Tensor) -> dict:
    """What PREVIEW_MATRIX_FILE holds: the [C, 3] or [C + 1, 3] matrix as rows of numbers."""
    return {
        "_description": "latent -> RGB preview: one row per latent channel (UNet scale), then an optional bias "
                        "row; rgb = latents @ rows, in [-1, 1]",
        "matrix": [[float(v) for v in row] for row in matrix.tolist()],
    }


def read_preview_matrix(root: Path, latent_channels: int) -> torch.Tensor | None:
    """The folder's own preview matrix, or None when it has none (SD's is then used)."""
    path = root / PREVIEW_MATRIX_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    rows = data.get("matrix") if isinstance(data, dict) else None
    try:
        matrix = torch.tensor(rows, dtype=torch.float32)
        check_preview_matrix(matrix, latent_channels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"not a preview matrix for {latent_channels}-channel latents: {e}") from None
    return matrix
