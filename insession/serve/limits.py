"""Request body limits enforced before anything is buffered: an ASGI middleware.

A request whose `Content-Length` is above its endpoint's limit is answered 413 before one byte of the
body is read; a chunked (or lying) body is counted while the app reads it and cut off with 413 as soon
as it passes the limit, so no endpoint ever holds more than its limit of one request's body in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    """Raised out of `receive` when a body passes its limit while being read."""


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    """A complete JSON error answer `{"error", "code"}` (the connection closes after it)."""
    body = msgspec.json.encode({"error": message, "code": code})
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """`app.add_middleware(BodyLimit, limit_for=lambda path: nbytes)`: 413 above the path's limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        too_large = f"the body of {path} may be at most {limit} bytes"
        declared = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, "Content-Length must be a whole number of bytes", "bad_request")
                return
            if size > limit:
                await send_error(send, 413, f"{too_large}; {size} announced", "too_large")
                return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge:
            if started:  # an answer is under way already: nothing sensible to add, drop the connection
                raise
            await send_error(send, 413, f"{too_large}; more was sent", "too_large")
