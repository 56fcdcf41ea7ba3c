"""The emoji world's scenes, captions, dataset and evaluation, on a tiny fake catalogue drawn here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffuse.emoji.catalogue import CATALOGUE_FILE, PICTURE_SIZE
from diffuse.emoji.scenes import (
    BACKGROUNDS,
    MIN_VISIBLE,
    SIZES,
    Picture,
    PictureCache,
    Scene,
    backgrounds_for,
    box,
    cell_centre,
    render,
)

# name -> (category, colour): opaque squares, except "ghost" (white, half transparent).
FAKE = {
    "dog face": ("Animals & Nature", (200, 120, 40)),
    "dog": ("Animals & Nature", (150, 90, 30)),
    "cat": ("Animals & Nature", (240, 200, 60)),
    "red apple": ("Food & Drink", (220, 30, 30)),
    "green apple": ("Food & Drink", (60, 190, 60)),
    "pizza": ("Food & Drink", (250, 170, 60)),
    "rocket": ("Travel & Places", (90, 90, 160)),
    "police car": ("Travel & Places", (30, 60, 220)),
    "airplane": ("Travel & Places", (120, 140, 150)),
    "small airplane": ("Travel & Places", (160, 40, 160)),
    "top hat": ("Objects", (10, 10, 10)),
    "key": ("Objects", (230, 190, 20)),
    "ghost": ("Smileys & Emotion", (255, 255, 255)),
}


def make_catalogue(folder, fake=FAKE) -> None:
    """A data folder in the catalogue's layout: catalogue.json and one PNG per record."""
    (folder / "google").mkdir(parents=True)
    records = []
    for i, (name, (category, colour)) in enumerate(fake.items()):
        pixels = np.zeros((PICTURE_SIZE, PICTURE_SIZE, 4), dtype=np.uint8)
        pixels[..., :3] = colour
        pixels[..., 3] = 128 if name == "ghost" else 255
        image = f"google/{i:04x}.png"
        Image.fromarray(pixels, "RGBA").save(folder / image)
        records.append(
            {
                "name": name,
                "short_names": [name.replace(" ", "_")],
                "category": category,
                "subcategory": "test",
                "unified": f"{i:04X}",
                "image": image,
            }
        )
    (folder / CATALOGUE_FILE).write_text(json.dumps(records), encoding="utf-8")


@pytest.fixture
def folder(tmp_path):
    make_catalogue(tmp_path / "emoji")
    return tmp_path / "emoji"


@pytest.fixture
def cache(folder):
    return PictureCache(folder)


# ---- scenes ----------------------------------------------------------------------------------------


def covered(image: Image.Image, background: str) -> np.ndarray:
    """Pixels that differ from a plain background: where a picture was drawn."""
    pixels = np.asarray(image, dtype=np.int32)
    return np.abs(pixels - np.array(BACKGROUNDS[background][0])).sum(axis=2) > 30


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("picture_size", list(SIZES))
@pytest.mark.parametrize("position", ["top left", "center", "bottom right", "top"])
def test_render_places_a_picture_in_its_cell_at_its_size(cache, size, picture_size, position):
    scene = Scene((Picture("red apple", picture_size, position, cell_centre(position)),), "white")
    mask = covered(render(scene, size, cache), "white")
    ys, xs = np.nonzero(mask)
    side = round(SIZES[picture_size] * size)
    assert mask.sum() == side * side  # an opaque square picture covers exactly its box
    assert xs.max() - xs.min() + 1 == side and ys.max() - ys.min() + 1 == side
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    assert abs(cx - cell_centre(position)[0]) <= 1 / size and abs(cy - cell_centre(position)[1]) <= 1 / size


def test_render_composites_by_alpha_and_draws_gradients(cache):
    scene = Scene((Picture("ghost", "large", "center", (0.5, 0.5)),), "black")
    pixels = np.asarray(render(scene, 64, cache), dtype=np.int32)
    assert abs(pixels[32, 32] - np.array([137, 137, 137])).max() <= 2  # half white over (20, 20, 20)
    gradient = np.asarray(render(Scene((Picture("key", "small", "top", (0.5, 0.2)),), "blue gradient"), 64, cache))
    top, bottom = BACKGROUNDS["blue gradient"]
    assert tuple(gradient[0, 0]) == top and tuple(gradient[-1, 0]) == bottom


def test_render_reads_a_folder_and_refuses_incomplete_scenes(folder, cache):
    scene = Scene((Picture("cat", "small", "left", (0.2, 0.5)),), "gray")
    assert np.array_equal(np.asarray(render(scene, 32, folder)), np.asarray(render(scene, 32, cache)))
    with pytest.raises(ValueError, match="needs a centre"):
        render(Scene((Picture("cat", "small"),), "gray"), 32, cache)
    with pytest.raises(ValueError, match="without a background"):
        render(Scene((Picture("cat", "small", "left", (0.2, 0.5)),), None), 32, cache)
    with pytest.raises(ValueError, match="no emoji named 'wolf'"):
        render(Scene((Picture("wolf", "small", "left", (0.2, 0.5)),), "gray"), 32, cache)


def test_scene_checks_its_names():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        Picture("cat", "huge")
    with pytest.raises(ValueError, match="unknown position"):
        Picture("cat", position="middle left")
    with pytest.raises(ValueError, match="unknown background"):
        Scene((Picture("cat"),), "plaid")
    with pytest.raises(ValueError, match="one or two"):
        Scene((), "white")
    with pytest.raises(ValueError, match="must relate"):
        Scene((Picture("cat"),), "white", (0, "left of", 1))


def test_backgrounds_contrast_with_their_pictures(cache):
    assert "white" not in backgrounds_for(cache, ["ghost"]) and "black" in backgrounds_for(cache, ["ghost"])
    assert "black" not in backgrounds_for(cache, ["top hat"])
    both = backgrounds_for(cache, ["ghost", "top hat"])
    assert "white" not in both and "black" not in both and both
    assert all(cache.visibility("red apple")[bg] >= MIN_VISIBLE for bg in backgrounds_for(cache, ["red apple"]))


def test_picture_cache_travels_without_its_pictures(cache):
    import pickle

    cache.rgba("cat")
    copy = pickle.loads(pickle.dumps(cache))
    assert not copy._decoded and copy.emoji == cache.emoji
    assert box((0.5, 0.5), "large", 64) == (21, 21, 23)
    assert np.array_equal(np.asarray(copy.resized("cat", 15)), np.asarray(cache.resized("cat", 15)))
