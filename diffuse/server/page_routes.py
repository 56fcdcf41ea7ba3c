"""The web page and the routes it uses: jobs followed as server-sent events, and the gallery.

    GET  /                              the page (diffuse/server/page/)
    POST /diffuse/v1/jobs               a txt2img / img2img request in A1111's fields -> {"id"} at once
    GET  /diffuse/v1/jobs/{id}/events   the job as server-sent events: "queued", "progress" (step,
                                        total, a preview of the image emerging), then "done"
                                        (the saved images and their parameters) or "failed"
    GET  /diffuse/v1/gallery            the saved images, newest first, with their parameters
    GET  /outputs/{name}                one saved image

The page's images are saved in the outputs folder as PNGs with their parameters. A name asked
for under /outputs must be one of the folder's own PNG names: it is checked against the
folder's listing, never joined to a path first, so nothing outside the folder can be reached,
links included.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from diffuse.metadata import numbered_path, read_parameters, save_png
from diffuse.server.a1111 import read_generation
from diffuse.server.app import Server, png_base64, processed_info
from diffuse.server.generate import Generated
from diffuse.server.jobs import Job

OUTPUT_NAME = re.compile(r"^[0-9]{5}-[0-9]+\.png$")  # what numbered_path writes, and nothing else
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
KEEP_JOBS = 200  # finished page jobs kept for their event streams
EVENT_POLL_S = 0.1


def add_page_routes(app: FastAPI, server: Server) -> None:
    outputs = server.settings.outputs
    limits = server.settings.limits

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page_file("index.html"))

    @app.get("/page/{name}", include_in_schema=False)
    def page_file(name: str) -> Response:
        if name not in PAGE_FILES:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(_page_file(name), media_type=PAGE_FILES[name])

    @app.post("/diffuse/v1/jobs", status_code=202, tags=["page"])
    async def submit(request: Request) -> dict:
        body = await request.json()
        kind = body.get("kind", "txt2img") if isinstance(body, dict) else None
        if kind not in ("txt2img", "img2img"):
            return JSONResponse({"error": "RequestError", "detail": "kind must be txt2img or img2img"},
                                status_code=422)
        generation = read_generation(kind, body, limits)

        def save(generated: Generated) -> dict:
            saved = []
            outputs.mkdir(parents=True, exist_ok=True)
            for image, text, seed in zip(generated.images, generated.infotexts, generated.seeds):
                path = save_png(image, numbered_path(outputs, seed), text, overwrite=False)
                saved.append({"url": f"/outputs/{path.name}", "parameters": text})
            info = processed_info(generation, generated, server.host.current.short_hash)
            return {"images": saved, "info": info, "interrupted": generated.interrupted}

        job = server.submit(generation, finish=save)
        server.jobs[job.id] = job
        for old in list(server.jobs)[:-KEEP_JOBS]:
            del server.jobs[old]
        return {"id": job.id}

    @app.get("/diffuse/v1/jobs/{job_id}/events", tags=["page"])
    async def events(job_id: str) -> Response:
        job = server.jobs.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"no job {job_id!r}"}, status_code=404)
        return StreamingResponse(_job_events(server, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/diffuse/v1/gallery", tags=["page"])
    def gallery(limit: int = 60) -> list[dict]:
        names = sorted(_output_names(outputs), reverse=True)[:max(0, min(limit, 500))]
        return [{"url": f"/outputs/{name}", "parameters": read_parameters(outputs / name)} for name in names]

    @app.get("/outputs/{name}", include_in_schema=False)
    def output(name: str) -> Response:
        if not OUTPUT_NAME.match(name) or name not in _output_names(outputs):
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(outputs / name, media_type="image/png",
                            headers={"Content-Disposition": f'inline; filename="{name}"'})


def _output_names(outputs: Path) -> set[str]:
    """The folder's own PNGs: regular files with numbered names (links are not followed out)."""
    if not outputs.is_dir():
        return set()
    return {entry.name for entry in outputs.iterdir()
            if OUTPUT_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink()}


def _page_file(name: str) -> str:
    return resources.files("diffuse.server").joinpath("page", name).read_text(encoding="utf-8")


async def _job_events(server: Server, job: Job):
    """The job's progress as server-sent events until it ends."""
    sent_step, sent_position = -1, None
    while not job.future.done():
        if job.started_at is None:
            running = server.queue.current()  # read once: it may finish between two reads
            position = job.number - (running.number if running else job.number)
            if position != sent_position:
                sent_position = position
                yield _event("queued", {"ahead": max(0, position)})
        elif job.step != sent_step:
            sent_step = job.step
            yield _event("progress", {"step": job.step, "total": job.total_steps, "eta": round(job.eta(), 2),
                                      "preview": _preview_url(job.latest)})
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
