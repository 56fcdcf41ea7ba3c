"""Fake emoji data folders for the tests: a catalogue.json and one picture per record, drawn by the test."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from diffuse.emoji.catalogue import CATALOGUE_FILE


def write_catalogue(folder: Path, pictures: dict[str, tuple[str, Image.Image]]) -> Path:
    """A data folder holding `pictures` (name -> (category, 64 px RGBA picture)), in the catalogue's layout."""
    (folder / "google").mkdir(parents=True)
    records = []
    for i, (name, (category, picture)) in enumerate(pictures.items()):
        image = f"google/{i:04x}.png"
        picture.save(folder / image)
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
    return folder
