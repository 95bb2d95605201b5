"""The console's routes: HTML pages under `/console`, their JSON and server-sent-event feeds, static files.

Mount with `app.include_router(router)`; the routes read `app.state.insession`, `app.state.auth` and
`app.state.metrics` like the API's routers.

Access: the pages themselves are shells without data (so a browser can load them before it has a key);
every figure comes from `/console/api/...` or the public API (`/v1/query`, `/v1/admin/reload`), which
check the key in the `X-API-Key` header with `insession.serve.auth.authorize`: any of serve, analytics
or admin reads, only admin reloads (the existing admin route decides). The browser keeps the key in
session storage and sends it as that header, also on the event streams (read with `fetch`, since
`EventSource` cannot send headers), so no cookie is involved and no cross-site request can act with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from insession.model.artefact import CURVE
from insession.schema import MAX_ID_LEN
from insession.serve.auth import ROLES, Principal, authorize
from insession.serve.config import ClusterConfig
from insession.serve.console.figures import Sample, overview
from insession.serve.console.views import cluster_view, features_view, model_versions, models_view, shopper_view
from insession.serve.forward import here_or_there
from insession.serve.metrics import metrics_of

HERE = Path(__file__).parent
STATIC = HERE / "static"
PAGES = ("overview", "shopper", "features", "query", "models", "cluster")
READ_ROLES = ("serve", "analytics")  # admin implies both
OVERVIEW_EVERY_S = 1.0  # one overview message a second
OVERVIEW_WINDOW_S = 10.0  # rates and percentiles over the last 10 s
# Each event stream ends after this long and the page reconnects at once. uvicorn's graceful shutdown
# waits for every open response, so this bounds how long an open console tab delays a server's stop
# (and notices a closed tab within as long).
STREAM_S = 5.0

# Pages run only the console's own files: no inline or foreign script, no framing by other sites.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

UserId = PathParam(max_length=MAX_ID_LEN, description="the shopper's user_id")

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))
_json = msgspec.json.Encoder(enc_hook=str)  # feature values JSON has no type for travel as text


def _event(data: Any) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return b"data: " + _json.encode(data) + b"\n\n"


def _stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json_response(data: Any) -> Response:
    return Response(_json.encode(data), media_type="application/json")


# -- pages --------------------------------------------------------------------------------------------


@router.get("")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/overview")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    """A vendored or own static file (only the files shipped in `static/`, no sub-paths)."""
    path = STATIC / name
    if Path(name).name != name or not path.is_file():
        raise HTTPException(404, detail="no such static file")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/{page}")
async def console_page(request: Request, page: str) -> Response:
    """A page shell; its script asks for a key when access control is on, then loads the page's data."""
    if page not in PAGES:
        raise HTTPException(404, detail=f"no console page {page!r}; pages: {', '.join(PAGES)}")
    return templates.TemplateResponse(request, f"{page}.html", {"page": page, "pages": PAGES},
                                      headers=PAGE_HEADERS)


# -- data -----------------------------------------------------------------------------------------------


@router.get("/api/whoami")
async def whoami(request: Request) -> Response:
    """Who the presented key is: `{auth: false}` when access control is off, else `{auth, valid, name, roles}`.

    Answers 200 for a missing or unknown key too (`valid: false`): the login form asks this to check a key.
    """
    auth = getattr(request.app.state, "auth", None)
    if auth is None or not auth.enabled:
        return _json_response({"auth": False, "valid": True, "name": None, "roles": list(ROLES)})
    try:
        principal: Principal | None = authorize(request, *ROLES)
    except HTTPException:
        return _json_response({"auth": True, "valid": False, "name": None, "roles": []})
    assert principal is not None
    return _json_response({"auth": True, "valid": True, "name": principal.name,
                           "roles": sorted(principal.roles)})


@router.get("/api/overview/stream")
async def overview_stream(request: Request) -> StreamingResponse:
    """Server-sent events, one a second: the overview figures over the last 10 s (see `figures.overview`);
    the stream ends after STREAM_S and the page reconnects."""
    authorize(request, *READ_ROLES)
    registry = metrics_of(request).registry
    window = _window(request)

    async def body() -> AsyncIterator[bytes]:
        deadline = time.monotonic() + STREAM_S
        while True:
            now = await run_in_threadpool(Sample.read, registry)  # the pulled gauges read SQLite
            yield _event(overview(now, window.base(now)))
            if time.monotonic() + OVERVIEW_EVERY_S > deadline:
                return
            await asyncio.sleep(OVERVIEW_EVERY_S)

    return _stream(body())


@router.get("/api/features")
async def features(request: Request) -> Response:
    """The feature declarations with their SQL form, window, freshness and hygiene counts."""
    authorize(request, *READ_ROLES)
    registry = metrics_of(request).registry
    now = await run_in_threadpool(Sample.read, registry)
    return _json_response(features_view(request.app.state.insession, now))


@router.get("/api/shopper/{user_id}")
async def shopper(request: Request, user_id: str = UserId) -> Response:
    """One shopper right now (see `views.shopper_view`); a shopper another node holds is read there."""
    authorize(request, *READ_ROLES)
    gate = await here_or_there(request, user_id)
    if gate is not None:
        return gate
    return _json_response(await run_in_threadpool(shopper_view, request.app.state.insession, user_id))


@router.get("/api/shopper/{user_id}/stream")
async def shopper_stream(request: Request, user_id: str = UserId) -> Response:
    """Server-sent events: the shopper now, then again each time features applied an event of theirs;
    the stream ends after STREAM_S and the page reconnects (reading the shopper anew). A shopper another
    node holds is streamed from there, relayed."""
    authorize(request, *READ_ROLES)
    gate = await here_or_there(request, user_id)
    if gate is not None:
        return gate
    db = request.app.state.insession
    hub = _hub(request)

    async def body() -> AsyncIterator[bytes]:
        deadline = time.monotonic() + STREAM_S
        changed = hub.subscribe(user_id)
        try:
            while True:
                changed.clear()
                yield _event(await run_in_threadpool(shopper_view, db, user_id))
                try:
                    await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
                except TimeoutError:
                    return
        finally:
            hub.unsubscribe(user_id, changed)

    return _stream(body())


@router.get("/api/models")
async def models(request: Request) -> Response:
    """Model artefact versions, the serving one, and the running feature hash."""
    authorize(request, *READ_ROLES)
    return _json_response(await run_in_threadpool(models_view, request.app.state.insession))


@router.get("/api/models/{version}/curve.png")
async def model_curve(request: Request, version: str) -> FileResponse:
    """The training curve an artefact version saved."""
    authorize(request, *READ_ROLES)
    for path in model_versions(request.app.state.insession.ranker.model_dir):
        if path.name == version and (path / CURVE).is_file():
            return FileResponse(path / CURVE, media_type="image/png")
    raise HTTPException(404, detail=f"no curve for model version {version!r}")


@router.get("/api/cluster")
async def cluster(request: Request) -> Response:
    """This node's view of the replicated log (see `views.cluster_view`); `{replicated: false}` on the embedded log."""
    authorize(request, *READ_ROLES)
    config = getattr(request.app.state, "config", None)
    return _json_response(cluster_view(request.app.state.insession, config.cluster if config else ClusterConfig()))


# -- shared state of the streams --------------------------------------------------------------------


class SampleWindow:
    """The registry samples of the last OVERVIEW_WINDOW_S, shared by every overview stream of an app,
    so a reconnecting page keeps its window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque()

    def base(self, now: Sample) -> Sample:
        """The oldest sample within the window before `now` (an empty one at first), then keeps `now`."""
        with self._lock:
            while self._samples and now.at - self._samples[0].at > OVERVIEW_WINDOW_S:
                self._samples.popleft()
            oldest = self._samples[0] if self._samples else Sample(now.at)
            self._samples.append(now)
            return oldest


def _window(request: Request) -> SampleWindow:
    state = request.app.state
    window: SampleWindow | None = getattr(state, "console_window", None)
    if window is None:
        window = state.console_window = SampleWindow()
    return window


# -- shopper change notifications --------------------------------------------------------------------


class ShopperHub:
    """Wakes the open shopper streams of the users in each group of events the features applied.

    `applied` is an `Insession.applied_listeners` entry: it runs on the log's writer thread after the
    features applied the group (before the ack), so a woken stream reads the new state; it does nothing
    when no stream is open.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def subscribe(self, user_id: str) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._waiting.setdefault(user_id, set()).add(event)
        return event

    def unsubscribe(self, user_id: str, event: asyncio.Event) -> None:
        with self._lock:
            waiting = self._waiting.get(user_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiting[user_id]

    def applied(self, events: Sequence[Any]) -> None:
        if not self._waiting:
            return
        with self._lock:
            woken = [e for user in {ev.user_id for ev in events} for e in self._waiting.get(user, ())]
        for event in woken:
            self._loop.call_soon_threadsafe(event.set)


def _hub(request: Request) -> ShopperHub:
    """The app's hub, registered with the embedded handle on first use (one per app)."""
    state = request.app.state
    hub: ShopperHub | None = getattr(state, "console_hub", None)
    if hub is None:
        hub = state.console_hub = ShopperHub(asyncio.get_running_loop())
        state.insession.applied_listeners.append(hub.applied)
    return hub
