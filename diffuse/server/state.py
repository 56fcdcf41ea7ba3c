"""What every route shares: the server's settings, its models, its job queue and its memory budget.

Generation requests become jobs on one queue (jobs.JobQueue) and run one at a time on the
loaded model; switching the model is a job too, so it never happens under a running
generation. A1111 clients wait for their answer on the request itself (Server.generate); the
page submits a job, gets its id at once, and follows it (page_routes).

An A1111 client that goes away (closes its connection) before its answer takes its job with
it: a waiting job leaves the queue and frees its place, a running one stops after its current
step and nothing is returned or kept. A request's body is parsed once (read_json) and then
dropped: a queued job keeps only the fields diffuse uses and its decoded images, which count
against the server's memory budget (guard.MemoryBudget) until the job ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from diffuse.server.a1111 import A1111Request, Limits
from diffuse.server.generate import Generated, run_request
from diffuse.server.guard import RELEASE_BODY, MemoryBudget, OverBudget
from diffuse.server.jobs import Job, JobQueue, QueueFull
from diffuse.server.models import ModelHost, UnknownModel


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
    quantize: str | None = None  # every model loaded, as load_pipeline takes it: None (off) or "int8"
    device: str = "cpu"
    bound_host: str = "127.0.0.1"  # the address the server listens on: a Host it answers to
    allow_hosts: tuple[str, ...] = ()  # more names it answers to (--allow-host)
    cors_allow_origins: tuple[str, ...] = ()  # other web pages' origins that may use it (--cors-allow-origins)
    lora_dirs: tuple[Path, ...] = ()  # the add-on folders given at start-up; requests name files only by name
    embedding_dirs: tuple[Path, ...] = ()


class ClientGone(Exception):
    """The client closed its connection before its job's answer was ready."""


class Server:
    """What the routes share: the models, the queue, the settings, the page's jobs."""

    def __init__(self, settings: ServerSettings, host: ModelHost, budget: MemoryBudget | None = None) -> None:
        self.settings, self.host = settings, host
        self.budget = budget or MemoryBudget(settings.request_memory_bytes)
        self.queue = JobQueue(settings.queue_capacity)
        self.jobs: dict[str, Job] = {}  # the page's jobs by id, the latest few hundred

    def submit(self, request: A1111Request, finish: Callable[[Generated], Any] = lambda generated: generated) -> Job:
        """Queue the request; its job returns finish(the Generated images). The request's own model,
        if it names one, is loaded in the same job, so no other job runs on it by mistake; so is
        the refiner it names."""
        if request.model is not None:
            self.host.find(request.model)  # unknown: an error now, not after the queue
        if request.refiner is not None:
            try:
                self.host.find(request.refiner)
            except UnknownModel as error:
                raise UnknownModel(f"refiner_checkpoint: {error.args[0]}") from None
        generation = request.generation
        self.host.pipe.get_sampler(generation.sampler, generation.schedule_type)  # an unknown sampler: 422 now
        if request.model is None:
            self.host.pipe.check_addons(generation)  # an unknown LoRA: 422 now, not after the queue
        held = self.budget.reserve(held_image_bytes(request))
        if held is None:
            raise OverBudget(self.budget.refusal("this request's images"))

        def work(job: Job) -> Any:
            generated = self.host.run_on(
                request.model,
                request.restore_model,
                lambda pipe: run_request(pipe, request, job, self.host.refiner(request.refiner)),
            )
            return finish(generated)

        try:
            job = self.queue.submit(request.kind, work)
        except QueueFull:
            held.release()
            raise
        job.future.add_done_callback(lambda _: held.release())
        return job

    async def generate(self, request: A1111Request, client: Request) -> Generated:
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


def held_image_bytes(request: A1111Request) -> int:
    """The memory a queued request's decoded images take: PIL keeps 1 byte per pixel for
    greyscale and palette images, 4 for the rest (RGB included)."""
    generation = request.generation
    images = [image for image in (generation.image, generation.mask) if image is not None]
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
