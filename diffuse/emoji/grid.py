"""A grid of an evaluation's images for a model card: per evaluated category and kind of prompt,
the first generated images, each with its prompt and what the judge read in it.

A reading is green where the image counts as right (one picture: named, placed and sized as
asked; two pictures: both found, in the asked relation), amber where only part of it is (the
picture named but misplaced, or both found in another relation) and red where the judge found
none of what was asked.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from diffuse.emoji.evaluate import as_reading
from diffuse.metadata import atomic_write

COLOURS = {"right": "#1a7f37", "part": "#b35900", "wrong": "#c62828"}
KIND_TITLES = {"singles": "one picture", "pairs": "two pictures"}


def outcome(kind: str, verdict: dict[str, bool]) -> str:
    """ "right", "part" or "wrong": an image's verdict (evaluate's, per measure) in one word."""
    whole, part = ("all", "named") if kind == "singles" else ("relation", "found")
    return "right" if verdict[whole] else "part" if verdict[part] else "wrong"


def read_text(kind: str, read: list) -> str:
    """What the judge read, as short as a cell allows: the first reading (one picture) or the first two."""
    found = [as_reading(r) for r in read[: 1 if kind == "singles" else 2]]
    if not found:
        return "read: nothing"
    return "read: " + "; ".join(f"{r.name} ({r.position})" for r in found)


def example_grid(results: dict, images: list[Image.Image], path: str | Path, columns: int = 6) -> Path:
    """Write the first `columns` images of each (category, kind) of `results` (evaluate()'s, whose
    "readings" are in the order the images were drawn) as one PNG at `path`, atomically."""
    entries = results["readings"]
    if len(entries) != len(images):
        raise ValueError(f"{len(entries)} readings but {len(images)} images")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    rows: dict[tuple[str, str], list[tuple[dict, Image.Image]]] = {}
    for entry, image in zip(entries, images):
        cells = rows.setdefault((entry["category"], entry["kind"]), [])
        if len(cells) < columns:
            cells.append((entry, image))
    if not rows:
        raise ValueError("the evaluation drew no images")
    figure = Figure(figsize=(1.55 * columns + 1.2, 2.25 * len(rows)), dpi=80)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, ((category, kind), cells) in zip(axes, rows.items()):
        row[0].set_ylabel(f"{category}\n{KIND_TITLES[kind]}", fontsize=8)
        for axis, (entry, image) in zip(row, cells):
            axis.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
            axis.set_title("\n".join(textwrap.wrap(entry["prompt"], 24)[:3]), fontsize=6)
            label = "\n".join(textwrap.wrap(read_text(kind, entry["read"]), 26)[:2])
            axis.set_xlabel(label, fontsize=5.5, color=COLOURS[outcome(kind, entry["verdict"])])
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_frame_on(axis in row[: len(cells)])
    figure.tight_layout()
    return atomic_write(Path(path), lambda f: figure.savefig(f, format="png"))
