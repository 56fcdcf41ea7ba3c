"""The training data: an endless, seeded stream of captioned shape images.

Sample i is a pure function of (seed, i): its own random generator draws a scene, the
scene is rendered and captioned. So nothing needs storing: a training checkpoint keeps
only the index of the next sample (its "data position"), and any batch can be drawn
again, on any process, at any time.

A few attribute combinations are held out (never in a training image) so the finished
model can be asked for something new made of things it knows: a purple triangle when it
has only seen purple squares and green triangles, a red circle above a blue square when
it has only seen the two elsewhere. `heldout_single_scenes` / `heldout_pair_scenes` draw
those evaluation scenes.

The vocabulary, scene and renderer live in scenes.py, the captions in captions.py; the
names are re-exported here, so `diffuse.shapes.data` is the one import a trainer needs.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from PIL import Image

from diffuse import inputs
from diffuse.shapes.captions import caption, parse_caption
from diffuse.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    INVERSE_RELATION,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    backgrounds_for,
    bounds,
    cell_centre,
    render,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DataConfig",
    "Holdout",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "Shape",
    "ShapesDataset",
    "caption",
    "heldout_pair_scenes",
    "heldout_single_scenes",
    "image_to_tensor",
    "parse_caption",
    "render",
]

BORDER_MARGIN = 0.03  # a shape keeps at least this far (2 px at 64) from the image border
MIN_GAP = 0.05  # two shapes keep at least this far apart (3 px at 64): separate blobs, a clear relation

ObjectId = tuple[str, str]  # (shape, colour)


@dataclass(frozen=True)
class Holdout:
    """Combinations no training scene contains. Small, so every single attribute value still
    appears in training in other company."""

    shape_colours: tuple[ObjectId, ...] = (("triangle", "purple"), ("star", "orange"), ("circle", "green"))
    colour_positions: tuple[tuple[str, str], ...] = (("red", "bottom right"), ("blue", "top"), ("yellow", "left"))
    pairs: tuple[tuple[ObjectId, str, ObjectId], ...] = (
        (("circle", "red"), "above", ("square", "blue")),
        (("star", "yellow"), "left of", ("triangle", "green")),
        (("triangle", "blue"), "above", ("circle", "yellow")),
        (("square", "orange"), "left of", ("star", "purple")),
    )

    def __post_init__(self) -> None:
        for kind, colour in self.shape_colours:
            Shape(kind, colour)  # validates the names
        for colour, position in self.colour_positions:
            Shape(SHAPES[0], colour, position=position)
        for a, rel, b in self.pairs:
            Scene((Shape(*a), Shape(*b)), None, (0, rel, 1))
            if self.object_held_out(*a) or self.object_held_out(*b):
                raise ValueError(f"held-out pair {a} {rel} {b} uses a held-out shape/colour: it could never be shown")
            if a == b or not backgrounds_for([a[1], b[1]]):
                raise ValueError(
                    f"held-out pair {a} {rel} {b} cannot be drawn: identical objects or no background "
                    "contrasts with both colours"
                )

    def object_held_out(self, kind: str, colour: str, position: str | None = None) -> bool:
        return (kind, colour) in self.shape_colours or (colour, position) in self.colour_positions

    def pair_held_out(self, a: ObjectId, rel: str, b: ObjectId) -> bool:
        # "b right of a" is the same picture as "a left of b": compare both readings.
        return (a, rel, b) in self.pairs or (b, INVERSE_RELATION[rel], a) in self.pairs

    def contains(self, scene: Scene) -> bool:
        """Whether the scene shows any held-out combination."""
        if any(self.object_held_out(o.kind, o.colour, o.position) for o in scene.objects):
            return True
        if scene.relation is None:
            return False
        a, rel, b = scene.relation
        first, second = scene.objects[a], scene.objects[b]
        return self.pair_held_out((first.kind, first.colour), rel, (second.kind, second.colour))


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    image_size: int = 64
    two_object_fraction: float = 0.4
    position_jitter: float = 0.02  # uniform offset of a shape's centre from its cell centre, per axis
    holdout: Holdout = Holdout()

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if not 0.0 <= self.two_object_fraction <= 1.0:
            raise ValueError(f"two_object_fraction must be in [0, 1], got {self.two_object_fraction}")
        if not 0.0 <= self.position_jitter <= 0.05:
            raise ValueError(f"position_jitter must be in [0, 0.05] (cells are 0.3 apart), got {self.position_jitter}")


_COLOUR_NAMES, _POSITION_NAMES, _SIZE_NAMES = tuple(COLOURS), tuple(POSITIONS), tuple(SIZES)
_BOUNDS = {(kind, size): bounds(kind, extent) for kind in SHAPES for size, extent in SIZES.items()}


def _place(kind: str, colour: str, size: str, position: str, rng: random.Random, jitter: float) -> Shape:
    """A shape at its cell centre plus jitter, kept inside the border margin."""
    left, top, right, bottom = _BOUNDS[kind, size]
    x, y = cell_centre(position)
    x = min(max(x + rng.uniform(-jitter, jitter), BORDER_MARGIN - left), 1 - BORDER_MARGIN - right)
    y = min(max(y + rng.uniform(-jitter, jitter), BORDER_MARGIN - top), 1 - BORDER_MARGIN - bottom)
    return Shape(kind, colour, size, position, (x, y))


def _pair_layouts(a: tuple[str, str], b: tuple[str, str], rel: str, jitter: float) -> list[tuple[str, str]]:
    """Cell pairs (a's, b's) where `a rel b` holds along one axis only (same row for left/right,
    same column for above/below) and the shapes stay MIN_GAP apart even after jitter.
    a and b are (shape, size)."""
    a_left, a_top, a_right, a_bottom = _BOUNDS[a]
    b_left, b_top, b_right, b_bottom = _BOUNDS[b]
    layouts = []
    for pos_a in POSITIONS:
        for pos_b in POSITIONS:
            (ax, ay), (bx, by) = cell_centre(pos_a), cell_centre(pos_b)
            if rel == "left of" and ay == by:
                gap = (bx + b_left) - (ax + a_right)
            elif rel == "right of" and ay == by:
                gap = (ax + a_left) - (bx + b_right)
            elif rel == "above" and ax == bx:
                gap = (by + b_top) - (ay + a_bottom)
            elif rel == "below" and ax == bx:
                gap = (ay + a_top) - (by + b_bottom)
            else:
                continue
            if gap >= MIN_GAP + 2 * jitter:
                layouts.append((pos_a, pos_b))
    return layouts


def _single_scene(rng: random.Random, holdout: Holdout, jitter: float, want_held_out: bool = False) -> Scene:
    while True:
        kind, colour = rng.choice(SHAPES), rng.choice(_COLOUR_NAMES)
        position, size = rng.choice(_POSITION_NAMES), rng.choice(_SIZE_NAMES)
        obj = _place(kind, colour, size, position, rng, jitter)
        scene = Scene((obj,), rng.choice(backgrounds_for([colour])))
        if holdout.contains(scene) == want_held_out:
            return scene


def _pair_scene(
    rng: random.Random, holdout: Holdout, jitter: float, forced: tuple[ObjectId, str, ObjectId] | None = None
) -> Scene:
    """A two-object training scene, or (with `forced`) one showing that held-out pair."""
    while True:
        if forced is None:
            a_id = (rng.choice(SHAPES), rng.choice(_COLOUR_NAMES))
            b_id = (rng.choice(SHAPES), rng.choice(_COLOUR_NAMES))
            rel = rng.choice(RELATIONS)
            if a_id == b_id:  # two identical shapes would make "which is left of which" ambiguous
                continue
        else:
            a_id, rel, b_id = forced
        a_size, b_size = rng.choice(_SIZE_NAMES), rng.choice(_SIZE_NAMES)
        pos_a, pos_b = rng.choice(_pair_layouts((a_id[0], a_size), (b_id[0], b_size), rel, jitter))
        backgrounds = backgrounds_for([a_id[1], b_id[1]])
        if not backgrounds:
            continue
        objects = (_place(*a_id, a_size, pos_a, rng, jitter), _place(*b_id, b_size, pos_b, rng, jitter))
        scene = Scene(objects, rng.choice(backgrounds), (0, rel, 1))
        if forced is None and not holdout.contains(scene):
            return scene
        if forced is not None and not any(holdout.object_held_out(o.kind, o.colour, o.position) for o in objects):
            return scene  # the pair is the only novelty in it


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float tensor in [-1, 1]: the same pixels the pipeline gives the autoencoder."""
    return inputs.image_to_tensor(image, *image.size)[0]


class ShapesDataset:
    """Endless captioned shapes; sample i depends only on (config.seed, i)."""

    def __init__(self, config: DataConfig = DataConfig()) -> None:
        self.config = config

    def describe(self, index: int) -> tuple[Scene, str]:
        """Sample `index`'s scene and caption, without drawing it."""
        scene, rng = self._scene(index)
        return scene, caption(scene, rng)

    def swapped_caption(self, index: int) -> str | None:
        """Sample `index`'s caption with its relation reversed, in the same phrasing ("a red circle
        right of a blue square" for "a red circle left of a blue square"): a caption of another
        picture made of the same words. None for a one-object sample."""
        scene, rng = self._scene(index)
        if scene.relation is None:
            return None
        a, rel, b = scene.relation
        return caption(dataclasses.replace(scene, relation=(a, INVERSE_RELATION[rel], b)), rng)

    def _scene(self, index: int) -> tuple[Scene, random.Random]:
        """Sample `index`'s scene, and its generator in the state the caption is drawn from."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"sample index must be a non-negative integer, got {index!r}")
        # One generator per sample, seeded from (seed, index) alone: any sample can be redrawn.
        rng = random.Random(self.config.seed * 2**64 + index)
        cfg = self.config
        if rng.random() < cfg.two_object_fraction:
            scene = _pair_scene(rng, cfg.holdout, cfg.position_jitter)
        else:
            scene = _single_scene(rng, cfg.holdout, cfg.position_jitter)
        return scene, rng

    def sample(self, index: int) -> tuple[torch.Tensor, str, Scene]:
        """(image [3, H, W] in [-1, 1], caption, scene) of sample `index`."""
        scene, text = self.describe(index)
        return image_to_tensor(render(scene, self.config.image_size)), text, scene

    def batch(self, start_index: int, batch_size: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """Samples start_index .. start_index + batch_size - 1: images [B, 3, H, W], captions, scenes."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        samples = [self.sample(start_index + i) for i in range(batch_size)]
        images, captions, scenes = zip(*samples)
        return torch.stack(images), list(captions), list(scenes)


def heldout_single_scenes(n: int, seed: int = 0, holdout: Holdout = Holdout(), jitter: float = 0.02) -> list[Scene]:
    """n one-object scenes, each showing a held-out (shape, colour) or (colour, position)."""
    if not holdout.shape_colours and not holdout.colour_positions:
        raise ValueError("the holdout has no single-object combinations to draw scenes from")
    rng = random.Random(f"heldout-single-{seed}")
    return [_single_scene(rng, holdout, jitter, want_held_out=True) for _ in range(n)]


def heldout_pair_scenes(n: int, seed: int = 0, holdout: Holdout = Holdout(), jitter: float = 0.02) -> list[Scene]:
    """n two-object scenes, each showing one of the held-out (object, relation, object) triples,
    cycling through them; nothing else in them is held out."""
    if not holdout.pairs:
        raise ValueError("the holdout has no pairs to draw scenes from")
    rng = random.Random(f"heldout-pair-{seed}")
    return [_pair_scene(rng, holdout, jitter, forced=holdout.pairs[i % len(holdout.pairs)]) for i in range(n)]
