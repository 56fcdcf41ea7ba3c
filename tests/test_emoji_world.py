"""The emoji world's scenes, captions, dataset and evaluation, on a tiny fake catalogue drawn here."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from emoji_catalogues import write_catalogue
from PIL import Image

from diffuse.emoji.captions import caption, parse_caption
from diffuse.emoji.catalogue import EVALUATED_CATEGORIES, PICTURE_SIZE
from diffuse.emoji.data import (
    BORDER_MARGIN,
    MIN_GAP,
    RELATIONS,
    EmojiDataConfig,
    EmojiDataset,
    HoldoutConfig,
    heldout_pair_scenes,
    heldout_single_scenes,
)
from diffuse.emoji.evaluate import (
    EvalSettings,
    HeldoutPrompt,
    Reading,
    as_reading,
    evaluate,
    evaluate_adherence,
    format_rates,
    format_report,
    heldout_prompts,
    relation_holds,
    renders,
    score,
    score_pair,
    write_report,
)
from diffuse.emoji.grid import example_grid, outcome
from diffuse.emoji.scenes import (
    BACKGROUNDS,
    INVERSE_RELATION,
    MIN_VISIBLE,
    SIZES,
    Picture,
    PictureCache,
    Scene,
    backgrounds_for,
    box,
    cell_centre,
    cell_of,
    relation_between,
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
    """A data folder of flat squares, one per record."""
    pictures = {}
    for name, (category, colour) in fake.items():
        pixels = np.zeros((PICTURE_SIZE, PICTURE_SIZE, 4), dtype=np.uint8)
        pixels[..., :3] = colour
        pixels[..., 3] = 128 if name == "ghost" else 255
        pictures[name] = (category, Image.fromarray(pixels, "RGBA"))
    write_catalogue(folder, pictures)


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
    with pytest.raises(ValueError, match="image size must be an integer from 8 to 512"):
        render(Scene((Picture("cat", "small", "left", (0.2, 0.5)),), "gray"), 100_000, cache)
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


# ---- captions --------------------------------------------------------------------------------------


def agrees(parsed: Scene, scene: Scene) -> bool:
    """Whether everything a parsed caption states holds in the scene it was made from."""
    by_name = {o.name: o for o in scene.objects}
    if sorted(o.name for o in parsed.objects) != sorted(by_name):
        return False
    for said in parsed.objects:
        shown = by_name[said.name]
        if (said.size or shown.size) != shown.size or (said.position or shown.position) != shown.position:
            return False
    if parsed.background not in (None, scene.background):
        return False
    if parsed.relation is None:
        return len(scene.objects) == 1
    a, rel, b = parsed.relation
    return relation_between(by_name[parsed.objects[a].name].centre, by_name[parsed.objects[b].name].centre) == rel


def test_captions_parse_back_to_their_scenes(folder):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder), two_object_fraction=0.5))
    stated = Counter()
    for i in range(1500):
        scene, text = dataset.describe(i)
        parsed = parse_caption(text, dataset.all_names)
        assert agrees(parsed, scene), (text, scene, parsed)
        stated.update(
            ["position"] * any(o.position for o in parsed.objects)
            + ["size"] * any(o.size for o in parsed.objects)
            + ["background"] * (parsed.background is not None)
            + [o.name for o in parsed.objects]
        )
        swapped = dataset.swapped_caption(i)
        if swapped is not None:
            reversed_ = parse_caption(swapped, dataset.all_names)
            assert [o.name for o in reversed_.objects] == [o.name for o in parsed.objects]
            assert reversed_.relation[1] == INVERSE_RELATION[parsed.relation[1]]
    # Every optional part is said sometimes and left out sometimes; a small airplane is told from an airplane.
    assert 300 < stated["position"] < 1000 and 300 < stated["size"] < 1200 and 400 < stated["background"] < 1100
    assert stated["airplane"] > 50 and stated["small airplane"] > 50


def test_parse_caption_reads_longest_names_and_hand_written_prompts():
    names = ["dog", "dog face", "airplane", "small airplane", "airplane departure", "top hat", "red apple"]
    scene = parse_caption("A Small  dog face in the top-left corner, grey background", names)
    assert scene.objects == (Picture("dog face", "small", "top left"),) and scene.background == "gray"
    assert parse_caption("a small airplane", names).objects == (Picture("small airplane"),)
    assert parse_caption("a large small airplane", names).objects == (Picture("small airplane", "large"),)
    assert parse_caption("a small airplane departure", names).objects == (Picture("airplane departure", "small"),)
    hat = parse_caption("a top hat at the top on a light blue background", names)
    assert hat.objects == (Picture("top hat", None, "top"),) and hat.background == "light blue"
    pair = parse_caption("a dog to the left of a dog face", names)
    assert [o.name for o in pair.objects] == ["dog", "dog face"] and pair.relation == (0, "left of", 1)
    assert parse_caption("a red apple beneath a top hat", names).relation == (0, "below", 1)
    assert parse_caption("a dog in the middle", names).objects[0].position == "center"
    with pytest.raises(ValueError, match="one or two picture names"):
        parse_caption("a wolf at the top", names)
    with pytest.raises(ValueError, match="found 3"):
        parse_caption("a dog, a red apple and a top hat", names)
    with pytest.raises(ValueError, match="no relation"):
        parse_caption("a dog and a red apple", names)


def test_caption_states_the_position_when_asked():
    scene = Scene((Picture("cat", "small", "bottom", (0.5, 0.8)),), "beige")
    for seed in range(40):
        text = caption(scene, random.Random(seed), state_position=True)
        assert parse_caption(text, ["cat"]).objects[0].position == "bottom", text


# ---- the dataset -----------------------------------------------------------------------------------


def test_samples_are_a_function_of_seed_and_index(folder):
    config = EmojiDataConfig(folder=folder, seed=3, image_size=32)
    assert config.folder == str(folder)
    first, second = EmojiDataset(config), EmojiDataset(config)
    images, captions, scenes = first.batch(40, 6)
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    again = [second.sample(i) for i in (45, 40)]  # any order, another dataset object
    assert torch.equal(again[1][0], images[0]) and again[0][1:] == (captions[5], scenes[5])
    other = EmojiDataset(EmojiDataConfig(folder=str(folder), seed=4, image_size=32))
    assert [other.describe(i) for i in range(20)] != [first.describe(i) for i in range(20)]
    with pytest.raises(ValueError, match="non-negative"):
        first.describe(-1)
    with pytest.raises(ValueError, match="batch_size"):
        first.batch(0, 0)


def test_the_holdout_is_never_in_training_and_its_pictures_still_are(folder):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder), holdout=HoldoutConfig(picture_positions=2, pairs=1)))
    holdout = dataset.holdout
    assert len(holdout.picture_positions) == 8 and len(holdout.pairs) == 4  # per evaluated category
    assert all(dataset.category(name) in EVALUATED_CATEGORIES for pair in holdout.pairs for name in pair)
    seen_pictures, seen_pairs = Counter(), Counter()
    for i in range(3000):
        scene, _ = dataset.describe(i)
        assert not holdout.contains(scene), scene
        seen_pictures.update(o.name for o in scene.objects)
        seen_pairs.update([frozenset(o.name for o in scene.objects)] if len(scene.objects) == 2 else [])
    held = {name for name, _ in holdout.picture_positions} | {name for pair in holdout.pairs for name in pair}
    assert all(seen_pictures[name] > 20 for name in held)
    singles = heldout_single_scenes(dataset, 20, category="Food & Drink")
    assert all(holdout.contains(s) and dataset.category(s.objects[0].name) == "Food & Drink" for s in singles)
    food = [c for c in holdout.picture_positions if dataset.category(c[0]) == "Food & Drink"]
    assert [(s.objects[0].name, s.objects[0].position) for s in singles[:4]] == food * 2  # cycling through them
    pairs = heldout_pair_scenes(dataset, 40)
    assert [frozenset(o.name for o in s.objects) for s in pairs[:4]] == [frozenset(p) for p in holdout.pairs]
    for scene in pairs:
        assert holdout.pair_held_out(scene.objects[0].name, scene.objects[1].name)
        assert not any(holdout.picture_held_out(o.name, o.position) for o in scene.objects)
    assert {s.relation[1] for s in pairs} == set(RELATIONS)


def test_the_holdout_is_drawn_from_the_catalogue_alone(folder, tmp_path):
    config = EmojiDataConfig(folder=str(folder))
    assert EmojiDataset(config).holdout == EmojiDataset(config).holdout
    reseeded = EmojiDataset(dataclasses.replace(config, holdout=HoldoutConfig(seed=1))).holdout
    assert reseeded != EmojiDataset(config).holdout
    # A category's draw does not move when another category changes.
    fewer = dict(FAKE)
    del fewer["pizza"]
    make_catalogue(tmp_path / "fewer", fewer)
    smaller = EmojiDataset(EmojiDataConfig(folder=str(tmp_path / "fewer"))).holdout
    animals = {"dog face", "dog", "cat"}
    assert [c for c in smaller.picture_positions if c[0] in animals] == [
        c for c in EmojiDataset(config).holdout.picture_positions if c[0] in animals
    ]
    no_evaluated = EmojiDataset(EmojiDataConfig(folder=str(folder), categories=["Smileys & Emotion", "Objects"]))
    assert {dataset_name for pair in no_evaluated.holdout.pairs for dataset_name in pair} <= {"top hat", "key"}
    with pytest.raises(ValueError, match="no pairings in 'Food & Drink'"):
        heldout_pair_scenes(no_evaluated, 2, category="Food & Drink")


def test_pair_scenes_keep_their_relation_apart_and_inside_the_image(folder):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder), two_object_fraction=1.0, position_jitter=0.05))
    for i in range(400):
        scene, _ = dataset.describe(i)
        a, rel, b = scene.relation
        first, second = scene.objects[a], scene.objects[b]
        assert relation_between(first.centre, second.centre) == rel
        assert cell_of(*first.centre) == first.position and cell_of(*second.centre) == second.position
        boxes = [(o.centre, SIZES[o.size] / 2) for o in scene.objects]
        (ax, ay), ha = boxes[0]
        (bx, by), hb = boxes[1]
        assert max(abs(ax - bx), abs(ay - by)) - ha - hb >= MIN_GAP - 1e-9  # apart along the relation's axis
        for (x, y), half in boxes:
            assert BORDER_MARGIN - 1e-9 <= min(x, y) - half and max(x, y) + half <= 1 - BORDER_MARGIN + 1e-9
        assert all(cache_visible(dataset, o.name, scene.background) for o in scene.objects)


def cache_visible(dataset, name, background) -> bool:
    return background in backgrounds_for(dataset.pictures, [name])


def test_names_a_caption_cannot_tell_apart_are_left_out(tmp_path):
    make_catalogue(tmp_path / "odd", {**FAKE, "top": ("Objects", (0, 200, 200)), "light blue": ("Objects", (9, 9, 9))})
    dataset = EmojiDataset(EmojiDataConfig(folder=str(tmp_path / "odd")))
    assert "top" not in dataset.names and "light blue" not in dataset.names and "top hat" in dataset.names


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 8}, "image_size must be an integer from 16"),
        ({"image_size": 4096}, "image_size must be an integer from 16"),
        ({"two_object_fraction": 1.5}, "two_object_fraction"),
        ({"position_jitter": 0.2}, "position_jitter"),
        ({"seed": -1}, "seed"),
        ({"folder": 3}, "folder must be a path"),
        ({"categories": "Objects"}, "categories must be a list"),
        ({"categories": ("Objects", "Objects")}, "names one twice"),
        ({"holdout": {"pairs": -1}}, "holdout pairs"),
    ],
)
def test_bad_data_configs_are_refused_in_one_line(fields, message):
    if isinstance(fields.get("holdout"), dict):
        with pytest.raises(ValueError, match=message):
            HoldoutConfig(**fields["holdout"])
        return
    with pytest.raises(ValueError, match=message):
        EmojiDataConfig(**{"folder": "x", **fields})


def test_bad_selections_are_refused_when_the_dataset_is_made(folder, tmp_path):
    with pytest.raises(ValueError, match="unknown category 'Pets'"):
        EmojiDataset(EmojiDataConfig(folder=str(folder), categories=("Pets",)))
    with pytest.raises(ValueError, match="need two pictures"):
        EmojiDataset(EmojiDataConfig(folder=str(folder), categories=("Smileys & Emotion",)))
    assert EmojiDataset(EmojiDataConfig(folder=str(folder), categories=("Smileys & Emotion",), two_object_fraction=0))
    with pytest.raises(ValueError, match="names no folder"):
        EmojiDataset(EmojiDataConfig())
    with pytest.raises(ValueError, match="no emoji catalogue here"):
        EmojiDataset(EmojiDataConfig(folder=str(tmp_path)))
    make_catalogue(tmp_path / "two", {"dog": FAKE["dog"], "cat": FAKE["cat"]})
    with pytest.raises(ValueError, match="every pairing of the 2 pictures is held out"):
        EmojiDataset(EmojiDataConfig(folder=str(tmp_path / "two")))


# ---- the evaluation --------------------------------------------------------------------------------


class ColourJudge:
    """Reads the fake catalogue's opaque squares back by their exact colours: a judge that is right
    about every clean render, to check the evaluation's plumbing end to end."""

    def __init__(self, names) -> None:
        self.colours = {name: np.array(FAKE[name][1]) for name in names if name != "ghost"}

    def read(self, image):
        pixels = np.asarray(image, dtype=np.int32)
        side = pixels.shape[0]
        found = []
        for name, colour in self.colours.items():
            ys, xs = np.nonzero(np.abs(pixels - colour).max(axis=2) <= 3)
            if len(xs) >= 16:
                width = np.sqrt(len(xs)) / side
                size = min(SIZES, key=lambda s: abs(SIZES[s] - width))
                found.append((len(xs), (name, cell_of((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side), size)))
        return [reading for _, reading in sorted(found, reverse=True)]


def test_heldout_prompts_ask_for_held_out_scenes_by_category(folder):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder), holdout=HoldoutConfig(picture_positions=2, pairs=1)))
    prompts = heldout_prompts(dataset, singles=3, pairs=2)
    assert [(p.category, p.kind) for p in prompts[:5]] == [("Animals & Nature", "singles")] * 3 + [
        ("Animals & Nature", "pairs")
    ] * 2
    assert Counter(p.category for p in prompts) == {c: 5 for c in EVALUATED_CATEGORIES}
    for p in prompts:
        assert dataset.holdout.contains(p.scene) and agrees(p.stated, p.scene)
        assert dataset.category(p.scene.objects[0].name) == p.category
        if p.kind == "singles":
            assert p.stated.objects[0].position == p.scene.objects[0].position  # always stated
    assert heldout_prompts(dataset, 3, 2) == prompts
    assert [p.prompt for p in heldout_prompts(dataset, 3, 2, scene_seed=1)] != [p.prompt for p in prompts]
    with pytest.raises(ValueError, match="singles must be a non-negative integer"):
        heldout_prompts(dataset, singles=-1)


def test_clean_renders_score_perfectly_through_the_whole_evaluation(folder, tmp_path):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder)))
    prompts = heldout_prompts(dataset, singles=6, pairs=6)
    seeds = []
    draw = renders(dataset, prompts)

    def generate(prompt, seed):
        seeds.append(seed)
        return draw(prompt, seed)

    results = evaluate_adherence(generate, ColourJudge(dataset.names), prompts, seed=7)
    assert seeds == list(range(7, 7 + len(prompts)))
    rates = results["rates"]
    assert list(rates) == [*EVALUATED_CATEGORIES, "all"]
    for group in rates.values():
        assert group["singles"]["named"] == group["singles"]["position"] == group["singles"]["all"] == 1.0
        assert group["pairs"]["found"] == group["pairs"]["relation"] == 1.0
    assert rates["all"]["singles"]["prompts"] == 24 and rates["all"]["pairs"]["prompts"] == 24
    assert results["readings"][0]["read"][0][0] == prompts[0].scene.objects[0].name
    table = format_rates(rates, "held-out prompts")
    assert "Travel & Places" in table and ">= 0.85" in table and "relation" in table
    path = write_report(results, tmp_path / "eval.json")
    assert json.loads(path.read_text())["rates"]["all"]["pairs"]["relation"] == 1.0


def test_the_rates_count_what_the_judge_read():
    single = Scene((Picture("cat", None, "top"),), None)
    sized = Scene((Picture("dog", "small", "left"),), None)
    pair = Scene((Picture("cat"), Picture("dog")), None, (0, "above", 1))
    prompts = [
        HeldoutPrompt("Animals & Nature", "singles", "p0", single, single),
        HeldoutPrompt("Animals & Nature", "singles", "p1", sized, sized),
        HeldoutPrompt("Objects", "singles", "p2", single, single),
        HeldoutPrompt("Objects", "singles", "p3", sized, sized),
        HeldoutPrompt("Objects", "pairs", "p4", pair, pair),
        HeldoutPrompt("Objects", "pairs", "p5", pair, pair),
        HeldoutPrompt("Objects", "pairs", "p6", pair, pair),
    ]
    readings = [
        [("cat", "top", "large")],  # all right (no size asked)
        [("dog", "left", "large"), ("cat", "top", "small")],  # named and placed, wrong size
        [("dog", "top", "small"), ("cat", "top", "small")],  # top-1 is another picture: placed only
        [],  # nothing found
        [("dog", "bottom right", "small"), ("cat", "top left", "large")],  # cat above dog, diagonally
        [("cat", "center", "small"), ("dog", "top", "large")],  # both found, cat below dog
        [("cat", "top", "small"), ("key", "bottom", "large")],  # dog missing
    ]
    rates = score(prompts, readings)
    animals, objects, everything = rates["Animals & Nature"], rates["Objects"], rates["all"]
    assert animals == {"singles": {"prompts": 2, "named": 1.0, "position": 1.0, "size": 0.0, "all": 0.5}}
    assert objects["singles"] == {"prompts": 2, "named": 0.0, "position": 0.5, "size": 0.0, "all": 0.0}
    assert objects["pairs"] == {"prompts": 3, "found": 2 / 3, "relation": 1 / 3}
    assert everything["singles"] == {"prompts": 4, "named": 0.5, "position": 0.75, "size": 0.0, "all": 0.25}
    assert "-" in format_rates(rates, "rates")  # Animals & Nature has no two-picture prompts
    with pytest.raises(ValueError, match="7 prompts but 6 readings"):
        score(prompts, readings[:6])


def test_relations_between_cells():
    assert relation_holds("left of", "left", "right") and not relation_holds("right of", "left", "right")
    assert relation_holds("above", "top left", "bottom right") and relation_holds("left of", "top left", "bottom right")
    assert not relation_holds("above", "top left", "right") and not relation_holds("below", "center", "center")
    judged = SimpleNamespace(name="cat", probability=0.9, position="top", size="small", centre=[0.5, 0.2], extent=0.2)
    assert (
        as_reading(judged)
        == as_reading(("cat", "top", "small", (0.5, 0.2)))
        == Reading("cat", "top", "small", (0.5, 0.2))
    )


def test_relations_by_measured_centres_where_the_judge_gives_them():
    pair = Scene((Picture("cat"), Picture("dog")), None, (0, "left of", 1))
    # Both in the centre cell, side by side: by cells no relation, by centres the cat is left of the dog.
    side_by_side = [("dog", "center", "small", (0.6, 0.5)), ("cat", "center", "small", (0.4, 0.52))]
    assert score_pair(pair, side_by_side) == {"found": True, "relation": True}
    assert score_pair(pair, [r[:3] for r in side_by_side]) == {"found": True, "relation": False}
    # Farther apart vertically than across: by centres it is "above", not "left of".
    steep = [("cat", "top left", "small", (0.3, 0.2)), ("dog", "bottom", "small", (0.4, 0.8))]
    assert score_pair(pair, steep)["relation"] is False


def test_the_picture_cache_keeps_a_bounded_number_of_bytes():
    from diffuse.emoji.scenes import _Kept

    kept = _Kept(limit=3 * 8 * 8 * 4)
    for i in range(5):
        kept.get_or_make(i, lambda: Image.new("RGBA", (8, 8)))
        kept.get_or_make(0, lambda: pytest.fail("picture 0 was made twice"))  # used most recently: kept
    assert list(kept) == [3, 4, 0] and kept.held == 3 * 8 * 8 * 4


class FakePipeline:
    """What evaluate() uses of a Pipeline; it draws the held-out scene a prompt was written from,
    except for the prompts in `wrong`, which get an empty background."""

    def __init__(self, dataset, prompts, wrong=()) -> None:
        self.scenes, self.wrong, self.dataset = {p.prompt: p.scene for p in prompts}, set(wrong), dataset
        self.config = SimpleNamespace(image_size=48, vae=SimpleNamespace(scaling_factor=0.5))
        self.model_name, self.model_hash, self.dtype = "fake", "0123456789", torch.float32
        self.calls = []

    def encode_posterior(self, pixels):
        """Latents are the pixels: only a scale applied and not undone (or the reverse) changes them."""
        return SimpleNamespace(mean=pixels)

    def decode_latents(self, latents):
        return latents / self.config.vae.scaling_factor

    def get_sampler(self, name):
        if name != "Euler a":
            raise ValueError(f"unknown sampler {name!r}")

    def txt2img(self, prompt, width, height, steps, guidance_scale, sampler, seed, speedups=None):
        self.calls.append((prompt, width, height, steps, guidance_scale, seed))
        scene = self.scenes[prompt]
        if prompt in self.wrong:
            return SimpleNamespace(images=[Image.new("RGB", (width, height), BACKGROUNDS["white"][0])])
        return SimpleNamespace(images=[render(scene, width, self.dataset.pictures)])


def test_evaluate_a_model_against_its_clean_renders(folder):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder)))
    settings = EvalSettings(singles=2, pairs=2, steps=3, seed=5)
    prompts = heldout_prompts(dataset, 2, 2)
    wrong = [p.prompt for p in prompts if p.category == "Objects" and p.kind == "singles"][:1]
    pipe = FakePipeline(dataset, prompts, wrong)
    results = evaluate(pipe, dataset, ColourJudge(dataset.names), settings)
    drawn, timed = pipe.calls[: len(prompts)], pipe.calls[len(prompts) :]
    assert [call[-1] for call in drawn] == list(range(5, 5 + len(prompts)))
    assert all(call[1:5] == (48, 48, 3, 7.5) for call in drawn)
    assert [call[1] for call in timed] == [48] * 4 + [96] * 4  # a warm-up and three timed runs per size
    assert [t["size"] for t in results["generation_time"]] == [48, 96]
    assert results["prompt_adherence"]["Objects"]["singles"]["named"] == 0.5
    assert results["prompt_adherence"]["Food & Drink"]["pairs"]["relation"] == 1.0
    assert results["clean_renders"]["Objects"]["singles"]["named"] == 1.0
    assert results["through_autoencoder"] == results["clean_renders"]
    assert results["settings"]["width"] == 48 and results["settings"]["holdout"]["pairs"] == 25
    report = format_report(results)
    assert report.startswith("model: fake [0123456789]") and "clean renders" in report and "the VAE" in report
    assert "generation time: 48x48" in report and "96x96" in report
    json.dumps(results)  # JSON-ready
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluate(pipe, dataset, ColourJudge(dataset.names), EvalSettings(sampler="Heun"))
    with pytest.raises(ValueError, match="steps"):
        EvalSettings(steps=0)


def test_the_grid_shows_each_category_and_kind_with_the_judges_verdict(folder, tmp_path):
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder)))
    prompts = heldout_prompts(dataset, 3, 2)
    wrong = [p.prompt for p in prompts if p.category == "Objects" and p.kind == "singles"][:1]
    images = []
    pipe, settings = FakePipeline(dataset, prompts, wrong), EvalSettings(singles=3, pairs=2)
    results = evaluate(pipe, dataset, ColourJudge(dataset.names), settings, images=images)
    assert len(images) == len(results["readings"]) == len(prompts)
    assert all(image.size == (48, 48) for image in images)
    outcomes = [outcome(e["kind"], e["verdict"]) for e in results["readings"]]
    assert outcomes.count("wrong") == 1 and outcomes[[p.prompt for p in prompts].index(wrong[0])] == "wrong"
    assert outcome("singles", {"named": True, "position": False, "all": False}) == "part"
    assert outcome("pairs", {"found": True, "relation": False}) == "part"
    path = example_grid(results, images, tmp_path / "grid.png", columns=2)
    rows = len({(p.category, p.kind) for p in prompts})
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.height > grid.width * rows / 4
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # written atomically, nothing left
    with pytest.raises(ValueError, match="readings but"):
        example_grid(results, images[:-1], tmp_path / "short.png")


def test_samples_are_the_same_in_another_process(folder):
    """Data workers are other processes, with other string hashes: they must draw the same samples."""
    import subprocess
    import sys

    code = (
        "import sys; from diffuse.emoji.data import EmojiDataConfig, EmojiDataset; "
        "d = EmojiDataset(EmojiDataConfig(folder=sys.argv[1])); "
        "print(repr([d.describe(i) for i in range(200)]), repr(d.holdout))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(folder)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    dataset = EmojiDataset(EmojiDataConfig(folder=str(folder)))
    assert runs[0] == runs[1] == f"{[dataset.describe(i) for i in range(200)]!r} {dataset.holdout!r}\n"
