"""/outputs and the gallery serve only the images diffuse saved: numbered names past 99999 too,
sorted as numbers; links, other files and other programs' PNGs are skipped, never an error."""

from __future__ import annotations

import io
import os
import urllib.request

import pytest
from PIL import Image
from test_server import Running, settings

from diffuse.metadata import read_parameters, save_png
from diffuse.server.page_routes import remake_fields

OURS = (
    "a red circle\nSteps: 4, Sampler: Euler a, Schedule type: Karras, CFG scale: 3, Seed: {seed}, Size: 8x8, "
    "Model hash: 0123456789, Model: default, Version: diffuse 0.1.0"
)


def ours(seed: int) -> str:
    return OURS.format(seed=seed)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    outputs = root / "outputs"
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    for name, seed in (("00007-1.png", 1), ("99999-4.png", 4), ("100000-5.png", 5), ("00123-6.png", 6)):
        save_png(image, outputs / name, ours(seed))
    save_png(image, root / "elsewhere.png", ours(9))
    os.link(root / "elsewhere.png", outputs / "00010-9.png")  # a hard link to a file outside
    os.link(outputs / "00123-6.png", root / "copy.png")  # ... or from outside: one of ours, linked twice
    (outputs / "00011-9.png").write_text("not an image")
    save_png(image, outputs / "00012-9.png", None)  # a PNG with no parameters
    save_png(image, outputs / "00013-9.png", "a cat\nSteps: 20, Sampler: Euler, Seed: 1, Version: v1.10.1")  # A1111's
    (outputs / "00014-9.png").symlink_to(root / "elsewhere.png")
    (outputs / "00015-9.png").mkdir()
    os.mkfifo(outputs / "00016-9.png")  # would hang a plain open()
    (outputs / "0017-9.png").write_bytes((outputs / "00007-1.png").read_bytes())  # not a numbered_path name
    server = Running(settings(root, outputs=outputs))
    yield server
    server.stop()


def test_only_diffuse_images_are_served(running):
    for name in ("00010-9", "00123-6", "00011-9", "00012-9", "00013-9", "00014-9", "00015-9", "00016-9", "0017-9"):
        status, _, _ = running.call("GET", f"/outputs/{name}.png")
        assert status == 404, name
    for name, seed in (("00007-1", 1), ("99999-4", 4), ("100000-5", 5)):
        with urllib.request.urlopen(f"{running.base}/outputs/{name}.png", timeout=10) as response:
            assert response.headers["Content-Type"] == "image/png"
            assert read_parameters(Image.open(io.BytesIO(response.read()))) == ours(seed)


def test_the_gallery_skips_the_rest_and_sorts_by_number(running):
    status, gallery, _ = running.call("GET", "/diffuse/v1/gallery")
    assert status == 200
    assert [entry["url"] for entry in gallery] == [
        "/outputs/100000-5.png",
        "/outputs/99999-4.png",
        "/outputs/00007-1.png",
    ]
    assert gallery[0]["parameters"] == ours(5)
    assert gallery[0]["fields"] == {
        "prompt": "a red circle",
        "negative_prompt": "",
        "steps": 4,
        "sampler_name": "Euler a",
        "scheduler": "Karras",
        "cfg_scale": 3.0,
        "seed": 5,
        "width": 8,
        "height": 8,
        "model_hash": "0123456789",
        "quantize": None,
    }
    assert [entry["url"] for entry in running.call("GET", "/diffuse/v1/gallery?limit=2")[1]] == [
        "/outputs/100000-5.png",
        "/outputs/99999-4.png",
    ]


def test_make_again_only_what_the_form_can_hold():
    assert remake_fields(ours(3))["seed"] == 3
    assert remake_fields(ours(3))["quantize"] is None
    assert remake_fields(ours(3).replace("Size: 8x8", "Size: 8x8, Quantize: int8"))["quantize"] == "int8"
    assert remake_fields(ours(3).replace("Size: 8x8", "Size: 8x8, Denoising strength: 0.5")) is None  # img2img
    assert remake_fields(ours(3).replace("Size: 8x8", "Size: 8x8, Clip skip: 2")) is None
    assert remake_fields("just a prompt") is None
