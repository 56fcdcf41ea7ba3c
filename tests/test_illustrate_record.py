"""diffuse.illustrate.record: a recorded run is the plain run, and what it keeps is what the parts computed.

Tiny random SD1 and SD2 pipelines (conftest) and the shipped model in its own dtype: the step
latents and image equal an independent run's bit for bit, guidance equals what the sampler used,
each attention map is an average of softmax rows, and no hook outlives the call.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffuse
from diffuse import generation
from diffuse.generation import Step
from diffuse.illustrate.record import cross_attention_layers, layer_grid, record

# The module itself: the package may export the function under the same name.
recorder = importlib.import_module("diffuse.illustrate.record")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipes(reference_folders):
    return {name: diffuse.load_pipeline(folder, dtype="float32") for name, folder in reference_folders.items()}


def plain_run(pipe, **settings) -> tuple[list[Step], diffuse.pipeline.Result]:
    seen: list[Step] = []
    request = diffuse.GenerationRequest(batch_size=1, **settings)
    return seen, pipe.generate(request, seen.append)


def hook_count(pipe) -> int:
    modules = [*pipe.text_encoder.modules(), *pipe.unet.modules(), *pipe.vae.modules()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


@pytest.mark.parametrize("style, size", [("sd1", (64, 64)), ("sd2", (72, 56))])
def test_steps_and_image_are_the_plain_runs(pipes, style, size):
    """A stochastic sampler and odd grids (the tiny VAE's 18x14 latent halves to 9x7 and 5x4): the hooks
    change nothing."""
    pipe, (width, height) = pipes[style], size
    settings = dict(prompt=PROMPT, seed=5, steps=4, sampler="Euler a", guidance_scale=6.0, width=width, height=height)
    rec = record(pipe, PROMPT, seed=5, steps=4, sampler="Euler a", cfg_scale=6.0, width=width, height=height)
    seen, plain = plain_run(pipe, **settings)
    assert len(rec.step_records) == len(seen) == 4
    sigmas = pipe.get_sampler("Euler a").plan(4).sigmas
    for step, kept in zip(seen, rec.step_records):
        assert kept.index == step.index and kept.timestep == step.timestep
        assert torch.equal(kept.latents, step.latents[0]) and torch.equal(kept.denoised, step.denoised[0])
        assert kept.sigma == float(sigmas[step.index]) and kept.seconds > 0
    assert np.array_equal(np.asarray(rec.image), np.asarray(plain.images[0]))
    assert torch.equal(rec.final_latents, seen[-1].latents[0])
    factor = pipe.config.vae.downsample_factor
    latent = [4, height // factor, width // factor]
    context = [1, 77, pipe.config.text_encoder.width]
    assert rec.shapes == {
        "token_ids": [1, 77],
        "context": context,
        "latents": [1, *latent],
        "image": [1, 3, height, width],
    }
    assert (rec.seed, rec.steps, rec.sampler, rec.cfg_scale, rec.width, rec.height) == (
        5,
        4,
        "Euler a",
        6.0,
        width,
        height,
    )
    assert {"text_encoder", "unet", "vae_decode", "total", "attention_maps"} <= set(rec.timings)
    assert all(rec.timings[k] > 0 for k in ("text_encoder", "unet", "vae_decode"))
    assert rec.timings["total"] > rec.timings["unet"] + rec.timings["text_encoder"] + rec.timings["vae_decode"]


def test_text_record_is_what_the_unet_attended_to(pipes, style):
    pipe = pipes[style]
    rec = record(pipe, PROMPT, steps=2, width=64, height=64, attention=False)
    ids = pipe.tokenizer(PROMPT)[0]
    assert rec.text.ids == ids.tolist()
    assert rec.text.tokens[:3] == ["<|startoftext|>", "a</w>", "red</w>"]
    assert rec.text.tokens[rec.text.prompt_length + 1] == "<|endoftext|>"
    assert rec.text.prompt_length == len(pipe.tokenizer.encode(PROMPT)) == 7
    pad = {"sd1": "<|endoftext|>", "sd2": "!"}[style]  # SD2 pads with id 0 after the end token
    assert rec.text.tokens[-1] == pad
    assert torch.equal(rec.text.token_embeddings, pipe.text_encoder.embeddings.token_embedding.weight[ids])
    assert torch.equal(rec.text.output, pipe.encode_prompt(PROMPT)[0])
    assert rec.attention is None


def test_guidance_is_what_the_sampler_used(pipes, monkeypatch):
    pipe = pipes["sd1"]
    used: list[torch.Tensor] = []
    original = generation.NoisePredictor.__call__

    def watched(self, x, t):
        out = original(self, x, t)
        used.append(out[0].clone())
        return out

    monkeypatch.setattr(generation.NoisePredictor, "__call__", watched)
    rec = record(pipe, PROMPT, steps=5, sampler="Euler", cfg_scale=7.0, width=64, height=64)
    assert len(used) == 5  # Euler: one prediction per step
    kept = {s.index: s.guidance for s in rec.step_records if s.guidance is not None}
    assert sorted(kept) == [0, 2, 4]  # first, middle, last
    for i, guidance in kept.items():
        assert guidance.scale == 7.0
        assert torch.equal(guidance.guided, used[i])
        assert torch.allclose(guidance.guided, guidance.uncond + 7.0 * (guidance.cond - guidance.uncond))
        assert not torch.allclose(guidance.cond, guidance.uncond)
    chosen = record(pipe, PROMPT, steps=5, sampler="Euler", width=64, height=64, guidance_steps=[3], attention=False)
    assert [s.index for s in chosen.step_records if s.guidance is not None] == [3]
    with pytest.raises(ValueError, match="guidance step 5"):
        record(pipe, PROMPT, steps=5, width=64, height=64, guidance_steps=[5])


def softmax_map(module, x, context, latent_size) -> torch.Tensor:
    """One layer's map for the conditional image, written out head by head: [77, h, w]."""
    heads = module.heads
    q = module.to_q(x[-1]).reshape(x.shape[1], heads, -1)
    k = module.to_k(context[-1]).reshape(context.shape[1], heads, -1)
    mean = sum(torch.softmax(q[:, h] @ k[:, h].T / q.shape[-1] ** 0.5, dim=-1) for h in range(heads)) / heads
    grid = mean.T.reshape(1, 77, *layer_grid(x.shape[1], latent_size))
    return F.interpolate(grid, size=latent_size, mode="bilinear")[0]


def test_attention_map_is_an_average_of_softmax_rows(pipes, style):
    pipe = pipes[style]
    layers = cross_attention_layers(pipe.unet)
    assert len(layers) == {"sd1": 11, "sd2": 22}[style]  # 2 + 2 down, 1 middle, 3 + 3 up; SD2 two per block
    name = list(layers)[1]
    calls: list[tuple] = []
    hook = layers[name].register_forward_hook(lambda m, args, out: calls.append(args))
    try:
        rec = record(pipe, PROMPT, steps=3, width=72, height=56, attention_layers=[name], attention_steps=[1])
    finally:
        hook.remove()
    full = record(
        pipe, PROMPT, steps=3, width=72, height=56, attention_layers=[name], attention_steps=[1], all_tokens=True
    )
    assert (rec.attention.layers, rec.attention.steps) == (1, 1)
    # The sampler makes one UNet call per step: the second call is step 1's.
    x, context = calls[1]
    latent_size = (56 // pipe.config.vae.downsample_factor, 72 // pipe.config.vae.downsample_factor)
    expected = softmax_map(layers[name], x, context, latent_size)
    assert torch.allclose(full.attention.maps, expected, atol=1e-6)
    assert torch.allclose(full.attention.maps.sum(0), torch.ones(latent_size), atol=1e-5)
    assert full.attention.positions == list(range(77)) and len(full.attention.tokens) == 77
    assert rec.attention.positions == list(range(1, 8))
    assert rec.attention.tokens == ["a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>", "square</w>"]
    assert torch.equal(rec.attention.maps, full.attention.maps[1:8])


def test_all_layers_and_steps_average_to_one(pipes):
    pipe = pipes["sd2"]
    rec = record(pipe, PROMPT, steps=3, width=64, height=64, all_tokens=True)
    assert (rec.attention.layers, rec.attention.steps) == (22, 3)
    assert rec.attention.maps.shape == (77, 16, 16)
    assert torch.allclose(rec.attention.maps.sum(0), torch.ones(16, 16), atol=1e-5)
    assert bool((rec.attention.maps >= 0).all())
    # Without guidance the UNet sees the prompt alone, a batch of 1, and no step keeps guidance.
    unguided = record(pipe, PROMPT, steps=2, width=64, height=64, cfg_scale=1.0, all_tokens=True)
    assert torch.allclose(unguided.attention.maps.sum(0), torch.ones(16, 16), atol=1e-5)
    assert all(s.guidance is None for s in unguided.step_records)


def test_hooks_are_removed_also_after_an_error(pipes, monkeypatch):
    pipe = pipes["sd1"]
    before = hook_count(pipe)
    record(pipe, PROMPT, steps=2, width=64, height=64)
    assert hook_count(pipe) == before

    def fails(self, step, sigmas):
        raise RuntimeError("the callback fails")

    monkeypatch.setattr(recorder._Watch, "step_done", fails)
    with pytest.raises(RuntimeError, match="the callback fails"):
        record(pipe, PROMPT, steps=2, width=64, height=64)
    assert hook_count(pipe) == before


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="the default model is not in this checkout")
def test_shipped_model_in_its_own_dtype():
    """The fast layers runtime.prepare swaps in (bf16 where the CPU has it) are recorded the same way."""
    pipe = diffuse.load_pipeline(DEFAULT_MODEL)
    rec = record(pipe, PROMPT, steps=4, sampler="Euler a", cfg_scale=4.0, all_tokens=True)
    seen, plain = plain_run(pipe, prompt=PROMPT, seed=0, steps=4, sampler="Euler a", guidance_scale=4.0)
    assert all(torch.equal(k.latents, s.latents[0]) for k, s in zip(rec.step_records, seen))
    assert np.array_equal(np.asarray(rec.image), np.asarray(plain.images[0]))
    assert torch.allclose(rec.attention.maps.sum(0), torch.ones(rec.attention.maps.shape[1:]), atol=1e-5)
