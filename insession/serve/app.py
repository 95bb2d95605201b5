"""The HTTP API (FastAPI): ingest and catalogue endpoints, health, and the routers of the other parts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from insession.embedded import Insession
from insession.features.child import ChildProcess
from insession.schema import BatchRejected, EventIn, ItemIn, decode_body
from insession.serve import query_routes, rank_routes
from insession.serve.auth import SECURITY, Auth, authorize
from insession.serve.config import Config, exposure_warning, load_config
from insession.serve.console import router as console_router
from insession.serve.forward import Forwarder
from insession.serve.limits import BodyLimit
from insession.serve.metrics import Metrics, cluster_status
from insession.serve.reader import reader_process

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()


def _rejected(e: BatchRejected) -> JSONResponse:
    return JSONResponse(
        status_code=e.status,
        content={"error": str(e), "errors": [msgspec.structs.asdict(x) for x in e.errors]},
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A fault of the server (never of the input): the details go to the server log, not to the client."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error; the server log has the details", "code": "internal"}, 500)


def _body_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """OpenAPI request body for one record, an array of them, or NDJSON, from the schema module's struct."""
    doc = msgspec.json.schema(struct)
    schema = doc["$defs"][struct.__name__]
    one_or_many = {"oneOf": [schema, {"type": "array", "items": schema}]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": one_or_many},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    }


async def _supervise(reader: ChildProcess) -> None:
    """Start the feature reader, and again whenever it exits (`ChildProcess.check`)."""
    while True:
        reader.check()
        await asyncio.sleep(1.0)


def open_handle(data_dir: str | Path, cfg: Config) -> Insession:
    """The embedded handle a server runs on, built from its config. Raises DataDirError for a data
    directory in use or one whose log holds less than what was built from it."""
    return Insession(
        data_dir,
        maintenance_interval_s=cfg.server.maintenance_interval_s,
        limits=cfg.query.limits(),
        rank_config=cfg.rank.rank_config(),
        snapshot_interval_s=cfg.features.snapshot_interval_s,
        max_users=cfg.features.max_users,
        partitions=cfg.features.partitions,
        log_config=cfg.log,
        held=cfg.cluster.held(cfg.features.partitions),
        snapshot_writer=cfg.features.snapshot_writer,
    )


def create_app(data_dir: str | Path | None = None, *, handle: Insession | None = None,
               config: Config | str | Path | None = None, close_handle: bool = False) -> FastAPI:
    """Build the app over an embedded handle (opened from `data_dir` if not given, closed on shutdown; a
    given handle is closed on shutdown too with `close_handle`: uvicorn re-raises SIGTERM once it has shut
    down, so nothing after `uvicorn.run` would run).

    `config`: a `Config` or a server config file (`insession.serve.config`); none means the defaults
    (auth off, loopback). Raises ConfigError for a bad file, and when `config.server.host` is not a
    loopback address while no API key is configured, unless `insecure_no_auth` accepts it (then the
    warning is logged at start and shown on /readyz).
    """
    if handle is None and data_dir is None:
        raise ValueError("create_app needs data_dir or handle")
    cfg = config if isinstance(config, Config) else load_config(config)
    warning = exposure_warning(cfg)
    auth = Auth(cfg.auth.keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = handle is None or close_handle
        db = app.state.insession = handle or open_handle(data_dir, cfg)  # type: ignore[arg-type]
        reader = app.state.reader = reader_process(db.data_dir, cfg) if cfg.server.reader_port else None
        app.state.metrics.bind(db, app.state.forwarder, reader)
        if warning:
            log.warning("%s", warning)
        supervise = asyncio.create_task(_supervise(reader)) if reader is not None else None
        try:
            yield
        finally:
            if supervise is not None and reader is not None:
                supervise.cancel()
                await asyncio.to_thread(reader.stop, 30.0)
            if app.state.forwarder is not None:
                await app.state.forwarder.close()
            if owned:
                db.close()

    app = FastAPI(title="insession", version="0.1.0", lifespan=lifespan)
    app.state.config = cfg
    app.state.auth = auth
    app.state.metrics = Metrics()
    app.state.warnings = [warning] if warning else []
    split = cfg.cluster.held(cfg.features.partitions) is not None  # this node holds some partitions only
    app.state.forwarder = Forwarder(cfg.cluster, cfg.features.partitions) if split else None
    app.add_middleware(BodyLimit, limit_for=cfg.http.limit_for, large_bytes=cfg.http.large_body_bytes,
                       per_client=cfg.http.large_bodies_per_client)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(query_routes.router)
    app.include_router(rank_routes.router)
    app.include_router(console_router)

    async def _insert(request: Request, table: str) -> Response:
        authorize(request, "ingest")
        db: Insession = request.app.state.insession
        metrics: Metrics = request.app.state.metrics
        t0 = time.perf_counter()
        try:
            records = decode_body(await request.body(), request.headers.get("content-type"))
            result = await run_in_threadpool(db.insert, table, records)
        except BatchRejected as e:
            metrics.ingest_failed(table, e.status)
            return _rejected(e)
        metrics.observe_ingest(table, result.stored, time.perf_counter() - t0)
        return Response(_json.encode(result), media_type="application/json")

    @app.post("/v1/events", openapi_extra={**_body_schema(EventIn), **SECURITY}, tags=["ingest"])
    async def post_events(request: Request) -> Response:
        """Insert one event, a JSON array of events, or NDJSON; acknowledged once durable. All-or-nothing."""
        return await _insert(request, "events")

    @app.put("/v1/items", openapi_extra={**_body_schema(ItemIn), **SECURITY}, tags=["ingest"])
    async def put_items(request: Request) -> Response:
        """Upsert catalogue rows (one object, an array, or NDJSON). All-or-nothing."""
        return await _insert(request, "items")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> Response:
        """Readiness: the log is open and features have caught up with it, and no background job (export,
        snapshot) is failing; a failing one is named with the kind of its error (503). On a replicated log,
        `cluster` details the quorum, lag and `stale` (still ready: reads serve from state without a quorum)."""
        db: Insession | None = getattr(request.app.state, "insession", None)
        warnings = {"warnings": request.app.state.warnings} if request.app.state.warnings else {}
        if db is None:
            return JSONResponse({"ready": False, **warnings}, status_code=503)
        failing = {job: error for job, error in db.job_errors.items() if error}
        body = {"ready": not failing, **db.lag(), "watermark": db.features.watermark, **warnings}
        if getattr(request.app.state, "reader", None) is not None:  # [server] reader_port
            reader = request.app.state.reader
            body["reader"] = {"port": cfg.server.reader_port, "running": reader.running(), "starts": reader.starts,
                              "failures": reader.failures}
        if len(db.features.held) < db.features.partitions:  # [cluster] copies: the others' shoppers are forwarded
            body["held_partitions"] = sorted(db.features.held)
        cluster = cluster_status(db)  # a replicated log: quorum, lag, stale (reads serve on without a quorum)
        if cluster is not None:
            body["cluster"] = msgspec.to_builtins(cluster)
        if failing:
            return JSONResponse({**body, "failing": failing}, status_code=503)
        return JSONResponse(body)

    return app
