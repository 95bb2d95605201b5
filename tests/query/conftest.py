"""A small real insession for the query tests: catalogue, event log, feature engine, Parquet history."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI

from insession.features import FeatureEngine, default_registry
from insession.log import Catalog, EventLog
from insession.query import Limits, QueryService, Sources
from insession.schema import ACTIONS, Event, validate_events, validate_items
from insession.serve.query_routes import router

N_ITEMS = 60  # i0..i59; i55..i59 are not in the catalogue, every fifth item is unavailable
CATALOGUED = 55


@dataclass
class World:
    dir: Path
    catalog: Catalog
    features: FeatureEngine
    log: EventLog
    query: QueryService
    now_ms: int

    @property
    def history_dir(self) -> Path:
        return self.dir / "history"

    def append(self, records: list[dict[str, Any]]) -> list[Event]:
        events = validate_events(records)
        self.catalog.enrich(events)
        self.log.append(events)
        return events

    def handle(self) -> SimpleNamespace:
        """What the lead's embedded handle offers the routes and metrics."""
        return SimpleNamespace(
            query=self.query,
            features=self.features,
            log=self.log,
            catalog=self.catalog,
            history_dir=self.history_dir,
            wake=self.log.wake,
        )

    def close(self) -> None:
        self.query.close()
        self.log.close()
        self.catalog.close()


def events(n: int, now_ms: int, seed: int = 0, users: int = 8) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "user_id": f"u{rng.randrange(users)}",
            "item_id": f"i{rng.randrange(N_ITEMS)}",
            "action": rng.choice(ACTIONS[:4]),
            "ts": now_ms - (n - j) * 60_000,
            "surface": rng.choice(["home", "search", None]),
            "properties": {"q": rng.choice(["milk", "bread"])} if rng.random() < 0.2 else None,
        }
        for j in range(n)
    ]


def make_world(
    path: Path,
    n: int = 400,
    exported: int | None = 250,
    limits: Limits | None = None,
    sources: Sources | None = None,
) -> World:
    catalog = Catalog(path / "catalog.sqlite")
    catalog.upsert(
        validate_items(
            [
                {
                    "item_id": f"i{i}",
                    "category": f"c{i % 7}",
                    "subcategory": f"s{i % 11}",
                    "price": 1.0 + i,
                    "brand": f"b{i % 3}",
                    "available": i % 5 != 0,
                }
                for i in range(CATALOGUED)
            ]
        )
    )
    features = FeatureEngine(default_registry())
    log = EventLog(path / "log.sqlite", on_commit=features.update_many)
    now_ms = int(time.time() * 1000)
    service = QueryService(features, log, catalog, path / "history", limits, sources=sources)
    world = World(path, catalog, features, log, service, now_ms)
    world.append(events(n, now_ms))
    if exported is not None:
        log.export(world.history_dir, upto_offset=exported)
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("world"))
    yield w
    w.close()


def make_app(handle: Any, auth: Any = None) -> FastAPI:
    """The query router on an app, as the lead's app factory mounts it."""
    app = FastAPI()
    app.state.insession = handle
    if auth is not None:
        app.state.auth = auth
    app.include_router(router)
    return app
