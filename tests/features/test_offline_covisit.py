"""Sliding topk_count and covisit offline (running counts and shortlists): equal to their definition at any
instant and offset, and equal to the online engine on a history whose hot items co-occur by the thousand."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
from features_helpers import T0, ev, key_of, spine_of, spine_rows, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import Feature, FeatureEngine, FeatureRegistry, default_registry, sliding
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS
from insession.features.offline import compute, sessions
from insession.log.export import events_to_arrow
from insession.schema import Event

TOPS = [
    Feature("co", "item", "covisit", sliding(6 * HOUR_MS, HOUR_MS), k=2, span=2, gap_ms=20 * MINUTE_MS),
    Feature("co_7d", "item", "covisit", sliding(7 * DAY_MS, DAY_MS), k=3, span=5, gap_ms=30 * MINUTE_MS),
    Feature("trend", "global", "topk_count", sliding(2 * HOUR_MS, MINUTE_MS), "item_id", 3, actions=("view",)),
    Feature("u_cats", "user", "topk_count", sliding(3 * HOUR_MS, 10 * MINUTE_MS), "category", 1),
    Feature("u_short", "user", "topk_count", sliding(2 * MINUTE_MS, MINUTE_MS), "item_id", 2),  # < lateness
]


def _records(f: Feature, accepted: list[dict[str, Any]]) -> list[tuple[Any, str, int, int]]:
    """(key, value, ts, offset) of what the feature counts: events, or co-visited pairs (both directions)."""
    seen = [e for e in accepted if f.actions is None or e["action"] in f.actions]
    if f.agg == "topk_count":
        return [(key_of(f.entity, e), e[f.field or ""], e["ts"], e["offset"]) for e in seen if e[f.field or ""]]
    out, by_session = [], {}
    for e in seen:
        prev = by_session.setdefault((e["user_id"], e["sess"]), [])
        for p in prev[-f.span :]:
            if p["item_id"] != e["item_id"] and abs(p["ts"] - e["ts"]) <= f.gap_ms:
                out += [
                    (e["item_id"], p["item_id"], e["ts"], e["offset"]),
                    (p["item_id"], e["item_id"], e["ts"], e["offset"]),
                ]
        prev.append(e)
    return out


def _reference(f: Feature, records: list[tuple[Any, str, int, int]], row: dict[str, Any]) -> list[dict[str, Any]]:
    start, key = f.window.start(row["ts"]), key_of("item" if f.agg == "covisit" else f.entity, row)
    n = Counter(v for k, v, ts, off in records if k == key and off <= row["offset"] and start <= ts <= row["ts"])
    top = sorted(n.items(), key=lambda x: (-x[1], x[0]))[: f.k]
    return [{f.field or "item_id": v, "count": c} for v, c in top]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    lateness=st.sampled_from([0, 5 * MINUTE_MS, 30 * MINUTE_MS]),
    rows=spine_rows(["i0", "i1", "i2", "i9"], 40 * MINUTE_MS),
)
def test_sliding_top_counts_equal_their_definition_at_any_time_and_offset(
    events: list[Event], lateness: int, rows: list[tuple[str, str, int, int, int]]
) -> None:
    reg = FeatureRegistry.of(TOPS, lateness_ms=lateness)
    spine = spine_of(events, rows)
    table = events_to_arrow(events)
    got = compute(reg, table, pa.Table.from_pylist(spine)).to_pylist()
    accepted = sessions(reg, table).to_arrow_table().to_pylist()
    for f in TOPS:
        records = _records(f, accepted)
        for row, have in zip(spine, got, strict=True):
            assert have[f.name] == _reference(f, records, row), (f.name, row)


def _hot_history(n: int, seed: int = 0) -> list[Event]:
    """n events in time order over two days: 400 users, 40 items of which a few take most views, so the
    hottest items co-occur tens of thousands of times inside the 7-day covisit window."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 41) ** 1.2
    items = rng.choice(40, n, p=weights / weights.sum())
    users = rng.integers(0, 400, n)
    ts = T0 + np.sort(rng.integers(0, 2 * DAY_MS, n))
    ts[::97] -= 4 * MINUTE_MS  # some late events, within the lateness
    return [ev(o, f"u{users[o]}", f"i{items[o]:02d}", int(ts[o]), "view") for o in range(n)]


def test_covisit_equals_the_online_engine_on_hot_items_at_scale() -> None:
    # 16,000 rows whose windows hold up to ~400,000 pairs each: joining every pair per row (the former
    # method) ran out of 12 GB here; running counts and shortlists take a few seconds
    events = _hot_history(200_000)
    reg = FeatureRegistry.of([default_registry()["covisit"]])
    engine = FeatureEngine(reg)
    rows, want = [], []
    for cut in range(500, 200_001, 500):
        engine.update_many(events[cut - 500 : cut])
        for i in range(40):
            rows.append({"item_id": f"i{i:02d}", "ts": engine.watermark, "offset": engine.applied_offset})
            want.append(engine.read("covisit", f"i{i:02d}"))
    assert max(n["count"] for n in engine.read("covisit", "i00")) > 10_000
    got = compute(reg, events_to_arrow(events), pa.Table.from_pylist(rows))["covisit"]
    assert got.type.value_type == pa.struct([("item_id", pa.string()), ("count", pa.int64())])
    assert got.to_pylist() == want
