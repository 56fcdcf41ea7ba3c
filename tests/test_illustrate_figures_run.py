"""The figures of one recorded run carry the run's own numbers: the decoded step latents are what the
step callback saw, decoded; the schedule is the scheduler's; each caption states the run's values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffuse
from diffuse.illustrate.figure import model_schedule
from diffuse.illustrate.figures_run import MAKERS, decode_steps
from diffuse.illustrate.figures_run_guidance import upsampled_maps
from diffuse.illustrate.figures_run_steps import decode_plan, schedule_curves, spread, step_changes
from diffuse.illustrate.figures_run_text import shape_text, token_label
from diffuse.illustrate.record import record

MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
PROMPT = "a red circle and a blue square"
RUN = dict(seed=3, steps=6, sampler="Euler", cfg_scale=7.5)


@pytest.fixture(scope="module")
def pipe():
    return diffuse.load_pipeline(MODEL)


@pytest.fixture(scope="module")
def rec(pipe):
    return record(pipe, PROMPT, **RUN)


@pytest.fixture(scope="module")
def seen(pipe):
    """The same request run plainly, its steps as an independent callback sees them."""
    steps = []
    pipe.txt2img(
        PROMPT, seed=RUN["seed"], steps=RUN["steps"], sampler=RUN["sampler"], guidance_scale=RUN["cfg_scale"],
        callback=steps.append,
    )  # fmt: skip
    return steps


def pixels(pipe, latents: torch.Tensor) -> np.ndarray:
    """The pipeline's own decode of latents [1, C, h, w], as [H, W, 3] in [0, 1]."""
    return (pipe.decode_latents(latents) * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def made(pipe, rec, out: Path, kind: str):
    figure = MAKERS[kind](pipe, rec, out)
    assert figure.kind == kind
    path = out / figure.file
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 50
    json.dumps(figure.as_json())  # report.json takes its numbers as they are
    return figure


def test_the_makers_in_the_issues_order():
    assert list(MAKERS) == [
        "components",
        "tokens",
        "embeddings",
        "vector",
        "steps",
        "schedule",
        "guidance",
        "attention",
    ]


def test_decoded_steps_equal_the_callbacks_latents_decoded(pipe, rec, seen):
    decoded = decode_steps(pipe, rec)
    assert len(decoded) == len(seen) == RUN["steps"]
    for image, step in zip(decoded, seen):
        np.testing.assert_array_equal(image, pixels(pipe, step.latents))
    assert [len(x) for x in decode_steps(pipe, rec, [0, 5])] == [decoded[0].shape[0], decoded[5].shape[0]]
    np.testing.assert_array_equal(decode_steps(pipe, rec, [4])[0], decoded[4])


def test_steps_figure_states_the_change_between_decoded_steps(pipe, rec, seen, tmp_path):
    figure = made(pipe, rec, tmp_path, "steps")
    images = [pixels(pipe, step.latents) for step in seen]
    expected = [float(np.abs(b - a).mean()) for a, b in zip(images, images[1:])]
    assert figure.numbers["change"] == pytest.approx(expected, rel=1e-6)
    assert figure.numbers["change_into_steps"] == list(range(2, RUN["steps"] + 1))
    assert figure.numbers["shown_steps"] == list(range(1, RUN["steps"] + 1)) and figure.numbers["every_step_decoded"]
    most = int(np.argmax(expected))
    assert f"changed most into step {most + 2} (mean |Δ| {expected[most]:.3f}" in figure.caption
    assert f"All {RUN['steps']} steps of Euler" in figure.caption


def test_steps_at_sd15_size_decode_at_most_eight_latents(pipe, rec, tmp_path, monkeypatch):
    large = replace(rec, width=512, height=512, step_records=[replace(rec.step_records[0], index=i) for i in range(20)])
    assert decode_plan(large, 20) == ([0, 6, 13, 19], False)
    calls = []
    decode = pipe.decode_latents
    monkeypatch.setattr(pipe, "decode_latents", lambda z, *a: calls.append(z) or decode(z, *a))
    figure = MAKERS["steps"](pipe, large, tmp_path)
    assert len(calls) == 8
    assert figure.numbers["shown_steps"] == [1, 7, 14, 20] and not figure.numbers["every_step_decoded"]
    assert "4 of 20 steps" in figure.caption and "8 VAE decodes at 512x512" in figure.caption


def test_spread_keeps_the_ends_and_the_count():
    assert spread(5, 20) == [0, 1, 2, 3, 4]
    assert spread(30, 20)[0] == 0 and spread(30, 20)[-1] == 29 and len(spread(30, 20)) == 20
    assert spread(9, 1) == [8]
    assert step_changes([np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.5), np.full((2, 2, 3), 0.25)]) == [0.5, 0.25]


def test_schedule_values_equal_the_schedulers(pipe, rec, seen, tmp_path):
    from diffusers import EulerDiscreteScheduler

    reference = EulerDiscreteScheduler.from_pretrained(MODEL / "scheduler")
    reference.set_timesteps(RUN["steps"])
    t, abar, sigma = schedule_curves(model_schedule(pipe))
    np.testing.assert_allclose(abar, reference.alphas_cumprod.numpy(), rtol=1e-6)
    np.testing.assert_allclose(sigma, ((1 - abar) / abar) ** 0.5, rtol=1e-6)
    assert len(t) == reference.config.num_train_timesteps
    figure = made(pipe, rec, tmp_path, "schedule")
    assert figure.numbers["visited_timesteps"] == [s.timestep for s in seen] == reference.timesteps.tolist()
    np.testing.assert_allclose(figure.numbers["visited_sigmas"], reference.sigmas[:-1].numpy(), rtol=1e-5)
    np.testing.assert_allclose(figure.numbers["visited_alpha_bar"], 1 / (1 + reference.sigmas[:-1].numpy() ** 2))
    assert f"ᾱ falls from {abar[0]:.4f} to {abar[-1]:.4f}" in figure.caption
    assert f"visited t = {', '.join(f'{s.timestep:g}' for s in seen)}" in figure.caption


def test_components_figure_states_shapes_and_times(pipe, rec, tmp_path):
    figure = made(pipe, rec, tmp_path, "components")
    width = pipe.config.text_encoder.width
    for shape in ([1, 77], [1, 77, width], [1, 4, 8, 8], [1, 3, 64, 64]):
        assert shape_text(shape) in figure.caption
    assert f"{RUN['steps']} steps of Euler" in figure.caption
    assert figure.numbers["timings"] == rec.timings and figure.numbers["shapes"] == rec.shapes
    assert figure.numbers["seconds_per_step"] == pytest.approx(rec.timings["unet"] / RUN["steps"])


def test_tokens_figure_lists_the_prompts_tokens_and_padding(pipe, rec, tmp_path):
    figure = made(pipe, rec, tmp_path, "tokens")
    ids = pipe.tokenizer(PROMPT)[0].tolist()
    assert figure.numbers["ids"] == ids and figure.numbers["prompt_length"] == 7
    assert figure.numbers["padding"] == 77 - 9 and figure.numbers["pad_id"] == pipe.tokenizer.pad_token_id
    for word, token_id in zip(PROMPT.split(), ids[1:]):
        assert f"{word} ({token_id})" in figure.caption
    assert "the other 68 of the 77 positions are padding" in figure.caption
    assert token_label("circle</w>") == "circle"


def test_embeddings_figure_states_the_ranges_it_draws(pipe, rec, tmp_path):
    figure = made(pipe, rec, tmp_path, "embeddings")
    rows = rec.text.prompt_length + 2
    table = pipe.text_encoder.embeddings.token_embedding.weight.float()[rec.text.ids[:rows]]
    assert figure.numbers["token_embedding_range"] == pytest.approx([table.min().item(), table.max().item()])
    context = pipe.encode_prompt(PROMPT).float()[0, :rows]
    assert figure.numbers["output_range"] == pytest.approx([context.min().item(), context.max().item()], abs=1e-5)
    assert figure.numbers["positions"] == 9 and figure.numbers["channels_shown"] == pipe.config.text_encoder.width
    assert f"from {table.min().item():.2f} to {table.max().item():.2f}" in figure.caption


def test_guidance_figure_states_its_steps_and_scale(pipe, rec, tmp_path):
    figure = made(pipe, rec, tmp_path, "guidance")
    assert figure.numbers["guidance_steps"] == [1, 4, 6] and figure.numbers["scale"] == 7.5
    guided = [s.guidance for s in rec.step_records if s.guidance is not None]
    expected = [float((g.cond - g.uncond).abs().mean()) for g in guided]
    assert figure.numbers["mean_abs_difference"] == pytest.approx(expected)
    assert "guidance scale 7.5" in figure.caption and f"{expected[0]:.4f} at step 1" in figure.caption


def test_attention_figure_titles_each_prompt_token(pipe, rec, tmp_path):
    figure = made(pipe, rec, tmp_path, "attention")
    assert [token_label(t) for t in figure.numbers["tokens"]] == PROMPT.split()
    maps = upsampled_maps(rec)
    assert maps.shape == (7, rec.height, rec.width)
    # Bilinear upsampling by a whole factor keeps each map's mean.
    np.testing.assert_allclose(maps.mean((1, 2)), rec.attention.maps.mean((1, 2)), rtol=1e-5)
    assert figure.numbers["peaks"] == pytest.approx(rec.attention.maps.amax((1, 2)).tolist())
    assert f"{rec.attention.layers} layers and {RUN['steps']} steps" in figure.caption


def test_a_run_without_guidance_or_attention_says_so(pipe, tmp_path):
    plain = record(pipe, PROMPT, seed=1, steps=2, sampler="Euler", cfg_scale=1.0, attention=False)
    guidance = made(pipe, plain, tmp_path, "guidance")
    assert "Guidance was off in this run (CFG scale 1)" in guidance.caption
    attention = made(pipe, plain, tmp_path, "attention")
    assert "not recorded" in attention.caption


def test_a_long_prompt_and_a_tall_image(pipe, tmp_path):
    long = " ".join([PROMPT] * 14)  # 98 tokens: two chunks
    tall = record(pipe, long, seed=2, steps=2, sampler="Euler", width=48, height=64, guidance_steps=[1])
    tokens = made(pipe, tall, tmp_path, "tokens")
    assert tokens.caption.startswith("The prompt's first of 2 chunks is 75 tokens")
    assert "no position is left for padding" in tokens.caption and tokens.numbers["padding"] == 0
    attention = made(pipe, tall, tmp_path, "attention")
    assert "upsampled from 6x8 to 48x64" in attention.caption
    assert "to the first 23 of the prompt's 75 tokens" in attention.caption
    assert upsampled_maps(tall).shape == (75, 64, 48)
    assert made(pipe, tall, tmp_path, "guidance").numbers["guidance_steps"] == [2]
