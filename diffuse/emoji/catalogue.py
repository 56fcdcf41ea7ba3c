"""The emoji a data folder holds (written by `diffuse data emoji`): one record per picture.

A data folder holds catalogue.json (the records, in the source's order), the 64 px RGBA
pictures under one folder per set, and SOURCES.json with the pinned downloads, their
hashes and their licences. The pictures are never committed to the repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

CATALOGUE_FILE = "catalogue.json"
SOURCES_FILE = "SOURCES.json"
PICTURE_SIZE = 64

# The categories the model is judged on (the others, people, smileys, symbols and flags, are
# mostly faces, hands and signs that differ in details a 64 px image hardly holds).
EVALUATED_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Objects")


@dataclass(frozen=True)
class Emoji:
    name: str  # what a caption calls it, lower case: "dog face", "police car"
    short_names: tuple[str, ...]  # the source's short names: ("dog",)
    category: str  # "Animals & Nature"
    subcategory: str  # "animal-mammal"
    unified: str  # its code points: "1F436"
    image: str  # path of its picture inside the data folder: "google/1f436.png"
    set: str = "google"  # which drawing set the picture comes from


def load_catalogue(folder: str | Path) -> list[Emoji]:
    """The records of a data folder; a one-line ValueError naming the file if it is missing or malformed."""
    path = Path(folder) / CATALOGUE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no emoji catalogue here (make one with `diffuse data emoji --out {folder}`)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        emoji = [Emoji(**{**r, "short_names": tuple(r["short_names"])}) for r in records]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not an emoji catalogue ({e})") from None
    if not emoji:
        raise ValueError(f"{path}: the catalogue is empty")
    return emoji


def picture(folder: str | Path, emoji: Emoji) -> Image.Image:
    """An emoji's picture as a PICTURE_SIZE x PICTURE_SIZE RGBA image."""
    path = Path(folder) / emoji.image
    with Image.open(path) as image:
        image = image.convert("RGBA")
    if image.size != (PICTURE_SIZE, PICTURE_SIZE):
        image = image.resize((PICTURE_SIZE, PICTURE_SIZE), Image.Resampling.LANCZOS)
    return image
