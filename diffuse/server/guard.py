"""What every request passes before a route sees it (an ASGI middleware, outermost).

  - authentication: with credentials set (`--api-auth user:password`, A1111's flag, or the
    DIFFUSE_API_AUTH variable), every request needs them as HTTP Basic auth; a browser asks
    for them itself. A server bound to anything but loopback refuses to start without them
    (see serve.check_binding).
  - the body: larger than max_body_bytes is answered 413 without reading the rest; a JSON
    body must be strict JSON: NaN and Infinity, which Python's parser would let through to
    the number checks, are answered 400.
  - every response says X-Content-Type-Options: nosniff, and how long it took (X-Process-Time,
    as A1111 does).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


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
    def __init__(self, app: Callable, *, credentials: tuple[str, str] | None, max_body_bytes: int) -> None:
        self.app, self.credentials, self.max_body_bytes = app, credentials, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"x-process-time", f"{time.perf_counter() - started:.4f}".encode())]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if self.credentials is not None and not self._authorized(headers.get("authorization", "")):
            await _answer(send_with_headers, 401, {"detail": "Incorrect username or password"},
                          [(b"www-authenticate", b'Basic realm="diffuse"')])
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send_with_headers)
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _answer(send_with_headers, 413, {"detail": f"the body is larger than this server's "
                                                             f"{self.max_body_bytes} bytes"})
            return
        try:
            body = await self._read_body(receive)
        except BodyTooLarge:
            await _answer(send_with_headers, 413, {"detail": f"the body is larger than this server's "
                                                             f"{self.max_body_bytes} bytes"})
            return
        # A body without a content type is read as JSON too, as the routes will.
        if body and "json" in headers.get("content-type", "json"):
            problem = check_strict_json(body)
            if problem is not None:
                await _answer(send_with_headers, 400, {"detail": problem})
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send_with_headers)

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

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _answer(send: Send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
