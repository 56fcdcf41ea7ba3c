"""Reading a diffusers-format model folder (model_index.json, unet/, vae/, text_encoder/, ...).

File NAMES here only pick which file in the folder holds a component's weights,
as the folder convention defines them; each file's FORMAT is still decided from
its bytes by the reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from diffuse.checkpoints import clip_layout, unet_layout, vae_layout
from diffuse.checkpoints.errors import CheckpointError
from diffuse.checkpoints.fields import check_fields, flag, integer, number, optional, text
from diffuse.checkpoints.reader import read_state_dict
from diffuse.models import configs as limits
from diffuse.models.configs import PipelineConfig
from diffuse.preview import check_preview_matrix

T = TypeVar("T")

# diffuse's own addition to the convention: the latent -> RGB step-preview matrix fitted to the
# folder's VAE (diffuse.preview). diffusers ignores it, as it ignores any file it does not ask for.
PREVIEW_MATRIX_FILE = Path("vae") / "latent_rgb.json"

# Weight file names a diffusers/transformers save may use, best first. Variants
# (".fp16") come after the full-precision file so the original weights win.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")


# A config or shard index is kilobytes; anything near this is not one (and is never read whole).
MAX_JSON_BYTES = 16_000_000
# A tokenizer's files (tokenizer.json, vocab.json, merges.txt) are a few MB.
MAX_TOKENIZER_FILE_BYTES = 64_000_000

_STEPS = integer(1, 100_000)
# Every field of `scheduler/scheduler_config.json` that diffuse's samplers read, type and range
# (diffuse.samplers says which values of the strings it runs, when a sampler is made).
SCHEDULER_FIELDS = {
    "num_train_timesteps": _STEPS,
    "beta_start": number(0, 1, above_low=True),
    "beta_end": number(0, 1, above_low=True),
    "beta_schedule": text(),
    "prediction_type": text(*limits.PREDICTION_TYPES),
    "timestep_spacing": text(),
    "steps_offset": integer(0, 100_000),
    "interpolation_type": text(),
    "rho": number(0, 1000, above_low=True),
    "eta": number(0, 1000),
    "s_noise": number(0, 1000),
    "solver_order": integer(1, 8),
    "lower_order_final": flag,
    "final_sigmas_type": text(),
    "set_alpha_to_one": flag,
    "original_inference_steps": _STEPS,
    "timestep_scaling": number(0, 100_000),
    "skip_prk_steps": flag,
    "use_karras_sigmas": optional(flag),
    "use_exponential_sigmas": optional(flag),
    "use_beta_sigmas": optional(flag),
    "rescale_betas_zero_snr": optional(flag),
    "algorithm_type": text(),
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def read_json(path: Path) -> dict:
    """A folder's JSON file, which must hold an object; CheckpointError naming it otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(path, f"is {size} bytes, over the {MAX_JSON_BYTES}-byte limit for a config file")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "missing (a diffusers folder needs it)") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot be read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(path, "not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


def read_config(path: Path, make: Callable[[dict], T]) -> T:
    """make(the JSON object in `path`), its ValueError (naming a field) becoming a CheckpointError naming the file."""
    try:
        return make(read_json(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def read_scheduler_config(root: Path) -> dict:
    """The folder's scheduler_config.json with its fields checked ({} when it has none: SD's schedule)."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}

    def checked(config: dict) -> dict:
        check_fields(config, SCHEDULER_FIELDS)
        return config

    return read_config(path, checked)


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a tokenizer file too large to be one before the tokenizer reads it whole."""
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file() and path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
            raise CheckpointError(
                path,
                f"is {path.stat().st_size} bytes, over the {MAX_TOKENIZER_FILE_BYTES}-byte limit for a tokenizer file",
            )


def read_component_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of one component folder (e.g. `unet/`), following a shard index if there is one."""
    for stem in _WEIGHT_STEMS:
        for suffix in _WEIGHT_SUFFIXES:
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                weight_map = read_json(index).get("weight_map", {})
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise CheckpointError(index, "weight_map must be an object of tensor name -> shard file name")
                shards = sorted(set(weight_map.values()))
                if not shards:
                    raise CheckpointError(index, "shard index has an empty weight_map")
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(read_state_dict(folder / Path(shard).name))
                return state, index
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return read_state_dict(single), single
    raise CheckpointError(
        folder, "no weights file found (expected e.g. diffusion_pytorch_model.safetensors or model.safetensors)"
    )


def read_diffusers_folder(
    root: Path, pad_token_id: int = 49407, pad_token_id_2: int = 0
) -> tuple[PipelineConfig, dict[str, tuple[dict[str, torch.Tensor], Path]]]:
    """The pipeline config and, per component, its tensors in OUR layout and the file they came from.

    `pad_token_id` (and, for SDXL's second tokenizer, `pad_token_id_2`) come from the folder's
    own tokenizer files, read by the caller (`pad_token_id` is unused without a first tokenizer).
    An SDXL folder adds "text_encoder_2" (a CLIPTextModelWithProjection, its text_projection kept);
    the refiner's has it alone, without "text_encoder", and `requires_aesthetics_score` set.
    """
    unet_cfg, sample_size, size_embed_dim = read_config(
        root / "unet" / "config.json",
        lambda config: (
            unet_layout.config_from_diffusers(config),
            config.get("sample_size") or 64,  # null (diffusers' own default) means SD's 64
            config.get("addition_time_embed_dim") if config.get("addition_embed_type") == "text_time" else 0,
        ),
    )
    vae_cfg = read_config(root / "vae" / "config.json", vae_layout.config_from_diffusers)
    second = root / "text_encoder_2"
    # The SDXL refiner's folder has text_encoder_2 alone: its text_encoder slot is empty.
    refiner = (second / "config.json").is_file() and not (root / "text_encoder").exists()
    text_cfg = (
        None if refiner else read_config(root / "text_encoder" / "config.json", clip_layout.config_from_transformers)
    )
    text_cfg_2 = None
    if (second / "config.json").is_file():
        text_cfg_2 = read_config(
            second / "config.json", lambda config: clip_layout.config_from_transformers(config, with_projection=True)
        )
    prediction_type = read_scheduler_config(root).get("prediction_type", "epsilon")

    unet_state, unet_file = read_component_weights(root / "unet")
    vae_state, vae_file = read_component_weights(root / "vae")
    weights = {
        "unet": (unet_layout.from_diffusers(unet_state, unet_cfg), unet_file),
        "vae": (vae_layout.from_diffusers(vae_state, vae_cfg), vae_file),
    }
    if text_cfg is not None:
        text_state, text_file = read_component_weights(root / "text_encoder")
        weights["text_encoder"] = (clip_layout.from_transformers(text_state), text_file)
    if text_cfg_2 is not None:
        text_state_2, text_file_2 = read_component_weights(second)
        weights["text_encoder_2"] = (clip_layout.from_transformers(text_state_2, with_projection=True), text_file_2)
    config = PipelineConfig(
        name=root.name,
        text_encoder=text_cfg,
        unet=unet_cfg,
        vae=vae_cfg,
        prediction_type=prediction_type,
        pad_token_id=pad_token_id,
        sample_size=sample_size if isinstance(sample_size, int) else sample_size[0],
        text_encoder_2=text_cfg_2,
        pad_token_id_2=pad_token_id_2,
        size_embed_dim=size_embed_dim,
        aesthetic_score=read_index_flag(root, "requires_aesthetics_score", False),
    )
    return config, weights


def read_index_flag(root: Path, name: str, default: bool) -> bool:
    """A true/false setting of the folder's model_index.json (`default` when absent)."""
    index = root / "model_index.json"
    value = read_json(index).get(name, default) if index.is_file() else default
    if not isinstance(value, bool):
        raise CheckpointError(index, f"{name}={value!r}: must be true or false")
    return value


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
