"""`diffuse illustrate` on the tiny random SDXL base: both text encoders, the vector conditioning y
and every figure, from one recorded run that draws the image a plain run draws."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_sdxl_pipeline import ours
from test_sdxl_refiner import refiner

import diffuse
from diffuse.illustrate.figures_run_vector import read_back, vector
from diffuse.illustrate.record import record
from diffuse.models.unet import timestep_embedding

__all__ = ["ours", "refiner"]  # fixtures

PROMPT = "a red squirrel eating a burger"


def test_a_recorded_sdxl_run_holds_both_encoders_and_y_as_the_unet_got_them(ours, tmp_path):
    rec = record(ours, PROMPT, seed=3, steps=3, width=64, height=48, attention=False)
    plain = ours.generate(diffuse.GenerationRequest(PROMPT, seed=3, steps=3, width=64, height=48)).images[0]
    assert np.array_equal(np.asarray(rec.image), np.asarray(plain))  # the hooks only read
    assert rec.text.ids == ours.tokenizer(PROMPT)[0].tolist()
    assert rec.text_2.ids == ours.tokenizer_2(PROMPT)[0].tolist() and rec.text_2.ids[-1] == 0  # bigG pads with 0
    context, y = ours.unet_conditioning(PROMPT, width=64, height=48)
    width = ours.config.text_encoder.width
    torch.testing.assert_close(rec.text.output, context[0, :, :width].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.text_2.output, context[0, :, width:].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.vector, y[0].float(), atol=1e-5, rtol=0)
    assert rec.shapes["vector"] == [1, 72] and rec.shapes["context"] == [1, 77, 72]

    figure = vector(ours, rec, tmp_path)
    assert figure.numbers["scalars"] == {
        "original height": 48,
        "original width": 64,
        "crop top": 0,
        "crop left": 0,
        "target height": 48,
        "target width": 64,
    }
    assert figure.numbers["pooled_width"] == 24 and "original height = 48" in figure.caption


def test_a_sinusoid_is_read_back_only_when_it_encodes_one_value():
    for value in (0.0, 6.0, 1024.0, 2.5):
        assert read_back(timestep_embedding(torch.tensor([value]), 256)[0]) == value
    assert read_back(torch.rand(256)) is None


def test_illustrate_draws_every_figure_of_an_sdxl_model(sdxl_folder, tmp_path, capsys):
    from diffuse.cli import main

    out = tmp_path / "report"
    assert main(["illustrate", PROMPT, "--model", str(sdxl_folder), "--out", str(out), "--steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [f for f in report["figures"] if "error" in f] == []
    captions = {f["kind"]: f["caption"] for f in report["figures"]}
    assert "2 text encoders" in captions["components"] and "vector y [1, 72]" in captions["components"]
    assert "pads with id 0" in captions["tokens"] and "text encoder 2 over all 40 channels" in captions["embeddings"]
    assert "zeros in place of the empty prompt" in captions["guidance"]
    assert "each told the timestep with the vector y [72], embedded, added to it" in captions["unet"]
    assert "last text encoder's projected end-of-text states" in captions["clip_similarity"]
    assert all((out / f["file"]).is_file() for f in report["figures"])


def test_the_refiner_is_illustrated_with_big_g_alone_and_its_aesthetic_score(refiner, tmp_path):
    from diffuse.illustrate import illustrate

    kinds = ["components", "tokens", "vector", "guidance", "unet"]  # those that differ from the base's
    report = illustrate(refiner, PROMPT, out=tmp_path / "report", steps=2, seed=1, kinds=kinds)
    assert report.errors == []
    figures = {f["kind"]: f for f in report.report["figures"]}
    assert figures["vector"]["scalars"] == {
        "original height": 64,
        "original width": 64,
        "crop top": 0,
        "crop left": 0,
        "aesthetic score": 6,
    }
    assert "the text encoder turned" in figures["components"]["caption"]
    assert figures["tokens"]["pad_id"] == 0 and "ids_2" not in figures["tokens"]
    assert figures["unet"]["context_shape"] == [77, 40]
