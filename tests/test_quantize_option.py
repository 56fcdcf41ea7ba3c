"""The int8 option's plumbing: `quantize` as load_pipeline, the command line, regenerate and the
server take it, and the "Quantize" field it leaves in a PNG's parameters."""

from __future__ import annotations

from PIL import Image

from diffuse.metadata import info_from_infotext, infotext, parse_infotext, read_parameters, save_png
from diffuse.pipeline import VERSION

RECORD = {
    "prompt": "a red circle",
    "steps": 2,
    "sampler": "Euler a",
    "cfg_scale": 4,
    "seed": 7,
    "width": 64,
    "height": 64,
    "dtype": "bfloat16",
    "device": "cpu",
    "version": VERSION,
}


def test_quantize_is_written_only_when_on_and_reads_back(tmp_path):
    text = infotext({**RECORD, "quantize": "int8"})
    assert "Dtype: bfloat16, Quantize: int8, Device: cpu" in text
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "int8.png", text)
    assert parse_infotext(read_parameters(png))["Quantize"] == "int8"
    assert info_from_infotext(read_parameters(png))["quantize"] == "int8"
    off = infotext({**RECORD, "quantize": None})
    assert "Quantize" not in off and "quantize" not in info_from_infotext(off)
