"""The feature reader: a second serving process for feature reads, on a port of its own (`[server] reader_port`).

Why: a server's Python work runs on one core, its GIL's. Under bench_mixed's load at a million shoppers (5,000
events/s, 500 feature reads/s, 100 rankings/s) the server needed all of it, and every request queued: py-spy
put ~40% of its GIL in the HTTP stack, ~25% in ranking, ~11% in ingest and ~10% in feature reads
(docs/architecture.md, 2026-11-30). The
partitions of the state were the unit to spread, but the shoppers' reads, not the state, were what needed a
second core. A reader takes the feature reads and their HTTP to its own process and GIL, for a second copy of
the state in memory (about the server's RSS) and the CPU to apply the log to it. Measured in bench_mixed at a
million shoppers under that load with analytics beside (2026-11-30/12-01, three runs): feature reads on the
reader p50 4.3-5.0 ms, p99 143-301 ms, against p50 32-33 s with every request on the saturated server; sent
rankings instead, the reader ran near a core too (docs/bench/bench_mixed.md).

The contract:
- `reader_process` (the server's handle, `insession.serve.app`, a `ChildProcess`) starts
  `python -m insession.serve.reader` with the data directory and the server's pid; the server's config (the
  port, and API keys: never on a command line, which every user of the host can read) arrives on its stdin.
  It is restarted when it exits: after 2, 4, 8 ... s (at most 60) when it failed, counted; after a snapshot
  interval when it stopped to start on new declarations (`EXIT_RESTART`). While it is down its port refuses
  connections: read through the server.
- The child opens an `insession.embedded.Replica` (the last snapshot, the log after it: before it listens),
  then serves `GET /v1/features/{entity}/{key}`, `POST /v1/features` and `POST /v1/rank` with the server's
  own route functions, API-key checks, hygiene rules, body limits and answers (ranking with the model version
  the server serves, `models/SERVING`, followed within 5 s of a reload), and `/healthz`, `/readyz` (its
  applied offset and lag). Anything else is answered 421 `misdirected`, naming the server's port: writes,
  queries and model reloads go to the server.
- Freshness: the reader applies the log within its poll (50 ms) of the server's commit. A read that must see
  a write sends `X-Insession-Min-Offset` (the write's offset, as for a cluster's nodes): the reader waits until
  it applied it (`[cluster] read_wait_s`) or answers 503 `behind`.
- It exits 0 on SIGTERM or when its parent is gone, `EXIT_RESTART` when the declarations change, 1 when
  following the log failed (it never serves a copy that stopped moving).
- The embedded log only (`log.sqlite`), and a server holding every partition: the config refuses the others.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from insession.embedded import Replica
from insession.features.child import EXIT_RESTART, ChildProcess
from insession.serve import query_routes, rank_routes
from insession.serve.auth import Auth
from insession.serve.config import Config, parse_config
from insession.serve.limits import BodyLimit
from insession.serve.metrics import Metrics

log = logging.getLogger(__name__)

_PARENT_CHECK_S = 1.0


def reader_process(data_dir: Path, config: Config) -> ChildProcess:
    """The server's feature reader (`python -m insession.serve.reader`), supervised as a `ChildProcess`: its
    config on stdin, started again a snapshot interval after asking to be, with backoff after a failure."""
    command = [sys.executable, "-m", "insession.serve.reader", str(data_dir), "--parent", str(os.getpid())]
    return ChildProcess("feature reader", command, restart_after_s=config.features.snapshot_interval_s,
                        stdin=msgspec.json.encode(config), consequence="; meanwhile read features through the server")


def reader_app(replica: Replica, config: Config) -> FastAPI:
    """The reader's routes over `replica` (see the module docstring)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replica.start()
        yield

    app = FastAPI(title="insession feature reader", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.auth = Auth(config.auth.keys)
    app.state.metrics = Metrics()
    app.state.insession = replica
    app.add_middleware(BodyLimit, limit_for=config.http.limit_for, large_bytes=config.http.large_body_bytes,
                       per_client=config.http.large_bodies_per_client)
    app.add_api_route("/v1/features/{entity}/{key}", query_routes.get_features, methods=["GET"])
    app.add_api_route("/v1/features", query_routes.post_features, methods=["POST"])
    app.add_api_route("/v1/rank", rank_routes.rank, methods=["POST"])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready while it follows the log; its applied offset and how many events it trails the log by."""
        body = {"ready": not replica.stale.is_set(), "role": "feature reader",
                "applied_offset": replica.features.applied_offset, "lag": replica.lag(),
                "watermark": replica.features.watermark}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def misdirected(request: Request) -> Response:
        return JSONResponse({"error": f"this is the feature reader: it serves GET /v1/features/..., POST "
                             f"/v1/features and POST /v1/rank; send {request.method} {request.url.path} to the "
                             f"server (port {config.server.port})", "code": "misdirected"}, status_code=421)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m insession.serve.reader", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--parent", type=int, required=True, help="the server's pid: exit when it is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s insession-reader %(levelname)s %(message)s")
    config = parse_config(sys.stdin.read(), "json", name="the server's config")
    sys.setswitchinterval(config.server.gil_switch_ms / 1000)
    replica = Replica(args.data_dir, partitions=config.features.partitions, max_users=config.features.max_users,
                      limits=config.query.limits(), rank_config=config.rank.rank_config())
    server = uvicorn.Server(uvicorn.Config(reader_app(replica, config), host=config.server.host,
                                           port=config.server.reader_port, loop="uvloop", http="httptools",
                                           access_log=False, log_level="warning"))

    def watch() -> None:  # stop serving when the parent is gone or the copy went stale
        while not server.should_exit:
            if os.getppid() != args.parent or replica.stale.wait(_PARENT_CHECK_S):
                server.should_exit = True

    threading.Thread(target=watch, name="insession-reader-watch", daemon=True).start()
    log.info("feature reader: state at offset %d, serving on %s:%d", replica.features.applied_offset,
             config.server.host, config.server.reader_port)
    try:
        server.run()  # SIGTERM or Ctrl-C: uvicorn finishes the requests in flight, then the signal ends the process
    finally:
        replica.close()
    if replica.failed:
        return 1  # started again after 1, 2, 4 ... s, counted as a failure
    return EXIT_RESTART if replica.stale.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
