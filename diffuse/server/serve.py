"""`diffuse serve`: the HTTP server on a port, safe to leave running.

It listens on loopback unless told otherwise; listening anywhere else needs credentials
(`--api-auth user:password`, or the DIFFUSE_API_AUTH variable, which keeps them out of the
process list), or it refuses to start.

Who may use it (guard.Guard, origin.OriginRules): programs on this machine (and, with
credentials, on others) and the server's own page. A web page of another origin that the
user happens to visit may not: requests carrying its Origin are refused, and so are bodies
that are not JSON. `--cors-allow-origins A,B` (A1111's flag) lets the pages of those origins
use the API, with CORS answers for them. The server answers only to the names it is reached
by on this machine: localhost, 127.0.0.1, [::1] and the address it listens on, plus those given
with `--allow-host NAME` (say, a name in /etc/hosts or behind a reverse proxy); listening on
0.0.0.0 or :: it answers to any name, since it cannot know them all. `--request-memory MB`
bounds the memory that request bodies and queued images take together.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path

from diffuse.regenerate import add_addon_options, add_quantize_option
from diffuse.server.a1111 import Limits

AUTH_VARIABLE = "DIFFUSE_API_AUTH"


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    limits = Limits()
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; any other needs --api-auth)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    parser.add_argument("--models-dir", default=None, help="a folder of checkpoints clients may switch to")
    parser.add_argument("--outputs", default="outputs", help="where the page's images are saved (default outputs)")
    parser.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASSWORD",
        help=f"require HTTP Basic credentials (or set {AUTH_VARIABLE})",
    )
    parser.add_argument("--queue", type=int, default=16, help="requests that may wait behind the running one")
    parser.add_argument(
        "--cors-allow-origins",
        action="append",
        default=[],
        metavar="ORIGINS",
        help="web pages of these origins (comma-separated, e.g. http://localhost:3000) may use the "
        "API; any other origin is refused",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAMES",
        help="more names the server answers to in the Host header (repeatable or comma-separated; "
        "localhost, 127.0.0.1, [::1] and the --host address always)",
    )
    parser.add_argument(
        "--request-memory",
        type=int,
        default=256,
        metavar="MB",
        help="most memory request bodies being read and the images of queued jobs take together; "
        "more is answered 503 (default 256, at least the 32 MB one body may take)",
    )
    parser.add_argument("--max-side", type=int, default=limits.max_side, help="largest width or height, pixels")
    parser.add_argument("--max-steps", type=int, default=limits.max_steps, help="most sampling steps per request")
    parser.add_argument("--max-images", type=int, default=limits.max_images, help="most images per request")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), float32, ...")
    add_quantize_option(parser)  # every model the server loads, refiners and switches included
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    add_addon_options(parser)


def credentials_from(api_auth: str | None) -> tuple[str, str] | None:
    text = api_auth if api_auth is not None else os.environ.get(AUTH_VARIABLE)
    if not text:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ValueError("--api-auth must be USER:PASSWORD, both non-empty")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_binding(host: str, credentials: tuple[str, str] | None) -> None:
    if not is_loopback(host) and credentials is None:
        raise ValueError(
            f"listening on {host} lets other machines in: start with --api-auth USER:PASSWORD (or set "
            f"{AUTH_VARIABLE}), or listen on 127.0.0.1"
        )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from diffuse.server.app import create_app
    from diffuse.server.state import ServerSettings

    credentials = credentials_from(args.api_auth)
    check_binding(args.host, credentials)
    for name in ("port", "queue", "max_side", "max_steps", "max_images", "request_memory"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    settings = ServerSettings(
        model=Path(args.model),
        models_dir=Path(args.models_dir) if args.models_dir else None,
        outputs=Path(args.outputs),
        credentials=credentials,
        queue_capacity=args.queue,
        dtype=args.dtype,
        quantize=args.quantize,
        device=args.device,
        limits=Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images),
        request_memory_bytes=args.request_memory * 2**20,
        bound_host=args.host,
        allow_hosts=tuple(args.allow_host),
        cors_allow_origins=tuple(args.cors_allow_origins),
        lora_dirs=tuple(Path(folder) for folder in args.lora_dir),
        embedding_dirs=tuple(Path(folder) for folder in args.embeddings_dir),
    )
    app = create_app(settings)
    print(
        f"diffuse: serving {settings.model} on http://{_shown(args.host)}:{args.port}/ (API docs at /docs)", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _shown(host: str) -> str:
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host
