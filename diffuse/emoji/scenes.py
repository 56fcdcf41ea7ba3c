"""The emoji world's scenes: what a scene is, the backgrounds and sizes it may use, how one is drawn.

A scene is one or two emoji pictures on a plain or softly graded background. The grid
(POSITIONS, cell centres and edges) and the relations are the shapes world's, imported from
diffuse.shapes.scenes so each fact lives in one place: a caption or a judge reads "top left"
and "left of" the same way in both worlds.

Geometry is in fractions of the image side, so one scene renders at any resolution: a
picture's `centre` is the centre of its square box and its size names the box's side.
The pictures' boxes are nearly full (their drawn part spans ~62 of 64 px), so a box is
what a picture looks like it occupies.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffuse.emoji.catalogue import Emoji, load_catalogue, picture
from diffuse.shapes.scenes import (
    INVERSE_RELATION,
    POSITIONS,
    RELATIONS,
    cell_centre,
    cell_of,
    check_name,
    check_scene,
    relation_between,
)

__all__ = [
    "BACKGROUNDS",
    "INVERSE_RELATION",
    "POSITIONS",
    "RELATIONS",
    "SIZES",
    "Picture",
    "PictureCache",
    "Scene",
    "backgrounds_for",
    "cell_centre",
    "cell_of",
    "relation_between",
    "render",
]

# A picture's box side as a fraction of the image side. Small is 15 px at 64: about the 16 px
# emoji are designed to stay legible at in running text. Large is 23 px: a box that still fits
# a corner cell (centre 0.2 +- 0.18) and covers 2.25x a small one's area, so the two sizes are
# told apart at a glance.
SIZES: dict[str, float] = {"small": 0.24, "large": 0.36}

# Each background is its top and bottom colour; a plain one has the two equal, a graded one
# blends them row by row (a soft vertical gradient, like a sky).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((250, 250, 250), (250, 250, 250)),
    "black": ((20, 20, 20), (20, 20, 20)),
    "gray": ((128, 128, 128), (128, 128, 128)),
    "beige": ((235, 220, 185), (235, 220, 185)),
    "light blue": ((175, 210, 240), (175, 210, 240)),
    "blue gradient": ((60, 110, 200), (185, 215, 245)),
    "sunset gradient": ((250, 190, 110), (235, 120, 135)),
}
# A picture goes only on backgrounds it stands out on: at least MIN_VISIBLE of its drawn
# (alpha-weighted) area must be CONTRAST_DISTANCE or more from the background in RGB, at both
# ends of a gradient. A white cloud never lands on white; every picture keeps several choices.
CONTRAST_DISTANCE = 60.0
MIN_VISIBLE = 0.6

# The largest image drawn: a large picture is then 184 px, its 64 px source upsampled ~3x already.
MAX_IMAGE_SIZE = 512

# Bytes of decoded pictures, and of resized ones, a cache keeps: a catalogue of ~1,900 at 64 px
# (31 MB) and both its sizes up to 128 px images, in each data worker.
PICTURE_BYTES_KEPT = 64 * 2**20


@dataclass(frozen=True)
class Picture:
    """One emoji in a scene, by name. Attributes left None are unspecified (a parsed prompt may not state them)."""

    name: str
    size: str | None = None
    position: str | None = None
    centre: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a picture needs a name, got {self.name!r}")
        if self.size is not None:
            check_name("size", self.size, SIZES)
        if self.position is not None:
            check_name("position", self.position, POSITIONS)


@dataclass(frozen=True)
class Scene:
    """One or two pictures on a background; `relation` (a, rel, b) says objects[a] is rel objects[b]."""

    objects: tuple[Picture, ...]
    background: str | None
    relation: tuple[int, str, int] | None = None

    def __post_init__(self) -> None:
        check_scene(self, BACKGROUNDS, "picture")


class _Kept(OrderedDict):
    """Images by key, forgetting the least recently used once they hold more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.held = limit, 0

    def get_or_make(self, key, make: Callable[[], Image.Image]) -> Image.Image:
        if key in self:
            self.move_to_end(key)
            return self[key]
        image = self[key] = make()
        self.held += _bytes(image)
        while self.held > self.limit and len(self) > 1:
            self.held -= _bytes(self.popitem(last=False)[1])
        return image


def _bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class PictureCache:
    """A data folder's pictures by name, decoded once and kept: training reads each one millions of times.

    Where two records share a name the first is used, so a name always means one picture. A
    cache sent to another process (a data worker) goes without its pictures, which it decodes again.
    """

    def __init__(self, folder: str | Path, catalogue: list[Emoji] | None = None) -> None:
        self.folder = Path(folder)
        records = load_catalogue(folder) if catalogue is None else catalogue
        self.emoji: dict[str, Emoji] = {}
        for record in records:
            self.emoji.setdefault(record.name, record)
        self._reset()

    def _reset(self) -> None:
        self._decoded = _Kept(PICTURE_BYTES_KEPT)
        self._resized = _Kept(PICTURE_BYTES_KEPT)
        self._visible: dict[str, dict[str, float]] = {}
        self._backgrounds: dict[tuple[str, int], Image.Image] = {}

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "emoji": self.emoji}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def record(self, name: str) -> Emoji:
        if name not in self.emoji:
            raise ValueError(f"no emoji named {name!r} in {self.folder}")
        return self.emoji[name]

    def rgba(self, name: str) -> Image.Image:
        """The picture at its stored size (PICTURE_SIZE), RGBA."""
        return self._decoded.get_or_make(name, lambda: picture(self.folder, self.record(name)))

    def resized(self, name: str, side: int) -> Image.Image:
        """The picture as a side x side RGBA image (LANCZOS; Pillow weighs colours by alpha as it resizes)."""
        return self._resized.get_or_make(
            (name, side), lambda: self.rgba(name).resize((side, side), Image.Resampling.LANCZOS)
        )

    def visibility(self, name: str) -> dict[str, float]:
        """Per background, the share of the picture's drawn area that stands out from it (see MIN_VISIBLE)."""
        if name not in self._visible:
            pixels = np.asarray(self.rgba(name), dtype=np.float64).reshape(-1, 4)
            weight = pixels[:, 3] / 255.0
            total = max(weight.sum(), 1e-9)
            shares = {}
            for background, ends in BACKGROUNDS.items():
                far = [np.linalg.norm(pixels[:, :3] - np.array(end), axis=1) >= CONTRAST_DISTANCE for end in ends]
                shares[background] = min(float((f * weight).sum() / total) for f in far)
            self._visible[name] = shares
        return self._visible[name]

    def background(self, name: str, side: int) -> Image.Image:
        """A background as a side x side RGB image (copy it before drawing on it)."""
        if (name, side) not in self._backgrounds:
            self._backgrounds[name, side] = _background_image(name, side)
        return self._backgrounds[name, side]


def backgrounds_for(pictures: PictureCache, names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The backgrounds every one of these pictures stands out on; where there is none, the one the
    least visible of them stands out on most (never empty, so every pair can be drawn)."""
    least = {bg: min(pictures.visibility(name)[bg] for name in names) for bg in BACKGROUNDS}
    fitting = tuple(bg for bg, share in least.items() if share >= MIN_VISIBLE)
    return fitting or (max(least, key=least.get),)


def _background_image(name: str, side: int) -> Image.Image:
    top, bottom = (np.array(end, dtype=np.float64) for end in BACKGROUNDS[name])
    t = np.linspace(0.0, 1.0, side)[:, None]
    rows = np.round(top + (bottom - top) * t).astype(np.uint8)  # [side, 3]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (side, side, 3))), "RGB")


def box(centre: tuple[float, float], size: str, side: int) -> tuple[int, int, int]:
    """(left, top, width) in pixels of a picture's square box on a side x side image."""
    width = max(1, round(SIZES[size] * side))
    return math.floor(centre[0] * side - width / 2 + 0.5), math.floor(centre[1] * side - width / 2 + 0.5), width


def render(scene: Scene, size: int, pictures: PictureCache | str | Path) -> Image.Image:
    """Draw a fully specified scene as a size x size RGB image: each picture resized and alpha-composited.

    `pictures` is a PictureCache, or a data folder (read afresh on each call: pass a cache to draw many).
    """
    if not isinstance(size, int) or not 8 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer from 8 to {MAX_IMAGE_SIZE} pixels, got {size!r}")
    if scene.background is None:
        raise ValueError("cannot render a scene without a background")
    cache = pictures if isinstance(pictures, PictureCache) else PictureCache(pictures)
    canvas = cache.background(scene.background, size).copy()
    for obj in scene.objects:
        if obj.centre is None or obj.size is None:
            raise ValueError(f"cannot render {obj}: it needs a centre and a size")
        left, top, width = box(obj.centre, obj.size, size)
        image = cache.resized(obj.name, width)
        canvas.paste(image, (left, top), image)  # the alpha channel as the mask: an "over" composite
    return canvas
