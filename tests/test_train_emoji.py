"""The training stages take their world from the data section of their config (diffuse.train.worlds):
the shapes world by default, as every config written before worlds existed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.train.config_files import config_from_dict, read_config, world_data_from_dict
from diffuse.train.stages.clip import CLIPTrainConfig
from diffuse.train.stages.unet import UNetTrainConfig
from diffuse.train.stages.vae import VAETrainConfig
from diffuse.train.state import config_differences
from diffuse.train.worlds import config_fields, make_dataset, world_name


def test_a_data_section_without_a_world_is_the_shapes_world(tmp_path):
    for cls in (VAETrainConfig, CLIPTrainConfig, UNetTrainConfig):
        assert cls().data == DataConfig() and world_name(cls().data) == "shapes"
    plain = config_from_dict(VAETrainConfig, {"data": {"seed": 4, "image_size": 32}})
    named = config_from_dict(VAETrainConfig, {"data": {"world": "shapes", "seed": 4, "image_size": 32}})
    assert plain == named and named.data == DataConfig(seed=4, image_size=32)
    assert isinstance(make_dataset(named.data), ShapesDataset)
    # Records name the world, and read back to the same config.
    fields = json.loads(json.dumps(config_fields(named)))
    assert fields["data"]["world"] == "shapes" and fields["data"]["seed"] == 4
    assert config_from_dict(VAETrainConfig, fields) == named
    assert world_data_from_dict(fields["data"]) == named.data


def test_a_checkpoint_from_before_worlds_is_the_same_config():
    config = UNetTrainConfig(data=DataConfig(seed=2, image_size=32))
    before = {"class": "UNetTrainConfig", "fields": dataclasses.asdict(config)}  # no "world" in its data
    assert config_differences(before, config) == []
    assert config_differences({"class": "UNetTrainConfig", "fields": config_fields(config)}, config) == []


@pytest.mark.parametrize(
    "data, message",
    [
        ({"world": "lego"}, r"data: world 'lego' is not one of \['shapes'"),
        ("shapes", r"data: expected a JSON object \(a world's data section\)"),
        ({"world": "shapes", "folder": "x"}, r"data: unknown key\(s\) \['folder'\] for DataConfig"),
    ],
)
def test_a_bad_data_section_is_refused_in_one_line(tmp_path, data, message):
    path = tmp_path / "vae.json"
    path.write_text(json.dumps({"data": data}))
    with pytest.raises(ValueError, match=message) as refused:
        read_config(VAETrainConfig, path)
    assert "\n" not in str(refused.value)
