"""Shared helpers for the feature tests: event builders, random streams, online-vs-offline comparison."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from hypothesis import strategies as st

from insession.features import (
    BEFORE_SESSION,
    SESSION,
    UNBOUNDED,
    Feature,
    FeatureEngine,
    FeatureRegistry,
    sliding,
)
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS
from insession.features.offline import compute
from insession.log.export import events_to_arrow
from insession.schema import ACTIONS, Event, price_band

T0 = 1_500_000_000_000  # 2017-07-14: event time, not the wall clock, drives everything


def ev(
    offset: int,
    user: str,
    item: str,
    ts: int,
    action: str = "view",
    *,
    category: str | None = "c0",
    session: str | None = None,
    price: float | None = None,
    color: object = None,
    brand: str | None = None,
    item_price: float | None = None,
) -> Event:
    """An event; `price`/`color` are properties (color may be text or not), `brand`/`item_price` the
    catalogue's attributes joined at ingest (price_band derived as ingest derives it)."""
    props = {k: v for k, v in (("price", price), ("color", color)) if v is not None}
    return Event(
        user_id=user,
        item_id=item,
        action=action,
        ts=ts,
        event_id=f"e{offset}",
        session_id=session,
        category=category,
        properties=props or None,
        offset=offset,
        brand=brand,
        price=item_price,
        price_band=price_band(item_price),
    )


# Every aggregation and window kind, with short windows so tiles expire inside a small stream.
ALL_KINDS = FeatureRegistry.of(
    [
        Feature("n_2h", "user", "count", sliding(2 * HOUR_MS, 10 * MINUTE_MS), actions=("view", "purchase")),
        Feature("n_all", "item", "count"),
        Feature("spend_1h", "user", "sum", sliding(HOUR_MS, MINUTE_MS), "properties.price"),
        Feature("last_cat", "user", "last", sliding(HOUR_MS, 30 * MINUTE_MS), "category"),
        Feature("last_item", "user_item", "last", UNBOUNDED, "item_id"),
        Feature("seq_1h", "user", "last_n", sliding(HOUR_MS, 15 * MINUTE_MS), k=3),
        Feature("seq_all", "user", "last_n", UNBOUNDED, k=4, actions=("view", "add_to_cart")),
        Feature("hist_views", "user", "last_n", BEFORE_SESSION, k=3, actions=("view",)),
        Feature("sess_carts", "user", "count", SESSION, actions=("add_to_cart",)),
        Feature("sess_cats", "user", "distinct_topk", SESSION, "category", 2),
        Feature("cats_3h", "user", "distinct_topk", sliding(3 * HOUR_MS, HOUR_MS), "category", 2),
        Feature("top_items", "global", "topk_count", sliding(HOUR_MS, 5 * MINUTE_MS), "item_id", 2),
        Feature("user_top_items", "user", "topk_count", UNBOUNDED, "item_id", 2),
        Feature("actions_1h", "item", "counts_by_action", sliding(HOUR_MS, 20 * MINUTE_MS)),
        Feature("age_3h", "user", "age", sliding(3 * HOUR_MS, HOUR_MS)),
        Feature("co", "item", "covisit", sliding(6 * HOUR_MS, HOUR_MS), k=3, span=2, gap_ms=20 * MINUTE_MS),
    ]
)


# Steps between consecutive events: mostly forward, sometimes far forward (tiles expire, sessions
# close), sometimes back within the allowed lateness, sometimes beyond it (dropped and counted).
_STEPS = st.one_of(
    st.integers(0, 10 * MINUTE_MS),
    st.integers(10 * MINUTE_MS, 3 * HOUR_MS),
    st.integers(3 * HOUR_MS, 20 * DAY_MS),
    st.integers(-5 * MINUTE_MS, 0),
    st.integers(-3 * HOUR_MS, -5 * MINUTE_MS),
)


@st.composite
def streams(draw: st.DrawFn, max_events: int = 60) -> list[Event]:
    """Random streams in offset order: out of order events and re-sent copies (new ids) included."""
    n = draw(st.integers(1, max_events))
    out: list[Event] = []
    ts = T0
    for off in range(n):
        if out and draw(st.integers(0, 9)) == 0:  # a re-sent copy of an earlier event, with a new id
            src = out[draw(st.integers(0, len(out) - 1))]
            out.append(
                ev(
                    off,
                    src.user_id,
                    src.item_id,
                    src.ts,
                    src.action,
                    category=src.category,
                    session=src.session_id,
                    price=(src.properties or {}).get("price"),
                    color=(src.properties or {}).get("color"),
                    brand=src.brand,
                    item_price=src.price,
                )
            )
            continue
        ts += draw(_STEPS)
        out.append(
            ev(
                off,
                draw(st.sampled_from(["u0", "u1", "u2"])),
                draw(st.sampled_from(["i0", "i1", "i2", "i3", "i4"])),
                ts,
                draw(st.sampled_from(ACTIONS)),
                category=draw(st.sampled_from(["c0", "c1", "c2", None])),
                session=draw(st.sampled_from([None, None, None, "s1", "s2"])),
                price=draw(st.sampled_from([None, 1.5, 2.0, 10.25])),
                color=draw(st.sampled_from([None, "red", "blue", 3, True])),
                brand=draw(st.sampled_from([None, "b0", "b1"])),
                item_price=draw(st.sampled_from([None, 5.0, 30.0, 700.0])),
            )
        )
    return out


def spine_rows(items: list[str], max_dt_ms: int) -> st.SearchStrategy[list[tuple[str, str, int, int, int]]]:
    """Spine rows (user, item, j, dt, offset): at event j's time + dt, as of offset (-1: before any)."""
    return st.lists(
        st.tuples(
            st.sampled_from(["u0", "u1", "u9"]),
            st.sampled_from(items),
            st.integers(0, 59),
            st.integers(-max_dt_ms, max_dt_ms),
            st.integers(-1, 60),
        ),
        min_size=1,
        max_size=30,
    )


def spine_of(events: list[Event], rows: list[tuple[str, str, int, int, int]]) -> list[dict[str, Any]]:
    """The spine dicts of `spine_rows` over `events`."""
    return [{"user_id": u, "item_id": i, "ts": events[j % len(events)].ts + dt, "offset": o} for u, i, j, dt, o in rows]


def key_of(entity: str, row: dict[str, Any]) -> str | tuple[str, str] | None:
    return {
        "user": row["user_id"],
        "item": row["item_id"],
        "user_item": (row["user_id"], row["item_id"]),
        "global": None,
    }[entity]


def online_reads(
    registry: FeatureRegistry, events: list[Event], cuts: list[int]
) -> tuple[list[dict[str, Any]], FeatureEngine]:
    """Replay `events` in batches ending at each cut; after each batch read every feature for every
    (user, item) pair, at the watermark. Returns spine rows (with the online values) and the engine."""
    engine = FeatureEngine(registry)
    rows: list[dict[str, Any]] = []
    start = 0
    for cut in sorted(set(cuts)):
        engine.update_many(events[start:cut])
        start = cut
        for u in ("u0", "u1", "u2", "u9"):
            for i in ("i0", "i1", "i2", "i3", "i4", "i9"):
                row: dict[str, Any] = {
                    "user_id": u,
                    "item_id": i,
                    "ts": engine.watermark,
                    "offset": engine.applied_offset,
                }
                row["online"] = {f.name: engine.read(f.name, key_of(f.entity, row)) for f in registry}
                rows.append(row)
    return rows, engine


def assert_parity(registry: FeatureRegistry, events: list[Event], rows: list[dict[str, Any]]) -> None:
    spine = pa.table(
        {
            "user_id": [r["user_id"] for r in rows],
            "item_id": [r["item_id"] for r in rows],
            "ts": pa.array([r["ts"] for r in rows], pa.int64()),
            "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        }
    )
    offline = compute(registry, events_to_arrow(events), spine).to_pylist()
    for row, off in zip(rows, offline, strict=True):
        for f in registry:
            on, want = row["online"][f.name], off[f.name]
            if f.agg == "sum":
                assert abs(on - want) <= 1e-9 * max(1.0, abs(want)), (f.name, row, on, want)
            else:
                assert on == want, (
                    f.name,
                    {k: row[k] for k in ("user_id", "item_id", "ts", "offset")},
                    on,
                    want,
                )


def until(what: str, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait for `done()` (polled every 20 ms); fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.02)
