"""The shipped model: it loads through the same path as real checkpoints, fits its size budget,
and follows the prompt in what it reliably learned (the background; see models/README.md for
the measured adherence of everything else)."""

from pathlib import Path

import numpy as np
import pytest

from diffuse.cli import DEFAULT_MODEL
from diffuse.loader import load_pipeline
from diffuse.shapes.analyze import analyze

pytestmark = pytest.mark.skipif(not Path(DEFAULT_MODEL).is_dir(), reason="the default model is not in this checkout")


def test_default_model_fits_the_size_budget():
    total = sum(path.stat().st_size for path in Path(DEFAULT_MODEL).rglob("*") if path.is_file())
    assert total <= 60e6, total


def test_default_model_draws_the_background_the_prompt_asks_for():
    pipe = load_pipeline(DEFAULT_MODEL)  # as users get it: dtype "auto"
    assert pipe.config.image_size == 64
    backgrounds = ["white", "black", "gray", "beige"]
    prompts = [f"a large yellow square in the center on a {bg} background" for bg in backgrounds]
    result = pipe.txt2img(prompts, width=64, height=64, steps=20, guidance_scale=7.5, sampler="Euler a", seed=0)
    assert [analyze(image).background for image in result.images] == backgrounds
    again = pipe.txt2img(prompts, width=64, height=64, steps=20, guidance_scale=7.5, sampler="Euler a", seed=0)
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in result.images]  # a seed reproduces its images


def test_image_of_a_seed_barely_depends_on_the_batch_in_float32():
    # Image i keeps its own seed's noise in any batch; the GEMMs may still round differently at
    # another batch size (float32: up to 1/255; bf16 on AMX: up to 23/255), hence a PNG records its batch.
    pipe = load_pipeline(DEFAULT_MODEL, dtype="float32")
    prompts = ["a red circle on a white background", "a blue star on a black background"]
    batch = pipe.txt2img(prompts, width=64, height=64, steps=8, guidance_scale=4, sampler="Euler a", seed=3)
    alone = pipe.txt2img(prompts[1:], width=64, height=64, steps=8, guidance_scale=4, sampler="Euler a", seed=4)
    difference = np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(batch.images[1], dtype=int))
    assert difference.max() <= 1, difference.max()


def test_info_reports_the_default_model(capsys):
    from diffuse.cli import main

    assert main(["info", str(DEFAULT_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "width 128" in out and "4 latent channels" in out
