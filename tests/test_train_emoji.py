"""The training stages take their world from the data section of their config (diffuse.train.worlds):
the shapes world by default, as every config written before worlds existed, or the emoji world,
here on a tiny catalogue drawn in a temporary folder (one short leg per stage, micro models)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from emoji_catalogues import write_catalogue
from PIL import Image
from test_train_trainers import LOOP, MICRO_IMAGE, MICRO_TEXT, MICRO_UNET, MICRO_VAE

from diffuse.emoji.catalogue import CATALOGUE_FILE, PICTURE_SIZE
from diffuse.emoji.data import EmojiDataConfig, EmojiDataset, HoldoutConfig
from diffuse.models.clip import CLIPTextEncoder
from diffuse.models.unet import UNet
from diffuse.models.vae import AutoencoderKL
from diffuse.shapes.data import DataConfig, ShapesDataset
from diffuse.tokenizer import CLIPTokenizer, normalize
from diffuse.train.__main__ import main_train
from diffuse.train.assemble import PREVIEW_DATA_SEED, preview_data
from diffuse.train.components import FINAL_INFO, FINAL_WEIGHTS, load_final
from diffuse.train.config_files import config_from_dict, read_config, world_data_from_dict
from diffuse.train.presets import EMOJI_IMAGE_ENCODER, EMOJI_TEXT, EMOJI_UNET, EMOJI_VAE
from diffuse.train.stages.clip import CLIPTrainConfig, train_clip
from diffuse.train.stages.clip import make_batch as clip_make_batch
from diffuse.train.stages.unet import UNetTrainConfig, train_unet
from diffuse.train.stages.vae import VAETrainConfig
from diffuse.train.state import (
    capture_rng_state,
    config_differences,
    latest_checkpoint,
    read_checkpoint,
    restore_rng_state,
)
from diffuse.train.worlds import config_fields, make_dataset, world_change, world_name

REPO = Path(__file__).resolve().parents[1]


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
    assert config_differences(before, config) == [] and world_change(before["fields"], config) is None
    assert config_differences({"class": "UNetTrainConfig", "fields": config_fields(config)}, config) == []


@pytest.mark.parametrize(
    "data, message",
    [
        ({"world": "lego"}, r"data: world 'lego' is not one of \['emoji', 'shapes'\]"),
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


# ---------------------------------------------------------------- the emoji world

# name -> (category, colour): a disc of that colour on a transparent picture.
FAKE = {
    "dog face": ("Animals & Nature", (200, 120, 40)),
    "cat": ("Animals & Nature", (240, 200, 60)),
    "red apple": ("Food & Drink", (220, 30, 30)),
    "pizza": ("Food & Drink", (250, 170, 60)),
    "rocket": ("Travel & Places", (90, 90, 160)),
    "police car": ("Travel & Places", (30, 60, 220)),
    "top hat": ("Objects", (10, 10, 10)),
    "key": ("Objects", (230, 190, 20)),
    "côte d’ivoire flag": ("Flags", (250, 130, 0)),
}


def make_catalogue(folder: Path) -> Path:
    """A data folder of discs, each of its own size and colour."""
    pictures = {}
    for i, (name, (category, colour)) in enumerate(FAKE.items()):
        pixels = np.zeros((PICTURE_SIZE, PICTURE_SIZE, 4), dtype=np.uint8)
        y, x = np.mgrid[:PICTURE_SIZE, :PICTURE_SIZE]
        inside = (x - 31.5) ** 2 + (y - 31.5) ** 2 < (28 - 2 * i) ** 2  # each a disc of its own size
        pixels[inside] = (*colour, 255)
        pictures[name] = (category, Image.fromarray(pixels, "RGBA"))
    return write_catalogue(folder, pictures)


def emoji_data(folder: Path, **changes) -> EmojiDataConfig:
    holdout = HoldoutConfig(picture_positions=1, pairs=1)
    return EmojiDataConfig(**{"folder": str(folder), "seed": 3, "image_size": 32, "holdout": holdout, **changes})


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text(encoding="utf-8").splitlines()]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Finished VAE and CLIP stages on the emoji world (3 steps each), the VAE's through main_train
    and a config file whose data section names the world."""
    threads, rng = torch.get_num_threads(), capture_rng_state()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("emoji_stages")
    folder = make_catalogue(root / "emoji")
    data = emoji_data(folder)
    vae_config = VAETrainConfig(vae=MICRO_VAE, data=data, scaling_samples=8, steps=3, **LOOP)
    (root / "vae.json").write_text(json.dumps(config_fields(vae_config)))
    assert main_train(["vae", "--config", str(root / "vae.json"), "--out", str(root / "vae"), "--no-progress"]) == 0
    clip_config = CLIPTrainConfig(
        text_encoder=MICRO_TEXT, image_encoder=MICRO_IMAGE, data=data, hard_negatives=True, steps=3, **LOOP
    )
    clip_losses = train_clip(clip_config, root / "clip", progress=False)
    yield {"root": root, "folder": folder, "data": data, "vae_config": vae_config, "clip_losses": clip_losses}
    torch.set_num_threads(threads)
    restore_rng_state(rng)


def unet_config(stages, **changes) -> UNetTrainConfig:
    fields = {
        "unet": MICRO_UNET,
        "vae_dir": str(stages["root"] / "vae"),
        "text_encoder_dir": str(stages["root"] / "clip"),
        "data": stages["data"],
        "steps": 4,
        **LOOP,
    }
    return UNetTrainConfig(**{**fields, **changes})


def test_the_vae_stage_trains_on_the_emoji_world_and_records_it(stages):
    folder = stages["root"] / "vae"
    assert read_config(VAETrainConfig, stages["root"] / "vae.json") == stages["vae_config"]
    records = logged(folder)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    trained_with = json.loads((folder / FINAL_INFO).read_text())["trained_with"]
    assert trained_with["data"]["world"] == "emoji" and trained_with["data"]["folder"] == str(stages["folder"])
    _, config, extra = load_final(folder, "vae")
    assert config.scaling_factor != MICRO_VAE.scaling_factor and extra["image_size"] == 32
    # The catalogue the images were drawn from is an input: its content is in every checkpoint.
    inputs = read_checkpoint(latest_checkpoint(folder))["inputs"]
    catalogue = stages["folder"] / CATALOGUE_FILE
    assert inputs == {"data catalogue": {"path": str(catalogue), "sha256": file_digest(catalogue)}}


def test_the_clip_stage_ranks_relation_swapped_emoji_captions(stages):
    dataset = make_dataset(stages["data"])
    assert isinstance(dataset, EmojiDataset)
    tokenizer = CLIPTokenizer.from_bpe_gz()
    batch = clip_make_batch(dataset, tokenizer, 0, 16, hard_negatives=True)
    assert batch["ids"].shape == batch["negative_ids"].shape == (16, 77)
    # Two-picture samples bring their relation-reversed caption, one-picture samples none.
    for index, has in zip(range(16), batch["has_negative"].tolist()):
        swapped = dataset.swapped_caption(index)
        assert has == (swapped is not None)
        if has:
            assert swapped != dataset.describe(index)[1]
    assert any(batch["has_negative"].tolist()) and not all(batch["has_negative"].tolist())
    records = logged(stages["root"] / "clip")
    assert [r["loss"] for r in records] == stages["clip_losses"] and len(records) == 3
    assert all(math.isfinite(r["loss"]) for r in records)
    _, config, extra = load_final(stages["root"] / "clip", "text_encoder")
    assert config == MICRO_TEXT and extra["pad_token_id"] == 49407


def test_the_emoji_dataset_travels_to_data_workers(stages):
    """--data-workers hands each spawned worker the dataset by pickle: it must draw the same batches."""
    dataset = make_dataset(stages["data"])
    dataset.batch(0, 4)  # with pictures in its cache
    copy = pickle.loads(pickle.dumps(dataset))
    (images, captions, scenes), (images2, captions2, scenes2) = dataset.batch(4, 6), copy.batch(4, 6)
    assert torch.equal(images, images2) and captions == captions2 and scenes == scenes2


def test_the_unet_stage_on_the_emoji_world_resumes_bit_for_bit(stages, tmp_path):
    config = unet_config(stages)
    straight = train_unet(config, tmp_path / "straight", progress=False)
    first = train_unet(dataclasses.replace(config, steps=2), tmp_path / "resumed", progress=False)
    resumed = train_unet(config, tmp_path / "resumed", progress=False)
    assert len(straight) == 4 and all(math.isfinite(loss) for loss in straight)
    assert first == straight[:2] and resumed == straight
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight")
    assert file_digest(tmp_path / "resumed" / FINAL_WEIGHTS) == file_digest(tmp_path / "straight" / FINAL_WEIGHTS)
    _, _, extra = load_final(tmp_path / "straight", "unet")
    assert extra["sample_size"] == 8  # 32 px through the f = 4 autoencoder
    # The preview matrix is fitted on the world the UNet was trained on.
    preview = preview_data(tmp_path / "straight", stages["root"] / "vae", 32)
    assert preview == dataclasses.replace(stages["data"], seed=PREVIEW_DATA_SEED)


def test_a_resume_with_another_world_or_folder_is_refused(stages, tmp_path):
    out = tmp_path / "run"
    config = unet_config(stages, steps=2)
    first = train_unet(config, out, progress=False)
    longer = dataclasses.replace(config, steps=4)
    moved = tmp_path / "moved"
    shutil.copytree(stages["folder"], moved)
    before = f"the checkpoint's run drew the emoji world from {stages['folder']}"
    for data, now in (
        (DataConfig(seed=3, image_size=32), "the shapes world"),
        (emoji_data(moved), f"the emoji world from {moved}"),
    ):
        with pytest.raises(ValueError) as refused:
            train_unet(dataclasses.replace(longer, data=data), out, progress=False)
        assert str(refused.value) == (
            f"checkpoint {latest_checkpoint(out)}: refusing to resume: data: {before}, this run draws {now}; "
            "train it in another folder"
        )
    # The same folder with another catalogue in it: the recorded input's content differs.
    catalogue = stages["folder"] / CATALOGUE_FILE
    original = catalogue.read_bytes()
    records = json.loads(original)
    catalogue.write_text(json.dumps(records[::-1]), encoding="utf-8")
    try:
        with pytest.raises(ValueError, match=r"input data catalogue .* has other content") as refused:
            train_unet(longer, out, progress=False)
        assert "\n" not in str(refused.value)
    finally:
        catalogue.write_bytes(original)
    resumed = train_unet(longer, out, progress=False)  # the catalogue put back: it resumes
    assert len(resumed) == 4 and resumed[:2] == first


def test_every_caption_word_is_spelled_by_clips_vocabulary(stages):
    """The emoji recipes keep CLIP's byte-level BPE (49408 tokens): it spells any text, accents and
    punctuation included, so no name is out of vocabulary; captions stay inside the 77 positions."""
    tokenizer = CLIPTokenizer.from_bpe_gz()
    dataset = make_dataset(stages["data"])
    captions = [dataset.describe(index)[1] for index in range(300)] + list(FAKE)
    for text in captions:
        ids = tokenizer.encode(text)
        assert len(ids) <= 77
        spelled = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(spelled.split()) == "".join(normalize(text).lower().split())


# ---------------------------------------------------------------- the recipes


@pytest.mark.parametrize("folder", [REPO / "configs" / "emoji", REPO / "configs" / "emoji" / "gpu"])
def test_the_emoji_recipes_read_and_fit_the_limits(folder):
    configs = {
        name: read_config(cls, folder / f"train_{name}.json")
        for name, cls in (("vae", VAETrainConfig), ("clip", CLIPTrainConfig), ("unet", UNetTrainConfig))
    }
    for config in configs.values():
        assert world_name(config.data) == "emoji" and config.data.image_size == 64
        assert config_from_dict(type(config), json.loads(json.dumps(config_fields(config)))) == config
    assert dataclasses.replace(configs["vae"].vae, scaling_factor=EMOJI_VAE.scaling_factor) == EMOJI_VAE
    assert configs["clip"].text_encoder == EMOJI_TEXT and configs["clip"].image_encoder == EMOJI_IMAGE_ENCODER
    assert configs["unet"].unet == EMOJI_UNET and configs["clip"].hard_negatives
    assert configs["unet"].vae_dir.endswith("emoji-vae") and configs["unet"].text_encoder_dir.endswith("emoji-clip")
    # The data seeds differ by stage, as the shapes recipes' do, so no stage sees another's samples first.
    assert len({config.data.seed for config in configs.values()}) == 3
    # The shipped parts in fp16: at most 150 MB.
    parts = (UNet(EMOJI_UNET), AutoencoderKL(EMOJI_VAE), CLIPTextEncoder(EMOJI_TEXT))
    assert 2 * sum(p.numel() for part in parts for p in part.parameters()) <= 150e6
