"""The finished component a training stage leaves, and how later steps read it back.

The model is trained in three stages, each in its own folder, each on the shared loop
(diffuse.train.loop):

    vae   diffuse.train.stages.vae    the autoencoder, on images alone
    clip  diffuse.train.stages.clip   the text encoder, against a small image tower (CLIP's loss)
    unet  diffuse.train.stages.unet   the noise predictor, conditioned on the two above, frozen

Besides the loop's checkpoint-<step>.pt files and log.jsonl, a finished stage writes the
component the next stage (and the step that ships the default model) reads:

    out_dir/final.safetensors   the component's state dict (float32, the model's own names)
    out_dir/final.json          {"format", "component", "config": the architecture config's
                                 fields, "extra": what else a reader needs (the autoencoder's
                                 measured scaling factor is inside its config; the tokenizer's
                                 pad id; the noise schedule), "trained_with": the training
                                 config's fields}

The CLIP stage also leaves, beside its text encoder, the image tower it was trained against
(image encoder, text projection, temperature) as final_image_tower.safetensors / .json in the
same format: the shipped model keeps it, in its IMAGE_TOWER_DIR, to measure its text encoder
by caption retrieval.

`load_final(folder, component)` builds the component back from those two files. A stage whose
config names such a folder as `init_from` starts from its weights instead of random ones
(fine-tuning; diffuse.train.unpack turns a model folder back into stage folders).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from diffuse.metadata import atomic_write, sha256_file
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.shapes.image_encoder import ImageTower, ImageTowerConfig
from diffuse.train.config_files import config_from_dict, read_json
from diffuse.train.worlds import config_fields

FINAL_WEIGHTS = "final.safetensors"
FINAL_INFO = "final.json"
FINAL_FORMAT = "diffuse-trained-component"
# A stage's own component is final.*; one it leaves beside that gets a name of its own.
SIDE_COMPONENT_STEMS = {"image_tower": "final_image_tower"}
IMAGE_TOWER_DIR = "image_tower"  # where a model folder keeps the CLIP stage's image tower

# component name in final.json -> (architecture config class, model class)
COMPONENTS: dict[str, tuple[type, type[nn.Module]]] = {
    "vae": (VAEConfig, AutoencoderKL),
    "text_encoder": (TextEncoderConfig, CLIPTextEncoder),
    "unet": (UNetConfig, UNet),
    "image_tower": (ImageTowerConfig, ImageTower),
}


def final_files(folder: str | Path, component: str) -> tuple[Path, Path]:
    """(weights file, info file) of `component` in a stage's folder."""
    folder = Path(folder)
    stem = SIDE_COMPONENT_STEMS.get(component)
    if stem is None:
        return folder / FINAL_WEIGHTS, folder / FINAL_INFO
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def stage_inputs(field: str, folder: str | Path, component: str) -> dict[str, Path]:
    """A finished component's two files as inputs of a run (loop.train's `inputs`), named by the
    config field that points at them: {"<field> <component> weights": ..., "<field> <component> config": ...}."""
    weights, info = final_files(folder, component)
    return {f"{field} {component} weights": weights, f"{field} {component} config": info}


def weights_sha256(folder: str | Path, component: str) -> str:
    """The sha256 of a finished component's weights file: which weights a later stage was trained on."""
    return sha256_file(final_files(folder, component)[0])


def save_final(
    out_dir: str | Path,
    component: str,
    model: nn.Module,
    model_config: Any,
    train_config: Any,
    extra: dict | None = None,
) -> Path:
    """Write the component's weights and info (final.safetensors / final.json for a stage's own
    component; weights first: the json marks it complete). `train_config` is the training config,
    or, for a component that was not trained here (diffuse.train.unpack), a dict saying where it is from."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {sorted(COMPONENTS)}")
    weights_path, info_path = final_files(out_dir, component)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    # One metadata entry only: safetensors writes the entries in hash-map order, which varies
    # between runs, and the same weights should always make the same file.
    data = safetensors.torch.save(weights, metadata={"component": component})
    atomic_write(weights_path, lambda f: f.write(data))
    info = {
        "format": FINAL_FORMAT,
        "component": component,
        "config": dataclasses.asdict(model_config),
        "extra": dict(extra or {}),
        "trained_with": dict(train_config) if isinstance(train_config, dict) else config_fields(train_config),
    }
    text = json.dumps(info, indent=2) + "\n"
    return atomic_write(info_path, lambda f: f.write(text.encode("utf-8")))


def read_final_info(folder: str | Path, component: str) -> dict:
    """The info file (final.json) of a finished component, checked to hold `component`."""
    path = final_files(folder, component)[1]
    if not path.is_file():
        raise ValueError(f"{folder} holds no finished {component} ({path.name} is missing): train that stage first")
    info = read_json(path, str(path))
    if not isinstance(info, dict) or info.get("format") != FINAL_FORMAT:
        raise ValueError(f"{path} is not a trained component's description")
    if info.get("component") != component:
        raise ValueError(f"{folder} holds a trained {info.get('component')!r}, not the {component!r} asked for")
    return info


def load_final(folder: str | Path, component: str) -> tuple[nn.Module, Any, dict]:
    """(model in eval mode with grads off, its architecture config, final.json's extra) from a finished stage."""
    info = read_final_info(folder, component)
    config_cls, model_cls = COMPONENTS[component]
    weights_path, info_path = final_files(folder, component)
    config = config_from_dict(config_cls, info["config"], where=f"{info_path}: config")
    model = model_cls(config)
    weights = safetensors.torch.load_file(weights_path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{folder}: the {component} weights do not fit its config: {error}") from None
    model.eval().requires_grad_(False)
    return model, config, info["extra"]


def starting_weights(
    folder: str | Path, component: str, config: Any, measured: tuple[str, ...] = ()
) -> tuple[nn.Module, dict]:
    """(model, extra) of the finished component a stage starts from (its init_from) instead of random
    weights, refused unless it has the run's architecture `config`. Fields in `measured` are
    measured when a stage ends (the VAE's scaling factor), not chosen: they may differ."""
    model, loaded_config, extra = load_final(folder, component)
    differing = [
        field.name
        for field in dataclasses.fields(config)
        if field.name not in measured and getattr(config, field.name) != getattr(loaded_config, field.name)
    ]
    if differing:
        raise ValueError(
            f"init_from {folder}: its {component} is not this run's architecture (they differ in "
            f"{', '.join(differing)})"
        )
    return model, extra


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain single process): the one that writes final files."""
    return int(os.environ.get("RANK", "0")) == 0
