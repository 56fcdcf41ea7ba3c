"""The HTTP server: AUTOMATIC1111's /sdapi/v1 routes, diffuse's own for the web page, and the page.

    create_app(settings) -> an ASGI app (FastAPI, wrapped in guard.Guard)

The routes share one state.Server (the models, the job queue, the memory budget); the A1111
routes (a1111_routes) answer on the request itself, the page's (page_routes) as server-sent
events. Errors are answered in A1111's shape, {"error": type, "detail": message}.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from diffuse.numerics import NonFiniteError
from diffuse.pipeline import VERSION
from diffuse.server.a1111 import RequestError
from diffuse.server.a1111_routes import add_a1111_routes
from diffuse.server.addon_routes import add_addon_routes
from diffuse.server.guard import RETRY_AFTER_S, Guard, MemoryBudget, OverBudget
from diffuse.server.illustrate_routes import ReportStore, add_illustrate_routes
from diffuse.server.jobs import QueueFull
from diffuse.server.models import ModelHost, UnknownModel, find_models
from diffuse.server.origin import OriginRules
from diffuse.server.page_routes import add_page_routes
from diffuse.server.state import ClientGone, Server, ServerSettings

# An exception type a route lets through, and the status it is answered with (a subclass's own first).
ERROR_STATUS: dict[type[Exception], int] = {
    RequestError: 422,
    ValueError: 422,
    NonFiniteError: 500,  # the model failed, not the request: an error, never a black image
    QueueFull: 503,
    OverBudget: 503,
    ClientGone: 499,  # nginx's "client closed request": nobody reads it, the log says why
    UnknownModel: 404,
}
RETRY_LATER = (QueueFull, OverBudget)


def create_app(settings: ServerSettings, host: ModelHost | None = None) -> Guard:
    """The server's app: the model loaded (or `host`), the routes added, the Guard around them."""
    rules = OriginRules.create(settings.bound_host, list(settings.allow_hosts), list(settings.cors_allow_origins))
    if settings.request_memory_bytes < settings.max_body_bytes:
        raise ValueError(
            f"--request-memory ({settings.request_memory_bytes / 2**20:g} MB) must hold at least one "
            f"whole body ({settings.max_body_bytes / 2**20:g} MB)"
        )
    budget = MemoryBudget(settings.request_memory_bytes)
    host = host or ModelHost(
        find_models(settings.model, settings.models_dir),
        settings.dtype,
        settings.device,
        settings.lora_dirs,
        settings.embedding_dirs,
        settings.quantize,
    )
    server = Server(settings, host, budget)
    reports = ReportStore()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        server.queue.close()  # the running job finishes; waiting ones are cancelled
        reports.close()  # the "How it was made" reports live only as long as the server

    app = FastAPI(
        title="diffuse",
        version=VERSION.split()[-1],
        lifespan=lifespan,
        description="Stable Diffusion from its parts: an AUTOMATIC1111-compatible API and a web page.",
    )
    app.state.server = server
    app.state.reports = reports
    for error_type in ERROR_STATUS:
        app.add_exception_handler(error_type, _answer_error)
    add_a1111_routes(app, server)
    add_addon_routes(app, server)
    add_page_routes(app, server)
    add_illustrate_routes(app, server, reports)
    return Guard(
        app, credentials=settings.credentials, max_body_bytes=settings.max_body_bytes, rules=rules, budget=budget
    )


async def _answer_error(_: Request, error: Exception) -> JSONResponse:
    """A1111's error shape: {"error": exception type, "detail": message, ...}."""
    status = next(ERROR_STATUS[kind] for kind in type(error).__mro__ if kind in ERROR_STATUS)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(error, RETRY_LATER) else None
    extra = {"field": error.field} if isinstance(error, RequestError) else {}
    message = str(error.args[0]) if isinstance(error, LookupError) and error.args else str(error)
    return JSONResponse(
        {"error": type(error).__name__, "detail": message, **extra}, status_code=status, headers=headers
    )
