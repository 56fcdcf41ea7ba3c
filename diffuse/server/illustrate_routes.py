"""The page's "How it was made" view: a result's figures, drawn by `diffuse illustrate` on the server.

    POST /diffuse/v1/illustrate                    a result's parameters (prompt, negative_prompt, seed,
                                                   steps, sampler_name, scheduler, cfg_scale, width, height,
                                                   model_hash) -> {"id"} at once (202)
    GET  /diffuse/v1/illustrate/{id}               the report's state: "queued" (with how many jobs are
                                                   ahead), "running", "done" or "failed" (with why)
    GET  /diffuse/v1/illustrate/{id}/files/{name}  one file of a finished report: report.json, index.html
                                                   or a file report.json names

A report is made by diffuse.illustrate.report.illustrate, the code behind the command, as a job on
the same queue (and within the same limits) as every generation; interrupt does not stop it, since
it records the run through the pipeline's step callback itself. It is written into a folder named
by its id under a private temporary folder (mode 0700) that is removed when the server stops;
illustrate renames the folder into place when it is complete. Nothing a request sends becomes
part of a path: ids are random tokens looked up in the server's own list, and a file is served
only when its name is one report.json lists, opened without following a link, and only while it
is a regular file. Only the newest KEEP_REPORTS finished reports are kept; older ones are
deleted, so the disk they take stays bounded.

Report files are answered with a Content-Security-Policy that lets them show their own images and
styles and nothing else: no script runs there and nothing is fetched from elsewhere.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from diffuse.illustrate.report import TITLES, illustrate
from diffuse.server.a1111 import Limits, RequestError, read_generation
from diffuse.server.jobs import Job
from diffuse.server.page_routes import stream_file
from diffuse.server.state import Server, read_json

KEEP_REPORTS = 6
REPORT_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # secrets.token_urlsafe(16)
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
}
# A plain name in the report's own folder: no separator, no leading dot, a known kind of file.
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}(" + "|".join(re.escape(s) for s in MEDIA_TYPES) + ")$")
REPORT_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
# The request fields a report is drawn from: the page's result fields and nothing the command lacks.
FIELDS = {"prompt", "negative_prompt", "seed", "steps", "sampler_name", "scheduler", "cfg_scale", "width", "height"}


@dataclass
class Entry:
    """One report: its job, its folder, and once done the names it lists and may be fetched by."""

    folder: Path
    job: Job | None = None  # set once queued
    files: frozenset[str] = frozenset()
    finished: bool = False


class ReportStore:
    """The reports by id, their folders under one private temporary folder made on first use;
    shared by the event loop and the job worker, so it takes a lock."""

    def __init__(self, keep: int = KEEP_REPORTS) -> None:
        self.keep = keep
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._root: Path | None = None
        self._lock = threading.Lock()

    def new(self) -> tuple[str, Entry]:
        """A fresh random id and its entry; the report's folder appears (complete) once it is made."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="diffuse-reports-"))
                weakref.finalize(self, shutil.rmtree, self._root, True)  # at exit, if close() never came
            report_id = secrets.token_urlsafe(16)
            entry = self.entries[report_id] = Entry(self._root / report_id)
            return report_id, entry

    def drop(self, report_id: str) -> None:
        with self._lock:
            shutil.rmtree(self.entries.pop(report_id).folder, ignore_errors=True)

    def get(self, report_id: str) -> Entry | None:
        if not REPORT_ID.match(report_id):
            return None
        with self._lock:
            return self.entries.get(report_id)

    def finish(self, report_id: str, files: frozenset[str]) -> None:
        """Mark a report done with the files it may be fetched by, and delete the oldest beyond `keep`."""
        with self._lock:
            entry = self.entries[report_id]
            entry.files, entry.finished = files, True
            self._prune()

    def fail(self, report_id: str) -> None:
        """A report that was not made: its folder goes; its entry stays to say why, until pushed out."""
        with self._lock:
            entry = self.entries[report_id]
            shutil.rmtree(entry.folder, ignore_errors=True)
            entry.finished = True
            self._prune()

    def _prune(self) -> None:
        """Delete the oldest finished reports beyond `keep` (the lock held); waiting ones stay."""
        done = [key for key, entry in self.entries.items() if entry.finished]
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(self.entries.pop(old).folder, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
            self.entries.clear()


def add_illustrate_routes(app: FastAPI, server: Server, store: ReportStore) -> None:
    @app.post("/diffuse/v1/illustrate", status_code=202, tags=["page"])
    async def submit(request: Request) -> dict:
        wanted = read_illustration(await read_json(request), server.settings.limits, server.settings.quantize)
        return {"id": _submit(server, store, wanted)}

    @app.get("/diffuse/v1/illustrate/{report_id}", tags=["page"])
    def state(report_id: str) -> Response:
        entry = store.get(report_id)
        if entry is None or entry.job is None:
            return JSONResponse({"detail": "no such report (or it was deleted to make room)"}, status_code=404)
        return JSONResponse(_state(server, report_id, entry), headers={"Cache-Control": "no-store"})

    @app.get("/diffuse/v1/illustrate/{report_id}/files/{name}", tags=["page"])
    def report_file(report_id: str, name: str) -> Response:
        entry = store.get(report_id)
        if entry is None or name not in entry.files:
            return JSONResponse({"detail": "not found"}, status_code=404)
        file = _open_regular(entry.folder, name)
        if file is None:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return stream_file(file, MEDIA_TYPES[Path(name).suffix], {"Content-Security-Policy": REPORT_POLICY})


def read_illustration(body: Any, limits: Limits, quantize: str | None = None) -> dict[str, Any]:
    """The checked parameters of a report: the txt2img fields as a generation request reads them
    (the same checks, the same limits), one image, no setting the command does not take. A
    gallery image's fields may say how it was quantized: it must be how this server runs
    (`quantize`), since another arithmetic would draw another image."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, not {type(body).__name__}")
    extra = sorted(set(body) - FIELDS - {"model_hash", "quantize"})
    if extra:
        raise RequestError(extra[0], "is not a setting a report is drawn with")
    if body.get("quantize", quantize) != quantize:
        made, runs = body["quantize"] or "off", quantize or "off"
        raise RequestError("quantize", f"the image was made with quantize {made}; this server runs with {runs}")
    generation = read_generation("txt2img", {key: body[key] for key in FIELDS if key in body}, limits).generation
    model = body.get("model_hash")
    if model is not None and not isinstance(model, str):
        raise RequestError("model_hash", "must be a model's short hash")
    return {"generation": generation, "model": model}


def _submit(server: Server, store: ReportStore, wanted: dict[str, Any]) -> str:
    """Queue the report's job (its model and sampler checked now, not after the queue); its id."""
    generation, model = wanted["generation"], wanted["model"]
    if model is not None:
        entry = server.host.find(model)  # unknown: an error now, not after the queue
        model = None if entry == server.host.current else entry.title
    if model is None:
        server.host.pipe.check_addons(generation)  # an unknown LoRA: 422 now
    sampler = server.host.pipe.get_sampler(generation.sampler, generation.schedule_type).label
    report_id, entry = store.new()
    folder = entry.folder

    def work(job: Job) -> dict:
        try:
            report = server.host.run_on(
                model,
                True,
                lambda pipe: illustrate(
                    pipe,
                    generation.prompt,
                    out=folder,
                    seed=generation.seed,
                    steps=generation.steps,
                    sampler=sampler,
                    cfg_scale=generation.guidance_scale,
                    negative_prompt=generation.negative_prompt,
                    width=generation.width,
                    height=generation.height,
                ),
            )
        except BaseException:
            store.fail(report_id)
            raise
        store.finish(report_id, listed_files(report.report, folder))
        return {"id": report_id}

    try:
        entry.job = server.queue.submit("illustrate", work)
    except Exception:
        store.drop(report_id)
        raise
    return report_id


def listed_files(report: dict, folder: Path) -> frozenset[str]:
    """index.html, report.json and every file name report.json holds (the final image, each figure's
    file, any more a figure names), kept when it is a plain name of a regular file in `folder`."""
    names = {"index.html", "report.json"}
    pending: list[Any] = [report]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(item for item in value if isinstance(item, (dict, list, str)))
        elif isinstance(value, str) and FILE_NAME.match(value):
            names.add(value)
    return frozenset(name for name in names if FILE_NAME.match(name) and _is_regular(folder / name))


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _open_regular(folder: Path, name: str):
    """The file opened without following a link, when it is a regular file; else None."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        file = os.fdopen(os.open(folder / name, flags), "rb")
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        return None
    return file


def _state(server: Server, report_id: str, entry: Entry) -> dict[str, Any]:
    base = f"/diffuse/v1/illustrate/{report_id}/files/"
    job, answer = entry.job, {"id": report_id, "state": entry.job.state, "files": base}
    if answer["state"] == "queued":
        answer["ahead"] = server.queue.position(job)
    elif answer["state"] == "failed":
        answer["detail"] = str(job.future.exception())
    elif answer["state"] == "done":
        answer["titles"] = TITLES  # the headings the report's own page gives its figures
    return answer
