"""The worlds a stage can train on, chosen by the data section of its config.

    "data": {"seed": 0, "image_size": 64}                      the shapes world (diffuse.shapes): the
                                                               default, so a section without "world" is it
    "data": {"world": "emoji", "folder": DIR, "seed": 0, ...}  the emoji world (diffuse.emoji), drawn from
                                                               a data folder `diffuse data emoji` wrote

Each world is a data config class and a dataset built from it, with the same methods: describe(i),
swapped_caption(i), sample(i), batch(start, n) and config.image_size. The stages use only those,
through make_dataset, so a stage never names a world.

The data config classes do not carry their world's name; config_fields writes it into the data
section of every record of a training config (checkpoints, final.json), so a record read back
builds the same world. A run resumed with another world or another folder of pictures is refused
in one line (world_change), and one whose folder holds another catalogue by its recorded
content (data_inputs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from diffuse.emoji.catalogue import CATALOGUE_FILE, SOURCES_FILE
from diffuse.emoji.data import EmojiDataConfig, EmojiDataset
from diffuse.shapes.data import DataConfig, ShapesDataset

DEFAULT_WORLD = "shapes"

# world name -> (its data config class, the dataset that config builds)
WORLDS: dict[str, tuple[type, type]] = {
    "shapes": (DataConfig, ShapesDataset),
    "emoji": (EmojiDataConfig, EmojiDataset),
}

WorldData = DataConfig | EmojiDataConfig  # the type of a stage config's `data` field: any world's data config
Dataset = ShapesDataset | EmojiDataset
DEFAULT_DATA = DataConfig()


def world_name(data: Any) -> str:
    """The name of the world whose data config `data` is."""
    for name, (config_class, _) in WORLDS.items():
        if type(data) is config_class:
            return name
    raise ValueError(f"{type(data).__name__} is no world's data config; the worlds are {sorted(WORLDS)}")


def is_world_data(value: Any) -> bool:
    return any(type(value) is config_class for config_class, _ in WORLDS.values())


def world_config_class(values: dict, where: str) -> tuple[type, dict]:
    """The data config class a data section names (by "world", default shapes), and its other keys."""
    name = values.get("world", DEFAULT_WORLD)
    if name not in WORLDS:
        raise ValueError(f"{where}: world {name!r} is not one of {sorted(WORLDS)}")
    return WORLDS[name][0], {key: value for key, value in values.items() if key != "world"}


def make_dataset(data: WorldData) -> Dataset:
    """The endless captioned dataset of `data`'s world."""
    return WORLDS[world_name(data)][1](data)


def data_inputs(data: WorldData) -> dict[str, Path]:
    """The files a world's dataset reads (loop.train's `inputs`): a run resumed after they changed
    would draw other images for the same sample indices, so their content is recorded. The shapes
    world is drawn by code alone; the emoji world from its folder's catalogue, whose pictures
    SOURCES.json pins by hash where the data step wrote one."""
    if not isinstance(data, EmojiDataConfig):
        return {}
    folder = Path(data.folder)
    inputs = {"data catalogue": folder / CATALOGUE_FILE}
    if (folder / SOURCES_FILE).is_file():
        inputs["data sources"] = folder / SOURCES_FILE
    return inputs


def world_change(saved_fields: dict, config: Any) -> str | None:
    """What changed in the world a run draws from, against a checkpoint's recorded config fields:
    its world, or its folder of pictures (None when neither did). A record from before worlds were
    named drew the shapes world."""
    for field in dataclasses.fields(config):
        data, saved = getattr(config, field.name), saved_fields.get(field.name)
        if not is_world_data(data) or not isinstance(saved, dict):
            continue
        before, now = (
            _world_and_folder(saved.get("world", DEFAULT_WORLD), saved),
            _world_and_folder(world_name(data), dataclasses.asdict(data)),
        )
        if before != now:
            return f"{field.name}: the checkpoint's run drew {before}, this run draws {now}"
    return None


def _world_and_folder(world: str, fields: dict) -> str:
    folder = fields.get("folder")
    return f"the {world} world" + (f" from {folder}" if folder is not None else "")


def config_fields(config: Any) -> dict:
    """dataclasses.asdict(config), with each world data section naming its world ("world": "shapes")."""
    fields = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if is_world_data(value):
            fields[field.name] = {"world": world_name(value), **fields[field.name]}
    return fields
