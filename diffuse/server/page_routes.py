"""The web page and the routes it uses: jobs followed as server-sent events, and the gallery.

    GET  /                              the page (diffuse/server/page/)
    POST /diffuse/v1/jobs               a txt2img / img2img request in A1111's fields -> {"id"} at once
    GET  /diffuse/v1/jobs/{id}/events   the job as server-sent events: "queued" (how many jobs are
                                        ahead), "progress" (step, total, a preview of the image
                                        emerging), then "done" (the saved images, their
                                        parameters and, as the gallery gives them, the request
                                        fields that make them again) or "failed"
    GET  /diffuse/v1/model              the current model as the form needs it: its own image size
                                        (what a blank width and height draw), whether it is SDXL,
                                        and "quantize" ("int8", or null when off)
    GET  /diffuse/v1/gallery            diffuse's saved images, newest first, with their parameters
                                        and, for a txt2img image, the request fields that make it again
    GET  /outputs/{name}                one saved image

The "How it was made" view of a result has its own routes (illustrate_routes).

A page job is not tied to the connection that submitted it, nor to anyone following its events:
it runs to its end and its images are saved, so a page reloaded (or closed) meanwhile finds
them in the gallery; the page's Interrupt button, or /sdapi/v1/interrupt, stops it. Such jobs
still take a place in the queue (--queue) like any other, so nobody following cannot pile them
up without bound.

The page's images are saved in the outputs folder as numbered PNGs ("00000-SEED.png", ...,
"99999-SEED.png", then "100000-SEED.png": numbered_path's names), with their parameters. A name
asked for under /outputs, and every name the gallery lists, must be one diffuse wrote there:
a numbered name, opened without following a link, a regular file with exactly one link (no
hard link to a file elsewhere), checked on the opened file itself so nothing can be swapped in
between, starting with the PNG signature and carrying a "parameters" chunk whose Version says
diffuse (so it survives restarts; other programs' PNGs dropped there are not served). The
gallery skips anything else without a word, and sorts by the number, as a number.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image

from diffuse.conditioning_xl import SIZE_PAIRS
from diffuse.metadata import PARAMETERS_KEY, info_from_infotext, numbered_path, parse_infotext, save_png
from diffuse.regenerate import refiner_title
from diffuse.server.a1111 import A1111Request, Limits, RequestError, read_generation
from diffuse.server.generate import Generated, png_base64, processed_info
from diffuse.server.jobs import Job
from diffuse.server.state import Server, read_json

OUTPUT_NAME = re.compile(r"^([0-9]{5,})-[0-9]+\.png$")  # what numbered_path writes, and nothing else
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
KEEP_JOBS = 200  # finished page jobs kept for their event streams
EVENT_POLL_S = 0.1
READ_CHUNK = 1 << 16


def add_page_routes(app: FastAPI, server: Server) -> None:
    _add_page_files(app)
    _add_job_routes(app, server)
    _add_output_routes(app, server.settings.outputs)


def _add_page_files(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_file("index.html"))

    @app.get("/page/{name}", include_in_schema=False)
    def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(_page_file(name), media_type=PAGE_FILES[name])


def _add_job_routes(app: FastAPI, server: Server) -> None:
    @app.get("/diffuse/v1/model", tags=["page"])
    def model() -> dict:
        pipe, current = server.host.pipe, server.host.current
        return {
            "title": current.title,
            "image_size": pipe.config.image_size,
            "sdxl": pipe.is_xl,
            "quantize": pipe.quantize,
        }

    @app.post("/diffuse/v1/jobs", status_code=202, tags=["page"])
    async def submit(request: Request) -> dict:
        wanted = _page_request(await read_json(request), server.settings.limits)
        job = server.submit(wanted, finish=lambda generated: _save(server, wanted, generated))
        server.jobs[job.id] = job
        for old in list(server.jobs)[:-KEEP_JOBS]:
            del server.jobs[old]
        return {"id": job.id}

    @app.get("/diffuse/v1/jobs/{job_id}/events", tags=["page"])
    async def events(job_id: str) -> Response:
        job = server.jobs.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"no job {job_id!r}"}, status_code=404)
        return StreamingResponse(
            _job_events(server, job), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )


def _add_output_routes(app: FastAPI, outputs: Path) -> None:
    @app.get("/diffuse/v1/gallery", tags=["page"])
    def gallery(limit: int = 60) -> list[dict]:
        limit, entries = max(0, min(limit, 500)), []
        for name in _numbered_names(outputs):
            if len(entries) >= limit:
                break
            opened = open_own_image(outputs, name)
            if opened is None:
                continue
            opened[0].close()
            entries.append({"url": f"/outputs/{name}", "parameters": opened[1], "fields": remake_fields(opened[1])})
        return entries

    @app.get("/outputs/{name}", include_in_schema=False)
    def output(name: str) -> Response:
        opened = open_own_image(outputs, name)
        if opened is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return stream_file(opened[0], "image/png", {"Content-Disposition": f'inline; filename="{name}"'})


def _save(server: Server, request: A1111Request, generated: Generated) -> dict:
    """A page job's result: its images saved in the outputs folder, and A1111's account of them."""
    outputs, saved = server.settings.outputs, []
    outputs.mkdir(parents=True, exist_ok=True)
    for image, text, seed in zip(generated.images, generated.infotexts, generated.seeds):
        path = save_png(image, numbered_path(outputs, seed), text, overwrite=False)
        saved.append({"url": f"/outputs/{path.name}", "parameters": text, "fields": remake_fields(text)})
    info = processed_info(request, generated, server.host.current.short_hash)
    return {"images": saved, "info": info, "interrupted": generated.interrupted}


def _page_request(body: Any, limits: Limits) -> A1111Request:
    kind = body.get("kind", "txt2img") if isinstance(body, dict) else None
    if kind not in ("txt2img", "img2img"):
        raise RequestError("kind", "must be txt2img or img2img")
    return read_generation(kind, body, limits)


def _numbered_names(outputs: Path) -> list[str]:
    """The folder's numbered PNG names, newest (largest number) first; what they are is not checked here."""
    try:
        names = [entry.name for entry in os.scandir(outputs) if OUTPUT_NAME.match(entry.name)]
    except OSError:
        return []
    return sorted(names, key=lambda name: (int(OUTPUT_NAME.match(name).group(1)), name), reverse=True)


def open_own_image(outputs: Path, name: str) -> tuple[BinaryIO, str] | None:
    """(the opened file, its parameters) when `name` is an image diffuse saved in `outputs` (see the
    module's docstring for what that takes), else None."""
    if not OUTPUT_NAME.match(name):
        return None
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not hang us
    try:
        file = os.fdopen(os.open(outputs / name, flags), "rb")
    except OSError:
        return None
    try:
        info = os.fstat(file.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and file.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
            file.seek(0)
            text = _diffuse_parameters(file)
            if text is not None:
                file.seek(0)
                return file, text
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # not a PNG Pillow can read: not one of ours
    file.close()
    return None


def _diffuse_parameters(file: BinaryIO) -> str | None:
    """The "parameters" text of an opened PNG when its Version says diffuse wrote it (the chunks
    before the pixels are read, where save_png puts it)."""
    with Image.open(file, formats=["PNG"]) as image:
        text = image.info.get(PARAMETERS_KEY)
    if not isinstance(text, str) or not parse_infotext(text).get("Version", "").startswith("diffuse "):
        return None
    return text


def remake_fields(text: str) -> dict | None:
    """The txt2img request fields that draw a saved image again from its parameters, or None when
    they cannot (an img2img image, or settings the page's form does not hold)."""
    try:
        info = info_from_infotext(text)
    except ValueError:
        return None
    parsed = parse_infotext(text)
    needed = ("steps", "sampler", "cfg_scale", "seed", "width", "height")
    foreign = (
        "Denoising strength",
        "Eta",
        "Token merging ratio",
        "Guidance cutoff",
        "Deep cache",
        "Mask blur",
        "Aesthetic score",
        "Negative aesthetic score",
    )
    if any(key not in info for key in needed) or any(label in parsed for label in foreign) or info["clip_skip"] != 1:
        return None
    if any(key in info for pair in SIZE_PAIRS.values() for key in pair):
        return None  # SDXL's crop or negative sizes, which the page's form does not hold
    refiner = {}
    if "refiner" in info:  # a hand-off: the page finds its refiner by the hash, as the model
        try:
            refiner = {"refiner_hash": refiner_title(info)[1], "refiner_switch_at": info["refiner_switch_at"]}
        except (ValueError, KeyError):
            return None
    return {
        "prompt": info.get("prompt", ""),
        "negative_prompt": info.get("negative_prompt", ""),
        "steps": info["steps"],
        "sampler_name": info["sampler"],
        "scheduler": info["schedule_type"],
        "cfg_scale": info["cfg_scale"],
        "seed": info["seed"],
        "width": info["width"],
        "height": info["height"],
        "model_hash": info.get("model_hash"),
        "quantize": info.get("quantize"),  # the page refuses to remake an image a server would draw otherwise
        **refiner,
    }


def stream_file(file: BinaryIO, media_type: str, headers: dict[str, str]) -> StreamingResponse:
    """An opened file as the answer, read in chunks and closed at the end."""
    size = str(os.fstat(file.fileno()).st_size)
    return StreamingResponse(_chunks(file), media_type=media_type, headers={"Content-Length": size, **headers})


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(READ_CHUNK):
            yield chunk


def _page_file(name: str) -> str:
    return resources.files("diffuse.server").joinpath("page", name).read_text(encoding="utf-8")


async def _job_events(server: Server, job: Job):
    """The job's progress as server-sent events until it ends."""
    sent_step, sent_position = -1, None
    while not job.future.done():
        if job.started_at is None:
            position = server.queue.position(job)
            if position is not None and position != sent_position:
                sent_position = position
                yield _event("queued", {"ahead": position})
        elif job.step != sent_step:
            sent_step = job.step
            yield _event(
                "progress",
                {
                    "step": job.step,
                    "total": job.total_steps,
                    "eta": round(job.eta(), 2),
                    "preview": _preview_url(job.latest),
                },
            )
        await asyncio.sleep(EVENT_POLL_S)
    if job.future.cancelled():
        yield _event("failed", {"detail": "the server stopped before the job ran"})
    elif job.future.exception() is not None:
        error = job.future.exception()
        yield _event("failed", {"detail": str(error), "error": type(error).__name__})
    else:
        yield _event("done", job.future.result())


def _preview_url(step) -> str | None:
    return None if step is None else "data:image/png;base64," + png_base64(step.preview()[0], None)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
