"""The emoji world's training data: an endless, seeded stream of captioned emoji scenes.

Sample i is a pure function of (seed, i) and the data folder: its own random generator draws
a scene, the scene is rendered from the folder's pictures and captioned. A training checkpoint
keeps only the index of the next sample, and any batch can be drawn again, on any process.

A few combinations are held out (never in a training image), drawn from the evaluated
categories (catalogue.EVALUATED_CATEGORIES) of whatever catalogue the folder holds: a picture
in one position (a dog face is seen in eight cells, never at the top left) and pairings (a
dog face and a red apple each seen often, never together). The finished model is asked for
these: `heldout_single_scenes` / `heldout_pair_scenes` draw the evaluation's scenes.

The scenes and renderer live in scenes.py, the captions in captions.py; the names a trainer
needs are re-exported here, so `diffuse.emoji.data` is the one import it needs.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from diffuse.emoji.captions import caption, parse_caption, reserved_words
from diffuse.emoji.catalogue import EVALUATED_CATEGORIES, load_catalogue
from diffuse.emoji.scenes import (
    BACKGROUNDS,
    INVERSE_RELATION,
    MAX_IMAGE_SIZE,
    POSITIONS,
    RELATIONS,
    SIZES,
    Picture,
    PictureCache,
    Scene,
    backgrounds_for,
    cell_centre,
    relation_between,
    render,
)
from diffuse.shapes.data import image_to_tensor

__all__ = [
    "BACKGROUNDS",
    "EmojiDataConfig",
    "EmojiDataset",
    "Holdout",
    "HoldoutConfig",
    "POSITIONS",
    "RELATIONS",
    "SIZES",
    "Picture",
    "PictureCache",
    "Scene",
    "caption",
    "heldout_pair_scenes",
    "heldout_single_scenes",
    "image_to_tensor",
    "parse_caption",
    "render",
]

BORDER_MARGIN = 0.03  # a picture's box keeps at least this far (2 px at 64) from the image border
MIN_GAP = 0.05  # two boxes keep at least this far apart (3 px at 64): separate pictures, a clear relation


@dataclass(frozen=True)
class HoldoutConfig:
    """How many combinations to hold out per evaluated category (fewer where a category is smaller):
    as many as the evaluation asks for per category, so each of its prompts is another combination."""

    seed: int = 0
    picture_positions: int = 25  # pictures each kept out of one cell
    pairs: int = 25  # pairings of two of the category's pictures, never shown together

    def __post_init__(self) -> None:
        for name in ("seed", "picture_positions", "pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"holdout {name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Holdout:
    """Combinations no training scene contains: (name, position) and unordered pairs of names."""

    picture_positions: tuple[tuple[str, str], ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()

    @cached_property
    def _pair_set(self) -> frozenset[frozenset[str]]:
        return frozenset(frozenset(pair) for pair in self.pairs)

    @cached_property
    def _position_set(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.picture_positions)

    def picture_held_out(self, name: str, position: str | None) -> bool:
        return (name, position) in self._position_set

    def pair_held_out(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._pair_set  # in either order and either relation

    def contains(self, scene: Scene) -> bool:
        """Whether the scene shows any held-out combination."""
        if any(self.picture_held_out(o.name, o.position) for o in scene.objects):
            return True
        return len(scene.objects) == 2 and self.pair_held_out(scene.objects[0].name, scene.objects[1].name)


def draw_holdout(names_by_category: dict[str, tuple[str, ...]], config: HoldoutConfig) -> Holdout:
    """The held-out combinations of each evaluated category present, drawn from its own seeded generator
    (so a category's draw does not depend on the others): distinct pictures each in one random cell,
    and distinct pairings."""
    positions, pairs = [], []
    for category in EVALUATED_CATEGORIES:
        names = names_by_category.get(category, ())
        rng = random.Random(f"emoji-holdout-{config.seed}-{category}")
        for name in rng.sample(names, min(config.picture_positions, len(names))):
            positions.append((name, rng.choice(tuple(POSITIONS))))
        wanted = min(config.pairs, len(names) * (len(names) - 1) // 2)
        drawn: set[frozenset[str]] = set()
        while len(drawn) < wanted:
            a, b = rng.sample(names, 2)
            if frozenset((a, b)) not in drawn:
                drawn.add(frozenset((a, b)))
                pairs.append((a, b))
    return Holdout(tuple(positions), tuple(pairs))


@dataclass(frozen=True)
class EmojiDataConfig:
    folder: str = ""  # the data folder `diffuse data emoji --out DIR` wrote
    seed: int = 0
    image_size: int = 64
    two_object_fraction: float = 0.4
    position_jitter: float = 0.02  # uniform offset of a picture's centre from its cell centre, per axis
    categories: tuple[str, ...] = ()  # the catalogue categories to draw from; empty: all of them
    holdout: HoldoutConfig = HoldoutConfig()

    def __post_init__(self) -> None:
        if not isinstance(self.folder, (str, os.PathLike)):
            raise ValueError(f"folder must be a path, got {self.folder!r}")
        object.__setattr__(self, "folder", os.fspath(self.folder))  # a string: the config is written as JSON
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be an integer from 16 to {MAX_IMAGE_SIZE} pixels, got {self.image_size!r}"
            )
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {self.two_object_fraction}")
        if not 0.0 <= self.position_jitter <= 0.05:
            raise ValueError(f"position_jitter must be in [0, 0.05] (cells are 0.3 apart), got {self.position_jitter}")
        if isinstance(self.categories, str) or not all(isinstance(c, str) and c for c in self.categories):
            raise ValueError(f"categories must be a list of category names, got {self.categories!r}")
        object.__setattr__(self, "categories", tuple(self.categories))  # a list from a config file
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories names one twice: {self.categories!r}")


def _place(name: str, size: str, position: str, rng: random.Random, jitter: float) -> Picture:
    """A picture at its cell centre plus jitter, its box kept inside the border margin."""
    half = SIZES[size] / 2
    x, y = cell_centre(position)
    x = min(max(x + rng.uniform(-jitter, jitter), BORDER_MARGIN + half), 1 - BORDER_MARGIN - half)
    y = min(max(y + rng.uniform(-jitter, jitter), BORDER_MARGIN + half), 1 - BORDER_MARGIN - half)
    return Picture(name, size, position, (x, y))


def _reach(size: str, jitter: float) -> float:
    """How far a picture's centre may end up from its cell centre, towards the image's middle:
    its jitter, or the border margin's push on a large picture in an edge cell."""
    return max(jitter, BORDER_MARGIN + SIZES[size] / 2 - min(cell_centre(p)[0] for p in POSITIONS))


@lru_cache(maxsize=64)
def pair_layouts(a_size: str, b_size: str, rel: str, jitter: float) -> tuple[tuple[str, str], ...]:
    """Cell pairs (a's, b's) where `a rel b` holds along one axis only (same row for left/right,
    same column for above/below) and the boxes stay MIN_GAP apart wherever jitter and the border
    margin put them. At these SIZES that leaves the opposite edges' cells."""
    needed = SIZES[a_size] / 2 + SIZES[b_size] / 2 + _reach(a_size, jitter) + _reach(b_size, jitter) + MIN_GAP
    layouts = []
    for pos_a in POSITIONS:
        for pos_b in POSITIONS:
            (ax, ay), (bx, by) = cell_centre(pos_a), cell_centre(pos_b)
            in_line = (ax == bx) != (ay == by)  # one row or one column, not the same cell
            if in_line and relation_between((ax, ay), (bx, by)) == rel and abs(ax - bx) + abs(ay - by) >= needed:
                layouts.append((pos_a, pos_b))
    return tuple(layouts)


class EmojiDataset:
    """Endless captioned emoji scenes; sample i depends only on (config.seed, i) and the data folder.

    Pictures come from the configured categories (all by default); a name made only of a
    caption's own words ("top") is left out, since a caption could not tell it from them.
    """

    def __init__(self, config: EmojiDataConfig = EmojiDataConfig(), pictures: PictureCache | None = None) -> None:
        if not config.folder:
            raise ValueError("the emoji data config names no folder (make one with `diffuse data emoji --out DIR`)")
        self.config = config
        catalogue = load_catalogue(config.folder)
        self.pictures = pictures if pictures is not None else PictureCache(config.folder, catalogue)
        self.all_names = frozenset(self.pictures.emoji)  # every name a caption might be read as
        known = {record.category for record in catalogue}
        unknown = [c for c in config.categories if c not in known]
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r}; {config.folder} has {', '.join(sorted(known))}")
        reserved = reserved_words()
        self.names = tuple(
            name
            for name, record in self.pictures.emoji.items()
            if (not config.categories or record.category in config.categories) and not set(name.split()) <= reserved
        )
        _check_enough(self.names, config)
        by_category: dict[str, list[str]] = {}
        for name in self.names:
            by_category.setdefault(self.pictures.emoji[name].category, []).append(name)
        self.holdout = draw_holdout({c: tuple(n) for c, n in by_category.items()}, config.holdout)
        if config.two_object_fraction > 0 and len(self.names) * (len(self.names) - 1) // 2 <= len(self.holdout.pairs):
            raise ValueError(
                f"every pairing of the {len(self.names)} pictures is held out: no two-picture scene is left"
            )

    def category(self, name: str) -> str:
        return self.pictures.record(name).category

    def describe(self, index: int) -> tuple[Scene, str]:
        """Sample `index`'s scene and caption, without drawing it."""
        scene, rng = self._scene(index)
        return scene, caption(scene, rng, self.all_names)

    def swapped_caption(self, index: int) -> str | None:
        """Sample `index`'s caption with its relation reversed, in the same phrasing: a caption of
        another picture made of the same words. None for a one-picture sample."""
        scene, rng = self._scene(index)
        if scene.relation is None:
            return None
        a, rel, b = scene.relation
        return caption(dataclasses.replace(scene, relation=(a, INVERSE_RELATION[rel], b)), rng, self.all_names)

    def _scene(self, index: int) -> tuple[Scene, random.Random]:
        """Sample `index`'s scene, and its generator in the state the caption is drawn from."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"sample index must be a non-negative integer, got {index!r}")
        # One generator per sample, seeded from (seed, index) alone: any sample can be redrawn.
        rng = random.Random(self.config.seed * 2**64 + index)
        while True:
            if rng.random() < self.config.two_object_fraction:
                scene = self.pair_scene(rng, *rng.sample(self.names, 2))
            else:
                scene = self.single_scene(rng, rng.choice(self.names), rng.choice(_POSITION_NAMES))
            if not self.holdout.contains(scene):
                return scene, rng

    def single_scene(self, rng: random.Random, name: str, position: str) -> Scene:
        """`name` in the cell `position`, at a random size, on a background it stands out on."""
        obj = _place(name, rng.choice(_SIZE_NAMES), position, rng, self.config.position_jitter)
        return Scene((obj,), rng.choice(backgrounds_for(self.pictures, [name])))

    def pair_scene(self, rng: random.Random, a: str, b: str) -> Scene:
        """`a` and `b` at random sizes, in a random relation, on a background both stand out on."""
        rel, sizes = rng.choice(RELATIONS), (rng.choice(_SIZE_NAMES), rng.choice(_SIZE_NAMES))
        pos_a, pos_b = rng.choice(pair_layouts(*sizes, rel, self.config.position_jitter))
        jitter = self.config.position_jitter
        objects = (_place(a, sizes[0], pos_a, rng, jitter), _place(b, sizes[1], pos_b, rng, jitter))
        return Scene(objects, rng.choice(backgrounds_for(self.pictures, [a, b])), (0, rel, 1))

    def sample(self, index: int) -> tuple[torch.Tensor, str, Scene]:
        """(image [3, H, W] in [-1, 1], caption, scene) of sample `index`."""
        scene, text = self.describe(index)
        return image_to_tensor(render(scene, self.config.image_size, self.pictures)), text, scene

    def batch(self, start_index: int, batch_size: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """Samples start_index .. start_index + batch_size - 1: images [B, 3, H, W], captions, scenes."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        samples = [self.sample(start_index + i) for i in range(batch_size)]
        images, captions, scenes = zip(*samples)
        return torch.stack(images), list(captions), list(scenes)


_POSITION_NAMES, _SIZE_NAMES = tuple(POSITIONS), tuple(SIZES)


def _check_enough(names: tuple[str, ...], config: EmojiDataConfig) -> None:
    if not names:
        chosen = ", ".join(config.categories) if config.categories else "the catalogue"
        raise ValueError(f"no pictures to draw: {chosen} in {config.folder} holds none a caption can name")
    if len(names) < 2 and config.two_object_fraction > 0:
        raise ValueError(f"two-picture scenes need two pictures; the selection holds only {names[0]!r}")


def heldout_single_scenes(dataset: EmojiDataset, n: int, seed: int = 0, category: str | None = None) -> list[Scene]:
    """n one-picture scenes, scene i showing the held-out (picture, position) i (cycling), of one
    category or all; nothing else in them is held out."""
    combos = [c for c in dataset.holdout.picture_positions if category in (None, dataset.category(c[0]))]
    if not combos:
        raise ValueError(f"the holdout has no (picture, position) combinations{_in(category)} to draw scenes from")
    rng = random.Random(f"heldout-single-{seed}-{category}")
    return [dataset.single_scene(rng, *combos[i % len(combos)]) for i in range(n)]


def heldout_pair_scenes(dataset: EmojiDataset, n: int, seed: int = 0, category: str | None = None) -> list[Scene]:
    """n two-picture scenes, scene i showing the held-out pairing i (cycling) in a random relation and
    order, of one category or all; neither picture sits in a cell it is held out of."""
    pairs = [p for p in dataset.holdout.pairs if category in (None, dataset.category(p[0]))]
    if not pairs:
        raise ValueError(f"the holdout has no pairings{_in(category)} to draw scenes from")
    rng = random.Random(f"heldout-pair-{seed}-{category}")
    scenes = []
    for i in range(n):
        a, b = pairs[i % len(pairs)]
        if rng.random() < 0.5:
            a, b = b, a
        scene = dataset.pair_scene(rng, a, b)
        while any(dataset.holdout.picture_held_out(o.name, o.position) for o in scene.objects):
            scene = dataset.pair_scene(rng, a, b)
        scenes.append(scene)
    return scenes


def _in(category: str | None) -> str:
    return f" in {category!r}" if category else ""
