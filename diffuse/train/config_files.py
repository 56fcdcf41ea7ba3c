"""Training config files: a JSON object whose keys are a frozen config dataclass's fields.

Nested objects fill nested configs, lists fill tuples, and a preset's name (such as "tiny")
stands for a whole architecture config. A stage's data section builds the data config of the
world its "world" key names (diffuse.train.worlds; the shapes world without one). Unknown keys
and wrong types are refused by name, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from diffuse.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from diffuse.shapes.image_encoder import ImageEncoderConfig
from diffuse.train.presets import TINY_IMAGE_ENCODER, TINY_TEXT, TINY_UNET, TINY_VAE
from diffuse.train.worlds import WorldData, world_config_class

# Names a config file may use in place of a whole architecture config.
PRESETS_BY_TYPE: dict[type, dict[str, Any]] = {
    VAEConfig: {"tiny": TINY_VAE},
    TextEncoderConfig: {"tiny": TINY_TEXT},
    UNetConfig: {"tiny": TINY_UNET},
    ImageEncoderConfig: {"tiny": TINY_IMAGE_ENCODER},
}


def read_config(cls: type, path: str | Path) -> Any:
    """The training config `cls` from the JSON file at `path` (fields not in the file keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    return config_from_dict(cls, read_json(path, f"config file {path}"), where=str(path))


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None


def config_from_dict(cls: type, values: Any, where: str = "config") -> Any:
    """Build the frozen dataclass `cls` from plain JSON values, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object with {cls.__name__}'s fields, not {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; its fields are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    converted = {name: _from_json(hints[name], value, f"{where}: {name}") for name, value in values.items()}
    try:
        return cls(**converted)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


def world_data_from_dict(values: Any, where: str = "data") -> WorldData:
    """The data config of the world a data section names ("world", the shapes world without it)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object (a world's data section), got {values!r}")
    config_class, fields = world_config_class(values, where)
    return config_from_dict(config_class, fields, where)


def _from_json(hint: Any, value: Any, where: str) -> Any:
    if hint == WorldData:
        return world_data_from_dict(value, where)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str):
            presets = PRESETS_BY_TYPE.get(hint, {})
            if value not in presets:
                raise ValueError(f"{where}: no {hint.__name__} preset named {value!r}; known: {sorted(presets)}")
            return presets[value]
        return config_from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], item, where) for item in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_from_json(arg, item, where) for arg, item in zip(args, value))
    # JSON's true/false are Python bools, which are also ints: refuse them where a number belongs.
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value
