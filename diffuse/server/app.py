"""The HTTP server: AUTOMATIC1111's /sdapi/v1 routes, diffuse's own for the web page, and the page.

    create_app(settings) -> an ASGI app (FastAPI, wrapped in guard.Guard)

Generation requests become jobs on one queue (jobs.JobQueue) and run one at a time on the
loaded model; switching the model is a job too, so it never happens under a running
generation. A1111 clients wait for their answer on the request itself; the page submits a
job, gets its id at once, and follows it as server-sent events (page_routes).

An A1111 client that goes away (closes its connection) before its answer takes its job with
it: a waiting job leaves the queue and frees its place, a running one stops after its current
step and nothing is returned or kept. A request's body is parsed once (read_json) and then
dropped: a queued job keeps only the fields diffuse uses and its decoded images, which count
against the server's memory budget (guard.MemoryBudget) until the job ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from diffuse.metadata import PARAMETERS_KEY, parse_infotext, png_bytes, read_parameters
from diffuse.numerics import NonFiniteError
from diffuse.pipeline import VERSION
from diffuse.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, sampler_aliases
from diffuse.server.a1111 import GenerationRequest, Limits, RequestError, decode_image, read_generation
from diffuse.server.generate import Generated, run_request
from diffuse.server.guard import RELEASE_BODY, RETRY_AFTER_S, Guard, MemoryBudget, OverBudget
from diffuse.server.jobs import Job, JobQueue, QueueFull
from diffuse.server.models import ModelHost, UnknownModel
from diffuse.server.origin import OriginRules


@dataclass
class ServerSettings:
    model: Path
    models_dir: Path | None = None
    outputs: Path = Path("outputs")
    credentials: tuple[str, str] | None = None
    limits: Limits = field(default_factory=Limits)
    queue_capacity: int = 16  # jobs waiting behind the running one
    max_body_bytes: int = 32 * 1024 * 1024
    # Bodies being read plus images held by queued jobs, in total (guard.MemoryBudget).
    request_memory_bytes: int = 256 * 1024 * 1024
    dtype: str = "auto"
    device: str = "cpu"
    bound_host: str = "127.0.0.1"  # the address the server listens on: a Host it answers to
    allow_hosts: tuple[str, ...] = ()  # more names it answers to (--allow-host)
    cors_allow_origins: tuple[str, ...] = ()  # other web pages' origins that may use it (--cors-allow-origins)


class ClientGone(Exception):
    """The client closed its connection before its job's answer was ready."""


class Server:
    """What the routes share: the models, the queue, the settings."""

    def __init__(self, settings: ServerSettings, host: ModelHost, budget: MemoryBudget | None = None) -> None:
        self.settings, self.host = settings, host
        self.budget = budget or MemoryBudget(settings.request_memory_bytes)
        self.queue = JobQueue(settings.queue_capacity)
        self.jobs: dict[str, Job] = {}  # the page's jobs by id, the latest few hundred

    def submit(self, request: GenerationRequest, finish=lambda generated: generated) -> Job:
        """Queue the request; its job returns finish(the Generated images). The request's own model,
        if it names one, is loaded in the same job, so no other job runs on it by mistake."""
        if request.model is not None:
            self.host.find(request.model)  # unknown: an error now, not after the queue
        self.host.pipe.get_sampler(request.sampler, request.schedule_type)  # an unknown sampler: 422 now
        held = self.budget.reserve(held_image_bytes(request))
        if held is None:
            raise OverBudget(self.budget.refusal("this request's images"))

        def work(job: Job):
            generated = self.host.run_on(request.model, request.restore_model,
                                         lambda pipe: run_request(pipe, request, job))
            return finish(generated)

        try:
            job = self.queue.submit(request.kind, work)
        except QueueFull:
            held.release()
            raise
        job.future.add_done_callback(lambda _: held.release())
        return job

    async def generate(self, request: GenerationRequest, client: Request) -> Generated:
        """Queue the request and wait for its images; if the client goes away first, its job is
        cancelled (see jobs.JobQueue.cancel) and ClientGone raised."""
        job = self.submit(request)
        answer = asyncio.wrap_future(job.future)
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # never "not retrieved"
        gone = asyncio.ensure_future(_disconnected(client))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not answer.done():
            self.queue.cancel(job)
            raise ClientGone(f"job {job.id} was cancelled: its client went away")
        return answer.result()

    async def switch_model(self, wanted: str) -> None:
        self.host.find(wanted)  # unknown: an error now, not after the queue
        job = self.queue.submit("load model", lambda job: self.host.switch(wanted))
        await asyncio.wrap_future(job.future)


async def _disconnected(client: Request) -> None:
    """Returns once the client has closed its connection (ASGI's http.disconnect)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass


def held_image_bytes(request: GenerationRequest) -> int:
    """The memory a queued request's decoded images take: PIL keeps 1 byte per pixel for
    greyscale and palette images, 4 for the rest (RGB included)."""
    images = [image for image in (request.init_image, request.mask) if image is not None]
    return sum(image.width * image.height * (1 if image.mode in ("1", "L", "P") else 4) for image in images)


async def read_json(request: Request) -> Any:
    """The request's JSON body, parsed once and not kept: the Guard stops counting its bytes here."""
    body = b"".join([chunk async for chunk in request.stream()])
    try:
        return json.loads(body)
    finally:
        del body
        release = request.scope.get(RELEASE_BODY)
        if release is not None:
            release()


def create_app(settings: ServerSettings, host: ModelHost | None = None) -> Guard:
    from diffuse.server.models import find_models
    from diffuse.server.page_routes import add_page_routes

    rules = OriginRules.create(settings.bound_host, list(settings.allow_hosts), list(settings.cors_allow_origins))
    if settings.request_memory_bytes < settings.max_body_bytes:
        raise ValueError(f"--request-memory ({settings.request_memory_bytes / 2**20:g} MB) must hold at least one "
                         f"whole body ({settings.max_body_bytes / 2**20:g} MB)")
    budget = MemoryBudget(settings.request_memory_bytes)
    host = host or ModelHost(find_models(settings.model, settings.models_dir), settings.dtype, settings.device)
    server = Server(settings, host, budget)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.queue.close()  # the running job finishes; waiting ones are cancelled

    app = FastAPI(title="diffuse", version=VERSION.split()[-1], lifespan=lifespan,
                  description="Stable Diffusion from its parts: an AUTOMATIC1111-compatible API and a web page.")
    app.state.server = server

    @app.exception_handler(RequestError)
    async def bad_request(_: Request, error: RequestError) -> JSONResponse:
        return _error(422, error, field=error.field)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, error: ValueError) -> JSONResponse:
        return _error(422, error)

    @app.exception_handler(NonFiniteError)
    async def non_finite(_: Request, error: NonFiniteError) -> JSONResponse:
        return _error(500, error)  # the model failed, not the request: an error, never a black image

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, error: QueueFull) -> JSONResponse:
        return _error(503, error, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(OverBudget)
    async def over_budget(_: Request, error: OverBudget) -> JSONResponse:
        return _error(503, error, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, error: ClientGone) -> JSONResponse:
        return _error(499, error)  # nginx's "client closed request": nobody reads it, the log says why

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, error: UnknownModel) -> JSONResponse:
        return _error(404, error)

    add_a1111_routes(app, server)
    add_page_routes(app, server)
    return Guard(app, credentials=settings.credentials, max_body_bytes=settings.max_body_bytes, rules=rules,
                 budget=budget)


def _error(status: int, error: Exception, headers: dict | None = None, **extra) -> JSONResponse:
    # A1111's error shape: {"error": exception type, "detail": message, ...}.
    message = str(error.args[0]) if isinstance(error, LookupError) and error.args else str(error)
    return JSONResponse({"error": type(error).__name__, "detail": message, **extra}, status_code=status,
                        headers=headers)


# ---- /sdapi/v1 -----------------------------------------------------------------------------------


def add_a1111_routes(app: FastAPI, server: Server) -> None:
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

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    def sd_models() -> list[dict]:
        return [{"title": e.title, "model_name": e.name, "hash": e.short_hash, "sha256": None,
                 "filename": str(e.path), "config": None} for e in server.host.entries]

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": list(sampler_aliases(name)), "options": {}} for name in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    def schedulers() -> list[dict]:
        rho = {"Karras": 7.0}
        return [{"name": label.lower(), "label": label, "aliases": None, "default_rho": rho.get(label, -1),
                 "need_inner_model": False} for label in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/options", tags=["A1111"])
    def get_options() -> dict:
        current = server.host.current
        return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": server.host.sha256(current),
                "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                "samples_format": "png", "enable_pnginfo": True, "show_progress_every_n_steps": 1}

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


async def _generation(server: Server, request: GenerationRequest, client: Request) -> dict:
    generated = await server.generate(request, client)
    images = [png_base64(image, text) for image, text in zip(generated.images, generated.infotexts)]
    return {"images": images if request.send_images else [], "parameters": request.echo,
            "info": json.dumps(processed_info(request, generated, server.host.current.short_hash))}


def processed_info(request: GenerationRequest, generated: Generated, model_hash: str | None) -> dict:
    """A1111's Processed.js(), the "info" string's content."""
    info = generated.info
    seeds = generated.seeds
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": info.get("width"), "height": info.get("height"), "sampler_name": info.get("sampler"),
        "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": info.get("model"),
        "sd_model_hash": info.get("model_hash", model_hash), "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength if request.kind == "img2img" else None,
        "extra_generation_params": {"Schedule type": info.get("schedule_type")} if info else {},
        "index_of_first_image": 0, "infotexts": generated.infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False, "version": VERSION, "interrupted": generated.interrupted,
    }


def png_base64(image: Image.Image, parameters: str | None) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


def progress_report(server: Server, with_image: bool = True) -> dict:
    """A1111's /progress: idle is progress 0 and job_count 0, which clients wait for."""
    job = server.queue.current()
    waiting = server.queue.waiting()
    if job is None:
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": waiting, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    fraction = job.step / job.total_steps if job.total_steps else 0.0
    state = {"skipped": False, "interrupted": job.stop_requested, "stopping_generation": job.stop_requested,
             "job": job.kind, "job_count": waiting + 1, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
             "job_no": job.number, "sampling_step": job.step, "sampling_steps": job.total_steps, "job_id": job.id}
    image = None
    step = job.latest
    if with_image and step is not None:
        image = png_base64(step.preview()[0], None)
    return {"progress": fraction, "eta_relative": job.eta(), "state": state, "current_image": image,
            "textinfo": f"step {job.step} of {job.total_steps}"}


def memory_report() -> dict:
    """The process's peak resident memory and the machine's RAM; the GPU's allocations when there is one."""
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports kilobytes
    ram = {"peak_resident_bytes": peak_kb * 1024,
           "total": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}
    cuda = ({"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
            if torch.cuda.is_available() else {"error": "no GPU"})
    return {"ram": ram, "cuda": cuda}
