"""The shapes world the default model learns: its vocabulary, what a scene is, how one is drawn.

A scene is one or two flat-coloured shapes on a flat background. Everything a caption
can say about it comes from the constants below (the one place these facts live):
the data generator draws from them, captions name them, and the analyzer that later
judges generated images reads pixels back into them.

Geometry is in fractions of the image side, so one scene renders at any resolution:
a shape's `centre` is its area centroid (x right, y down), and its size names a nominal
extent (a circle's diameter); the other shapes are proportioned to look as big.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")

# Object colours, chosen pairwise >= ~95 apart in RGB so a nearest-palette reading of
# a slightly off colour (a generated image, a VAE round trip) still lands on its name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (250, 225, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (235, 220, 185),
}
# An object is only ever drawn on a background at least this far away in RGB, so it
# never melts into it: this rules out the same colour (white on white) and white on beige.
MIN_CONTRAST = 100.0

# Nominal extent (a circle's diameter) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.18, "large": 0.28}

# The 3x3 grid: position name -> (column, row). Cell centres sit a little inside the
# image's thirds so a large shape in an edge cell still keeps clear of the border.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
CELL_CENTRES = (0.2, 0.5, 0.8)
CELL_EDGES = (0.35, 0.65)  # halfway between cell centres: where one cell ends and the next begins

# "a rel b": where object a sits relative to object b.
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down: anti-aliased edges

# Proportions relative to the nominal extent, picked so the four shapes look equally big.
_CIRCLE_RADIUS = 0.5
_SQUARE_HALF_SIDE = 0.44
_TRIANGLE_CIRCUMRADIUS = 0.62
_STAR_OUTER_RADIUS = 0.6
_STAR_INNER_RATIO = 0.42  # inner / outer radius: points that stay visible at 10 px
_CIRCLE_VERTICES = 64


@dataclass(frozen=True)
class Shape:
    """One object. Attributes left None are unspecified (a parsed prompt may not state them)."""

    kind: str
    colour: str
    size: str | None = None
    position: str | None = None
    centre: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_name("shape", self.kind, SHAPES)
        check_name("colour", self.colour, COLOURS)
        if self.size is not None:
            check_name("size", self.size, SIZES)
        if self.position is not None:
            check_name("position", self.position, POSITIONS)


@dataclass(frozen=True)
class Scene:
    """One or two shapes on a background; `relation` (a, rel, b) says objects[a] is rel objects[b]."""

    objects: tuple[Shape, ...]
    background: str | None
    relation: tuple[int, str, int] | None = None

    def __post_init__(self) -> None:
        check_scene(self, BACKGROUNDS, "object")


def check_name(what: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def check_scene(scene, backgrounds, what: str) -> None:
    """A scene of either world: one or two `what`s, a known background, a relation between the two."""
    if not 1 <= len(scene.objects) <= 2:
        raise ValueError(f"a scene holds one or two {what}s, got {len(scene.objects)}")
    if scene.background is not None:
        check_name("background", scene.background, backgrounds)
    if scene.relation is not None:
        a, rel, b = scene.relation
        check_name("relation", rel, RELATIONS)
        if len(scene.objects) != 2 or {a, b} != {0, 1}:
            raise ValueError(f"relation {scene.relation} must relate {what}s 0 and 1 of a two-{what} scene")


def contrast(colour: str, background: str) -> float:
    """RGB distance between an object colour and a background."""
    return math.dist(COLOURS[colour], BACKGROUNDS[background])


def backgrounds_for(colours: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The backgrounds every one of these object colours stands out on."""
    return tuple(bg for bg in BACKGROUNDS if all(contrast(c, bg) >= MIN_CONTRAST for c in colours))


def cell_centre(position: str) -> tuple[float, float]:
    column, row = POSITIONS[position]
    return CELL_CENTRES[column], CELL_CENTRES[row]


def cell_of(x: float, y: float) -> str:
    """The grid cell a point (fractions of the image side) falls in."""
    column = sum(x >= edge for edge in CELL_EDGES)
    row = sum(y >= edge for edge in CELL_EDGES)
    return next(name for name, cell in POSITIONS.items() if cell == (column, row))


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where a point a sits relative to b, along whichever axis separates them more."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def outline(kind: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape whose area centroid is (cx, cy) and nominal extent `extent`.

    Every shape is a polygon (the circle a fine one), so drawing and the analyzer's
    templates go through the same code. Shapes stand upright: the triangle's and the
    star's points face up.
    """
    if kind == "circle":
        r = _CIRCLE_RADIUS * extent
        steps = _CIRCLE_VERTICES
        return [
            (cx + r * math.cos(2 * math.pi * i / steps), cy + r * math.sin(2 * math.pi * i / steps))
            for i in range(steps)
        ]
    if kind == "square":
        h = _SQUARE_HALF_SIDE * extent
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        # Equilateral: the centroid is the circumcentre, vertices at -90, 30, 150 degrees.
        r = _TRIANGLE_CIRCUMRADIUS * extent
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if kind == "star":
        outer = _STAR_OUTER_RADIUS * extent
        radii = [outer if i % 2 == 0 else outer * _STAR_INNER_RATIO for i in range(10)]
        return [
            (cx + r * math.cos(math.radians(-90 + 36 * i)), cy + r * math.sin(math.radians(-90 + 36 * i)))
            for i, r in enumerate(radii)
        ]
    raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(SHAPES)}")


def unit_area(kind: str) -> float:
    """Area of a shape with nominal extent 1 (the analyzer turns a measured area into an extent)."""
    points = outline(kind, 0.0, 0.0, 1.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


def bounds(kind: str, extent: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a shape centred at the origin: how far it reaches each way."""
    xs, ys = zip(*outline(kind, 0.0, 0.0, extent))
    return min(xs), min(ys), max(xs), max(ys)


def canvas_polygon(kind: str, centre: tuple[float, float], extent: float, side: int) -> list[tuple[float, float]]:
    """A shape's outline in the pixel coordinates PIL draws with, on a side x side canvas.

    PIL fills pixel i when the point i (not i + 0.5) is inside the polygon, so the
    outline is moved half a pixel back: pixel centres are then what decides coverage.
    """
    return [(x - 0.5, y - 0.5) for x, y in outline(kind, centre[0] * side, centre[1] * side, extent * side)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a fully specified scene as a size x size RGB image with anti-aliased edges."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    if scene.background is None:
        raise ValueError("cannot render a scene without a background")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        if obj.centre is None or obj.size is None:
            raise ValueError(f"cannot render {obj}: it needs a centre and a size")
        draw.polygon(canvas_polygon(obj.kind, obj.centre, SIZES[obj.size], big), fill=COLOURS[obj.colour])
    return canvas.reduce(SUPERSAMPLE)  # the mean of each SUPERSAMPLE x SUPERSAMPLE block: a box filter
