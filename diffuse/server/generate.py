"""Running one checked request on the loaded pipeline as a queued job, and what it made as A1111 reports it.

A1111 draws batch_size images at a time, n_iter times, image i with seed + i; so does this.
Every sampling step reports to the job (progress, the latest step for previews) and is where
an interrupt takes effect: the images then come from the sampler's current clean estimate,
decoded by the VAE, as A1111 returns what it had when interrupted.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, replace

from PIL import Image

from diffuse.metadata import png_bytes
from diffuse.pipeline import VERSION, Pipeline, Step
from diffuse.preview import to_pil
from diffuse.request import GenerationRequest
from diffuse.server.a1111 import A1111Request
from diffuse.server.jobs import Interrupted, Job


@dataclass
class Generated:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    info: dict  # the first image's generation info (diffuse's keys, as Result.info)
    interrupted: bool = False


def run_request(pipe: Pipeline, request: A1111Request, job: Job, refiner: Pipeline | None = None) -> Generated:
    """Every round of the request, reporting each step to the job; an interrupt ends it with what it had.
    With a `refiner` it takes over at the request's refiner_switch_at; without one there is no switch."""
    generation = request.generation if refiner is not None else replace(request.generation, refiner_switch_at=None)
    total = generation.steps * request.n_iter
    made = Generated([], [], [], {})
    for round_ in range(request.n_iter):
        round_request = replace(generation, seed=generation.seed + round_ * generation.batch_size)
        done_before = round_ * generation.steps

        def on_step(step: Step, done_before: int = done_before) -> None:
            job.step_done(done_before + step.index + 1, total, step)

        try:
            result = pipe.generate(round_request, callback=on_step, refiner=refiner)
        except Interrupted:
            _add(made, _partial(pipe, round_request, job.latest, refiner))
            made.interrupted = True
            return made
        _add(made, Generated(result.images, result.infotexts, result.seeds, result.info))
    return made


def _add(made: Generated, round_made: Generated) -> None:
    made.images += round_made.images
    made.infotexts += round_made.infotexts
    made.seeds += round_made.seeds
    made.info = made.info or round_made.info


def _partial(
    pipe: Pipeline, request: GenerationRequest, step: Step | None, refiner: Pipeline | None = None
) -> Generated:
    """What an interrupted round had: its latest clean estimate, decoded (nothing before the first step);
    a hand-off's latents decode alike by either model's VAE (the refiner's takes the same latents)."""
    if step is None:
        return Generated([], [], [], {}, interrupted=True)
    pixels = pipe.decode_latents(step.denoised)
    images = to_pil(pixels)
    height, width = pixels.shape[-2:]
    # The same info a finished round records, from the one place that builds it.
    info, texts = pipe.describe(replace(request, width=width, height=height, batch_size=len(images)), refiner)
    return Generated(images, texts, [request.seed + i for i in range(len(images))], info, interrupted=True)


def processed_info(request: A1111Request, generated: Generated, model_hash: str | None) -> dict:
    """A1111's Processed.js(), the "info" string's content."""
    generation, info, seeds = request.generation, generated.info, generated.seeds
    return {
        "prompt": generation.prompt,
        "all_prompts": [generation.prompt] * len(seeds),
        "negative_prompt": generation.negative_prompt,
        "all_negative_prompts": [generation.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else generation.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": info.get("width"),
        "height": info.get("height"),
        "sampler_name": info.get("sampler"),
        "cfg_scale": generation.guidance_scale,
        "steps": generation.steps,
        "batch_size": generation.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": info.get("model"),
        "sd_model_hash": info.get("model_hash", model_hash),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": generation.strength if request.kind == "img2img" else None,
        "extra_generation_params": _extra_generation_params(info),
        "index_of_first_image": 0,
        "infotexts": generated.infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": generation.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "interrupted": generated.interrupted,
    }


def _extra_generation_params(info: dict) -> dict:
    """A1111's extra_generation_params: the labels its infotext adds after the fixed ones (diffuse's
    Quantize among them when on)."""
    if not info:
        return {}
    extra = {"Schedule type": info.get("schedule_type")}
    if info.get("refiner") is not None:
        extra.update({"Refiner": info["refiner"], "Refiner switch at": info["refiner_switch_at"]})
    if info.get("quantize") is not None:
        extra["Quantize"] = info["quantize"]
    return extra


def png_base64(image: Image.Image, parameters: str | None) -> str:
    """A PNG carrying its parameters, base64-encoded as A1111's answers hold images."""
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
