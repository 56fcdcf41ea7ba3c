"""Reading an image back into the shapes world: the judge of generated images.

    analyze(image) -> SceneReading     background, objects (shape, colour, size, cell, centroid), relation
    matches(scene, reading) -> dict    per attribute the scene states: did the image get it right?
    all_correct(scene, reading)

The reading works on pixels alone, the way a generated image has to be judged:
  1. background: the median colour of the border ring, named by the nearest palette entry;
  2. objects: pixels far from that colour (after a 3x3 mean, which tames noise), split into
     connected blobs; specks smaller than a fraction of the smallest shape are dropped;
  3. colour: the median of a blob's most saturated pixels, named by the nearest palette entry;
  4. coverage: each pixel's place on the line from background colour to object colour
     (0 = background, 1 = object), so an anti-aliased or blurred edge counts as part of a pixel;
  5. shape: the coverage is compared (soft intersection over union) with each shape drawn by
     the renderer itself at the blob's centroid and area; the best fit wins. Size: whichever
     nominal size gives that shape the area seen. Position: the grid cell of the centroid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffuse.shapes.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    canvas_polygon,
    cell_of,
    relation_between,
    unit_area,
)

BORDER_WIDTH = 2  # pixels of the border ring that define the background
DETECTION_DISTANCE = 0.18  # RGB distance (0-1 units) from the background that marks a pixel as object
TEMPLATE_BLURS = (0.0, 0.5, 0.9, 1.3)  # extra blur (pixels, Gaussian sigma) the shape templates are tried at
MIN_OBJECT_FRACTION = 0.25  # blobs smaller than this share of the smallest shape's area are specks

_BACKGROUND_RGB = {name: np.array(rgb) / 255.0 for name, rgb in BACKGROUNDS.items()}
_COLOUR_RGB = {name: np.array(rgb) / 255.0 for name, rgb in COLOURS.items()}
_UNIT_AREA = {kind: unit_area(kind) for kind in SHAPES}
_SMALLEST_AREA = min(_UNIT_AREA.values()) * min(SIZES.values()) ** 2  # in image-side-squared units


@dataclass(frozen=True)
class ObjectReading:
    shape: str
    colour: str
    size: str
    position: str
    centroid: tuple[float, float]  # fractions of the image side (x right, y down)
    area: float  # fraction of the image covered
    rgb: tuple[float, float, float]  # the measured colour, 0-1
    shape_fit: float  # soft IoU with the best shape template: how sure the shape call is


@dataclass(frozen=True)
class SceneReading:
    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[ObjectReading, ...]
    relation: tuple[int, str, int] | None  # for exactly two objects: (0, where 0 is relative to 1, 1)


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] float in [0, 1] from a PIL image, a uint8 array, or a float array already in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _box3(image: np.ndarray) -> np.ndarray:
    """3x3 mean over the first two axes (edges repeated)."""
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """B with B @ x = x blurred by a Gaussian of `sigma` pixels along its first axis (zeros beyond the edge)."""
    if sigma <= 0:
        return np.eye(n)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.exp(-0.5 * (offsets / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)


def _nearest(rgb: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda name: float(np.sum((palette[name] - rgb) ** 2)))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: labels (-1 outside, 0..n-1 inside) and n.

    Every pixel starts with its own index and repeatedly takes the smallest index among its
    neighbours; jumping to the label's own label halves the remaining distance each round.
    """
    h, w = mask.shape
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)
        smallest = np.minimum.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        flat = np.append(smallest.ravel(), outside)
        jumped = np.where(mask, flat[smallest], outside)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, compact = np.unique(labels[mask], return_inverse=True)
    result = np.full((h, w), -1)
    result[mask] = compact
    return result, len(roots)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    h, w = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = np.logical_or.reduce([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return mask


def shape_coverage(kind: str, centre: tuple[float, float], extent: float, height: int, width: int) -> np.ndarray:
    """The renderer's coverage (0-1 per pixel) of one shape on a width x height image;
    centre in pixels, extent (nominal size) in pixels."""
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    side = width * SUPERSAMPLE  # canvas_polygon works in fractions of the image width
    relative = (centre[0] / width, centre[1] / width)
    ImageDraw.Draw(big).polygon(canvas_polygon(kind, relative, extent / width, side), fill=255)
    return np.asarray(big.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def _read_object(
    rgb: np.ndarray,
    smooth: np.ndarray,
    distance: np.ndarray,
    blob: np.ndarray,
    others: np.ndarray,
    background_rgb: np.ndarray,
) -> ObjectReading:
    h, w = distance.shape
    # The object's colour: the median of its pixels farthest from the background (its interior).
    blob_distance = distance[blob]
    core = blob & (distance >= 0.75 * np.percentile(blob_distance, 90))
    colour_rgb = np.median(rgb[core], axis=0)
    # Coverage: each pixel's place between background (0) and object colour (1). A two-pixel
    # ring around the blob catches faint edge pixels, but never reaches into another blob.
    direction = colour_rgb - background_rgb
    region = _dilate(blob, 2) & ~_dilate(others, 1)
    alpha = np.clip((smooth - background_rgb) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    alpha = np.where(region, alpha, 0.0)
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    # Shapes are compared in a window around the blob, wide enough for the blurred templates.
    rows, cols = np.nonzero(region)
    margin = 3 + math.ceil(2 * max(TEMPLATE_BLURS))
    top, left = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
    bottom, right = min(rows.max() + margin + 1, h), min(cols.max() + margin + 1, w)
    window = alpha[top:bottom, left:right]
    # The coverage went through the same 3x3 mean; a generated image may be blurrier still,
    # so each template is also tried at a few blurs and keeps its best fit.
    blurs = [(_blur_matrix(bottom - top, sigma), _blur_matrix(right - left, sigma)) for sigma in TEMPLATE_BLURS]
    fits = {}
    for kind in SHAPES:
        extent = math.sqrt(area / _UNIT_AREA[kind])
        template = _box3(shape_coverage(kind, (cx - left, cy - top), extent, bottom - top, right - left))
        fits[kind] = max(_soft_iou(window, down @ template @ across.T) for down, across in blurs)
    shape = max(fits, key=fits.get)
    # Size: the nominal size whose area for this shape is nearest on a log scale.
    relative_area = area / (w * h)
    size = min(SIZES, key=lambda s: abs(math.log(relative_area / (_UNIT_AREA[shape] * SIZES[s] ** 2))))
    centroid = (cx / w, cy / h)
    return ObjectReading(
        shape=shape,
        colour=_nearest(colour_rgb, _COLOUR_RGB),
        size=size,
        position=cell_of(*centroid),
        centroid=centroid,
        area=area / (w * h),
        rgb=tuple(float(v) for v in colour_rgb),
        shape_fit=fits[shape],
    )


def analyze(image: Image.Image | np.ndarray) -> SceneReading:
    """Read the background, the objects and (for two) their relation out of an image."""
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    if h != w or h < 4 * BORDER_WIDTH:
        raise ValueError(
            f"expected a square image of at least {4 * BORDER_WIDTH} pixels (sizes and cells are "
            f"fractions of its side), got {w}x{h}"
        )
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER_WIDTH:-BORDER_WIDTH, BORDER_WIDTH:-BORDER_WIDTH] = False
    background_rgb = np.median(rgb[ring], axis=0)
    smooth = _box3(rgb)
    distance = np.linalg.norm(smooth - background_rgb, axis=2)
    labels, count = label_components(distance > DETECTION_DISTANCE)
    sizes = np.bincount(labels[labels >= 0], minlength=count)
    keep = [i for i in range(count) if sizes[i] >= MIN_OBJECT_FRACTION * _SMALLEST_AREA * h * w]
    objects = []
    for i in keep:
        others = (labels >= 0) & (labels != i)
        objects.append(_read_object(rgb, smooth, distance, labels == i, others, background_rgb))
    relation = None
    if len(objects) == 2:
        relation = (0, relation_between(objects[0].centroid, objects[1].centroid), 1)
    return SceneReading(
        background=_nearest(background_rgb, _BACKGROUND_RGB),
        background_rgb=tuple(float(v) for v in background_rgb),
        objects=tuple(objects),
        relation=relation,
    )


def _object_agreement(wanted, seen: ObjectReading | None) -> int:
    if seen is None:
        return 0
    return sum(
        (
            wanted.kind == seen.shape,
            wanted.colour == seen.colour,
            wanted.size in (None, seen.size),
            wanted.position in (None, seen.position),
        )
    )


def matches(scene: Scene, reading: SceneReading) -> dict[str, bool]:
    """Per attribute the scene states, whether the reading agrees.

    Keys: "count", "shape", "colour", "background" (when stated), "size" and "position" (when
    any object states one), "relation" (two-object scenes). Scene objects are paired with
    the read objects in the order that agrees best; a missing object fails its attributes.
    """
    wanted, seen = scene.objects, reading.objects
    candidates = list(seen) + [None] * max(0, len(wanted) - len(seen))  # None stands in for a missing object
    order = max(
        itertools.permutations(range(len(candidates)), len(wanted)),
        key=lambda order: sum(_object_agreement(o, candidates[j]) for o, j in zip(wanted, order)),
    )
    pairs = [(o, candidates[j]) for o, j in zip(wanted, order)]
    result = {
        "count": len(seen) == len(wanted),
        "shape": all(s is not None and o.kind == s.shape for o, s in pairs),
        "colour": all(s is not None and o.colour == s.colour for o, s in pairs),
    }
    if scene.background is not None:
        result["background"] = scene.background == reading.background
    if any(o.size is not None for o in wanted):
        result["size"] = all(o.size is None or (s is not None and o.size == s.size) for o, s in pairs)
    if any(o.position is not None for o in wanted):
        result["position"] = all(o.position is None or (s is not None and o.position == s.position) for o, s in pairs)
    if scene.relation is not None:
        a, rel, b = scene.relation
        found_a, found_b = pairs[a][1], pairs[b][1]
        result["relation"] = (
            found_a is not None and found_b is not None and relation_between(found_a.centroid, found_b.centroid) == rel
        )
    return result


def all_correct(scene: Scene, reading: SceneReading) -> bool:
    """Every attribute the scene states was read back from the image."""
    return all(matches(scene, reading).values())
