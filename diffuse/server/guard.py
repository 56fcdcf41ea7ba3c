"""What every request passes before a route sees it (an ASGI middleware, outermost), in this order:

  - Host and Origin (origin.OriginRules): a Host that does not name this server is answered 403
    (DNS rebinding); so is a request carrying an Origin other than the server's own or one listed
    with --cors-allow-origins, whatever its method (a foreign page must not read /progress or
    /outputs either), and a state-changing request (POST, PUT, PATCH, DELETE) that the browser
    marks `Sec-Fetch-Site: cross-site` unless its Origin is listed. A listed origin is answered
    as CORS asks: its preflight (OPTIONS) gets the methods and headers it may use, every answer
    echoes it in Access-Control-Allow-Origin (with credentials allowed, as A1111 does).
  - authentication: with credentials set (`--api-auth user:password`, A1111's flag, or the
    DIFFUSE_API_AUTH variable), every request needs them as HTTP Basic auth; a browser asks
    for them itself. A server bound to anything but loopback refuses to start without them
    (see serve.check_binding). A preflight carries none (browsers never send them there).
  - the body of a state-changing request: it must be `Content-Type: application/json` (415
    otherwise; only an empty body may come without a type, as clients send /interrupt) — a
    web page cannot send that type to another origin without a preflight, which a foreign
    origin fails. Larger than max_body_bytes: 413 without reading the rest. Then it must fit
    the memory budget (below), and be strict JSON: NaN and Infinity, which Python's parser
    would let through to the number checks, are answered 400.
  - every response says X-Content-Type-Options: nosniff, Vary: Origin, and how long it took
    (X-Process-Time, as A1111 does).

The memory budget (`--request-memory`, MemoryBudget) bounds the bytes that bodies being read
and held, and the decoded images of queued jobs (state.Server.submit), take together: a body
that would go over it is answered 503 with Retry-After before it is read, so N clients
sending large bodies at once cannot make the server hold N of them. A body's bytes count
from the moment it is admitted until the route has parsed it (it calls the function the
Guard leaves in scope[RELEASE_BODY]) or, at the latest, until the answer is sent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from diffuse.server.origin import OriginRules

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CORS_METHODS = b"GET, POST"
CORS_HEADERS = b"Authorization, Content-Type"
RETRY_AFTER_S = 5
RELEASE_BODY = "diffuse.release_body"  # scope key: called by a route once it parsed the body


class BodyTooLarge(Exception):
    pass


class OverBudget(Exception):
    """Holding one more request would take the server past its memory budget (answered 503)."""


class MemoryBudget:
    """Bytes that request bodies being read and held, and the images queued jobs hold, may take
    together; shared by the event loop and the job worker, so it takes a lock."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"the request memory budget must be positive, not {total}")
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> Reservation | None:
        """A hold on `size` bytes, or None when they do not fit now."""
        reservation = Reservation(self)
        return reservation if reservation.grow(size) else None

    def refusal(self, what: str) -> str:
        return (
            f"the server already holds {self.used / 2**20:.1f} MB of requests and {what} would take it past "
            f"its {self.total / 2**20:.0f} MB (--request-memory); try again in a few seconds"
        )


class Reservation:
    def __init__(self, budget: MemoryBudget) -> None:
        self.budget, self.size = budget, 0

    def grow(self, more: int) -> bool:
        with self.budget._lock:
            if self.budget.used + more > self.budget.total:
                return False
            self.budget.used += more
            self.size += more
        return True

    def release(self) -> None:
        """Give the bytes back; a second call does nothing."""
        with self.budget._lock:
            self.budget.used -= self.size
            self.size = 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_strict_json(body: bytes) -> str | None:
    """None when `body` is strict JSON, else what is wrong with it."""
    try:
        json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as error:
        return f"the body is not valid JSON: {error}"
    return None


class Guard:
    def __init__(
        self,
        app: Callable,
        *,
        credentials: tuple[str, str] | None,
        max_body_bytes: int,
        rules: OriginRules | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.app, self.credentials, self.max_body_bytes = app, credentials, max_body_bytes
        self.rules = rules or OriginRules()
        self.budget = budget or MemoryBudget(8 * max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        method, origin = scope["method"], headers.get("origin")
        kind = self.rules.origin_kind(origin, scope.get("scheme", "http"), headers.get("host"))
        extra = [(b"x-content-type-options", b"nosniff"), (b"vary", b"Origin")]
        if kind == "listed":
            extra += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
            ]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                timing = [(b"x-process-time", f"{time.perf_counter() - started:.4f}".encode())]
                message = {**message, "headers": [*message.get("headers", []), *extra, *timing]}
            await send(message)

        refusal = self._refusal(method, headers, kind)
        if refusal is not None:
            await _answer(send_with_headers, *refusal)
            return
        if method == "OPTIONS" and kind == "listed" and "access-control-request-method" in headers:
            await _answer(
                send_with_headers,
                204,
                None,
                [
                    (b"access-control-allow-methods", CORS_METHODS),
                    (b"access-control-allow-headers", CORS_HEADERS),
                    (b"access-control-max-age", b"600"),
                ],
            )
            return
        if self.credentials is not None and not self._authorized(headers.get("authorization", "")):
            await _answer(
                send_with_headers,
                401,
                {"detail": "Incorrect username or password"},
                [(b"www-authenticate", b'Basic realm="diffuse"')],
            )
            return
        if method not in STATE_CHANGING:
            await self.app(scope, receive, send_with_headers)
            return
        await self._with_body(scope, receive, send_with_headers, headers)

    def _refusal(self, method: str, headers: dict[str, str], kind: str) -> tuple[int, dict] | None:
        """(status, answer) when the Host, Origin, fetch metadata or content type rules refuse the request."""
        host, origin = headers.get("host"), headers.get("origin")
        if not self.rules.host_allowed(host):
            return 403, {
                "detail": f"Host {host!r} is not a name of this server (another site's name may point "
                f"here); start the server with --allow-host NAME to answer to a name of its own"
            }
        if kind == "foreign":
            return 403, {
                "detail": f"requests from the web page at {origin} are refused; start the server with "
                f"--cors-allow-origins ORIGIN to let a page of another origin use it"
            }
        changes = method in STATE_CHANGING
        if changes and headers.get("sec-fetch-site") == "cross-site" and kind != "listed":
            return 403, {
                "detail": "a cross-site request that changes something is refused; start the server "
                "with --cors-allow-origins ORIGIN to let that site's page use it"
            }
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        no_body = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
        if changes and media != "application/json" and not (media == "" and no_body):
            return 415, {
                "detail": f"a {method} body must be JSON sent with Content-Type: application/json, "
                f"not {media or 'untyped'}"
            }
        return None

    async def _with_body(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Read the body within the limits and the budget, check it, and hand it to the app."""
        too_large = {"detail": f"the body is larger than this server's {self.max_body_bytes} bytes"}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _answer(send, 413, too_large)
            return
        reservation = self.budget.reserve(int(declared or 0))
        if reservation is None:
            await _answer(
                send, 503, {"detail": self.budget.refusal("this body")}, [(b"retry-after", str(RETRY_AFTER_S).encode())]
            )
            return
        try:
            try:
                body = await self._read_body(receive, reservation)
            except BodyTooLarge:
                await _answer(send, 413, too_large)
                return
            except OverBudget:
                await _answer(
                    send,
                    503,
                    {"detail": self.budget.refusal("this body")},
                    [(b"retry-after", str(RETRY_AFTER_S).encode())],
                )
                return
            problem = check_strict_json(body) if body else None
            if problem is not None:
                await _answer(send, 400, {"detail": problem})
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed, body
                if not replayed:
                    replayed, message = True, {"type": "http.request", "body": body, "more_body": False}
                    body = b""  # the route holds it now; the Guard keeps no copy while the job waits
                    return message
                return await receive()  # after the body: the disconnect, when it comes

            await self.app({**scope, RELEASE_BODY: reservation.release}, replay, send)
        finally:
            reservation.release()

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        want_user, want_password = self.credentials
        # Both compared in constant time, both always: the answer's timing says nothing.
        same_user = hmac.compare_digest(user.encode(), want_user.encode())
        same_password = hmac.compare_digest(password.encode(), want_password.encode())
        return same_user and same_password

    async def _read_body(self, receive: Receive, reservation: Reservation) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            if size > reservation.size and not reservation.grow(size - reservation.size):
                raise OverBudget  # a body without a declared length, past the budget while it came
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _answer(send: Send, status: int, payload: dict | None, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = b"" if payload is None else json.dumps(payload).encode()
    kind = [(b"content-type", b"application/json")] if payload is not None else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*kind, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
