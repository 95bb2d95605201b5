"""Request body limits enforced before anything is buffered: an ASGI middleware.

A request whose `Content-Length` is above its endpoint's limit is answered 413 before one byte of the
body is read; a chunked (or lying) body is counted while the app reads it and cut off with 413 as soon
as it passes the limit, so no endpoint ever holds more than its limit of one request's body in memory.
Large bodies (announced above `large_bytes`, or chunked) are admitted at most `per_client` at a time per
client address; one more is answered 429 with Retry-After, so one client cannot hold many limits' worth.
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


async def send_error(send: Send, status: int, message: str, code: str,
                     extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    """A complete JSON error answer `{"error", "code"}` (the connection closes after it)."""
    body = msgspec.json.encode({"error": message, "code": code})
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), *extra],
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """`app.add_middleware(BodyLimit, limit_for=lambda path: nbytes, large_bytes=..., per_client=...)`:
    413 above the path's limit; 429 for a client's large body beyond `per_client` in flight."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int], large_bytes: int = 1 << 20,
                 per_client: int = 4) -> None:
        self.app = app
        self.limit_for = limit_for
        self.large_bytes = large_bytes
        self.per_client = per_client
        self._large: dict[str, int] = {}  # client address -> large bodies in flight (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        too_large = f"the body of {path} may be at most {limit} bytes"
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        declared = headers.get(b"content-length")
        size = 0
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, "Content-Length must be a whole number of bytes", "bad_request")
                return
            if size > limit:
                await send_error(send, 413, f"{too_large}; {size} announced", "too_large")
                return
        if size > self.large_bytes or b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            client = (scope.get("client") or ("?",))[0]
            if self._large.get(client, 0) >= self.per_client:
                await send_error(send, 429, f"at most {self.per_client} bodies over {self.large_bytes} bytes "
                                 "(or chunked) at a time per client; retry when one is done", "too_many_large",
                                 [(b"retry-after", b"1")])
                return
            self._large[client] = self._large.get(client, 0) + 1
            try:
                await self._limited(scope, receive, send, limit, too_large)
            finally:
                self._large[client] -= 1
                if not self._large[client]:
                    del self._large[client]
            return
        await self._limited(scope, receive, send, limit, too_large)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: str) -> None:
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
