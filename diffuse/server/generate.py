"""Running one checked generation request on the loaded pipeline, as a queued job's work.

A1111 draws batch_size images at a time, n_iter times, image i with seed + i; so does this.
Every sampling step reports to the job (progress, the latest step for previews) and is where
an interrupt takes effect: the images then come from the sampler's current clean estimate,
decoded by the VAE, as A1111 returns what it had when interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from diffuse.pipeline import Pipeline, Result, Step
from diffuse.preview import to_pil
from diffuse.server.a1111 import GenerationRequest
from diffuse.server.jobs import Interrupted, Job


@dataclass
class Generated:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    info: dict  # the first image's generation info (diffuse's keys, as Result.info)
    interrupted: bool = False


def run_request(pipe: Pipeline, request: GenerationRequest, job: Job) -> Generated:
    total = request.steps * request.n_iter
    images, infotexts, seeds, info = [], [], [], {}
    for round_ in range(request.n_iter):
        seed = request.seed + round_ * request.batch_size
        done_before = round_ * request.steps

        def on_step(step: Step) -> None:
            job.step_done(done_before + step.index + 1, total, step)

        try:
            result = _draw(pipe, request, seed, on_step)
        except Interrupted:
            partial = _partial(pipe, request, seed, job.latest)
            images += partial.images
            infotexts += partial.infotexts
            seeds += partial.seeds
            return Generated(images, infotexts, seeds, info or partial.info, interrupted=True)
        images += result.images
        infotexts += result.infotexts
        seeds += result.seeds
        info = info or result.info
    return Generated(images, infotexts, seeds, info)


def _draw(pipe: Pipeline, request: GenerationRequest, seed: int, on_step) -> Result:
    common = dict(negative_prompt=request.negative_prompt, width=request.width, height=request.height,
                  steps=request.steps, guidance_scale=request.cfg_scale, sampler=request.sampler,
                  schedule_type=request.schedule_type, seed=seed, batch_size=request.batch_size,
                  clip_skip=request.clip_skip, eta=request.eta, callback=on_step, speedups=request.speedups)
    if request.init_image is None:
        return pipe.txt2img(request.prompt, **common)
    if request.mask is not None:
        return pipe.inpaint(request.init_image, request.mask, request.prompt, strength=request.denoising_strength,
                            **common)
    return pipe.img2img(request.init_image, request.prompt, strength=request.denoising_strength, **common)


def _partial(pipe: Pipeline, request: GenerationRequest, seed: int, step: Step | None) -> Generated:
    """What an interrupted round had: its latest clean estimate, decoded (nothing before the first step)."""
    if step is None:
        return Generated([], [], [], {}, interrupted=True)
    pixels = pipe.decode_latents(step.denoised)
    images = to_pil(pixels)
    height, width = pixels.shape[-2:]
    # The same info a finished round records, from the one place that builds it.
    info, texts = pipe.describe(
        request.prompt, request.negative_prompt, width=width, height=height, steps=request.steps,
        guidance_scale=request.cfg_scale, sampler=request.sampler, schedule_type=request.schedule_type, seed=seed,
        batch_size=len(images), clip_skip=request.clip_skip, eta=request.eta, speedups=request.speedups,
        strength=request.denoising_strength if request.init_image is not None else 1.0, image=request.init_image,
        mask=request.mask if request.init_image is not None else None)
    return Generated(images, texts, [seed + i for i in range(len(images))], info, interrupted=True)
