"""AUTOMATIC1111's /sdapi/v1 routes: generation, progress, interrupt, models, options and PNG info.

A generation waits for its answer on the request itself; its client going away cancels the
job (state.Server.generate). The answer's bodies are built as A1111's clients read them
(generate.processed_info, generate.png_base64).
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch
from fastapi import FastAPI, Request

from diffuse.metadata import PARAMETERS_KEY, parse_infotext, read_parameters
from diffuse.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, sampler_aliases
from diffuse.server.a1111 import A1111Request, RequestError, decode_image, read_generation
from diffuse.server.generate import png_base64, processed_info
from diffuse.server.state import Server, read_json


def add_a1111_routes(app: FastAPI, server: Server) -> None:
    _add_generation_routes(app, server)
    _add_model_routes(app, server)
    _add_listing_routes(app, server)


def _add_generation_routes(app: FastAPI, server: Server) -> None:
    limits = server.settings.limits

    @app.post("/sdapi/v1/txt2img", tags=["A1111"])
    async def txt2img(request: Request) -> dict:
        return await _generation(server, read_generation("txt2img", await read_json(request), limits), request)

    @app.post("/sdapi/v1/img2img", tags=["A1111"])
    async def img2img(request: Request) -> dict:
        return await _generation(server, read_generation("img2img", await read_json(request), limits), request)

    @app.get("/sdapi/v1/progress", tags=["A1111"])
    def progress(skip_current_image: bool = False) -> dict:
        return progress_report(server, with_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    def interrupt() -> dict:
        job = server.queue.interrupt()
        # A1111 answers {}; the extra keys say which job, if any, was asked to stop.
        return {"interrupted": job is not None, "job": None if job is None else job.id}


def _add_model_routes(app: FastAPI, server: Server) -> None:
    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    def sd_models() -> list[dict]:
        return [
            {
                "title": e.title,
                "model_name": e.name,
                "hash": e.short_hash,
                "sha256": None,
                "filename": str(e.path),
                "config": None,
            }
            for e in server.host.entries
        ]

    @app.get("/sdapi/v1/options", tags=["A1111"])
    def get_options() -> dict:
        current = server.host.current
        return {
            "sd_model_checkpoint": current.title,
            "sd_checkpoint_hash": server.host.sha256(current),
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "samples_format": "png",
            "enable_pnginfo": True,
            "show_progress_every_n_steps": 1,
        }

    @app.post("/sdapi/v1/options", tags=["A1111"])
    async def set_options(request: Request) -> None:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise RequestError("body", "must be an object of setting names and values")
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            if not isinstance(wanted, str):
                raise RequestError("sd_model_checkpoint", f"must be a model title or name, got {wanted!r}")
            await server.switch_model(wanted)


def _add_listing_routes(app: FastAPI, server: Server) -> None:
    limits = server.settings.limits

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": list(sampler_aliases(name)), "options": {}} for name in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    def schedulers() -> list[dict]:
        rho = {"Karras": 7.0}
        return [
            {
                "name": label.lower(),
                "label": label,
                "aliases": None,
                "default_rho": rho.get(label, -1),
                "need_inner_model": False,
            }
            for label in SCHEDULE_TYPES
        ]

    @app.get("/sdapi/v1/scripts", tags=["A1111"])
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}  # diffuse runs no A1111 scripts

    @app.post("/sdapi/v1/png-info", tags=["A1111"])
    async def png_info(request: Request) -> dict:
        body = await read_json(request)
        image = decode_image(body.get("image") if isinstance(body, dict) else None, "image", limits)
        text = read_parameters(image)
        items = {key: value for key, value in image.info.items() if isinstance(value, str) and key != PARAMETERS_KEY}
        return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}

    @app.get("/sdapi/v1/memory", tags=["A1111"])
    def memory() -> dict:
        return memory_report()


async def _generation(server: Server, request: A1111Request, client: Request) -> dict:
    generated = await server.generate(request, client)
    images = [png_base64(image, text) for image, text in zip(generated.images, generated.infotexts)]
    return {
        "images": images if request.send_images else [],
        "parameters": request.echo,
        "info": json.dumps(processed_info(request, generated, server.host.current.short_hash)),
    }


def progress_report(server: Server, with_image: bool = True) -> dict:
    """A1111's /progress: idle is progress 0 and job_count 0, which clients wait for."""
    job = server.queue.current()
    waiting = server.queue.waiting()
    if job is None:
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": waiting,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    fraction = job.step / job.total_steps if job.total_steps else 0.0
    state = {
        "skipped": False,
        "interrupted": job.stop_requested,
        "stopping_generation": job.stop_requested,
        "job": job.kind,
        "job_count": waiting + 1,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "job_no": job.number,
        "sampling_step": job.step,
        "sampling_steps": job.total_steps,
        "job_id": job.id,
    }
    image = None
    step = job.latest
    if with_image and step is not None:
        image = png_base64(step.preview()[0], None)
    return {
        "progress": fraction,
        "eta_relative": job.eta(),
        "state": state,
        "current_image": image,
        "textinfo": f"step {job.step} of {job.total_steps}",
    }


def memory_report() -> dict:
    """The process's peak resident memory and the machine's RAM; the GPU's allocations when there is one."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports kilobytes
    ram = {"peak_resident_bytes": peak_kb * 1024, "total": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}
    cuda = (
        {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
        if torch.cuda.is_available()
        else {"error": "no GPU"}
    )
    return {"ram": ram, "cuda": cuda}
