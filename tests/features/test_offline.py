"""The offline engine: inputs it accepts, spines without offsets, point-in-time correctness, tiled counts
against their definition, accepted events and their sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from features_helpers import T0, ev, key_of, spine_of, spine_rows, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import UNBOUNDED, Feature, FeatureEngine, FeatureRegistry, default_registry, sliding
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS
from insession.features.offline import compute, sessions
from insession.log.export import events_to_arrow, write_day_partitions
from insession.schema import ACTIONS, EVENT_ARROW_SCHEMA, Event


def _events() -> list[Event]:
    out = []
    for n in range(300):  # strictly increasing event time, three days, several users and sessions
        out.append(
            ev(
                n,
                f"u{n % 4}",
                f"i{n % 9}",
                T0 + n * 17 * MINUTE_MS,
                ACTIONS[n % 5],
                category=f"c{n % 3}",
                session="s" if n % 4 == 3 and n < 150 else None,
            )
        )
    return out


def _spine(rows: list[tuple[str, str, int]], offsets: list[int] | None = None) -> pa.Table:
    cols = {
        "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows],
        "ts": pa.array([r[2] for r in rows], pa.int64()),
    }
    if offsets is not None:
        cols["offset"] = pa.array(offsets, pa.int64())
    return pa.table(cols)


def test_parquet_history_gives_the_same_answers_as_arrow(tmp_path: Path) -> None:
    events = _events()
    write_day_partitions(events, tmp_path / "history")
    assert len(list((tmp_path / "history").glob("day=*/*.parquet"))) >= 3
    spine = _spine([(f"u{n % 4}", f"i{n % 9}", T0 + n * 11 * MINUTE_MS) for n in range(0, 400, 7)])
    reg = default_registry()
    from_parquet = compute(reg, str(tmp_path / "history" / "**" / "*.parquet"), spine)
    from_arrow = compute(reg, events_to_arrow(events), spine)
    assert from_parquet.to_pylist() == from_arrow.to_pylist()
    assert from_parquet.column_names == [*spine.column_names, *reg.features]


def test_spine_without_offsets_sees_what_arrived_while_the_watermark_was_at_most_ts() -> None:
    events = _events()
    reg = default_registry()
    engine = FeatureEngine(reg)
    rows, expected = [], []
    for cut in range(10, 300, 29):
        engine.update_many(events[:cut])
        for u, i in (("u0", "i0"), ("u3", "i4"), ("u1", "i8")):
            rows.append((u, i, engine.watermark))
            row = {"user_id": u, "item_id": i}
            expected.append({f.name: engine.read(f.name, key_of(f.entity, row)) for f in reg})
    got = compute(reg, events_to_arrow(events), _spine(rows)).to_pylist()
    for want, have in zip(expected, got, strict=True):
        assert {name: have[name] for name in want} == want


def test_point_in_time_excludes_later_events_and_late_arrivals() -> None:
    base = T0 - T0 % 3_600_000
    events = [
        ev(0, "u", "a", base),
        ev(1, "u", "b", base + 4 * MINUTE_MS),
        ev(2, "u", "c", base + 2 * MINUTE_MS),  # c arrives after b but happened before it
        ev(3, "u", "d", base - 2 * MINUTE_MS),
    ]  # 6 minutes late: dropped, online and offline
    reg = default_registry()
    table = events_to_arrow(events)
    # a training row at b's time, as of before c arrived, then after: c changes the answer only after
    out = compute(reg, table, _spine([("u", "a", base + 4 * MINUTE_MS)] * 4, offsets=[0, 1, 2, 3])).to_pylist()
    assert [[s["item_id"] for s in r["session_seq"]] for r in out] == [
        ["a"],
        ["a", "b"],
        ["a", "c", "b"],
        ["a", "c", "b"],
    ]
    # at a time before b happened, b is not visible even though it had arrived
    early = compute(reg, table, _spine([("u", "a", base + 3 * MINUTE_MS)], offsets=[3])).to_pylist()[0]
    assert [s["item_id"] for s in early["session_seq"]] == ["a", "c"]
    assert early["item_count_28d"]["view"] == 1
    assert early["session_age"] == 3 * MINUTE_MS


def test_spine_must_carry_the_keys() -> None:
    with pytest.raises(ValueError):
        compute(default_registry(), events_to_arrow(_events()), pa.table({"user_id": ["u0"], "ts": [T0]}))


# count / counts_by_action read running per-tile counts plus the events near the row's cut: check them
# against the definition at arbitrary (t, offset), not only at watermarks as the parity test does.
COUNTS = [
    Feature("u_n", "user", "count", sliding(HOUR_MS, 10 * MINUTE_MS), actions=("view", "purchase")),
    Feature("ui_n", "user_item", "count", sliding(2 * HOUR_MS, MINUTE_MS)),
    Feature("i_acts", "item", "counts_by_action", sliding(28 * DAY_MS, HOUR_MS)),
    Feature("g_n", "global", "count", sliding(3 * HOUR_MS, HOUR_MS)),
    Feature("i_all", "item", "count", UNBOUNDED),
    Feature("ui_acts", "user_item", "counts_by_action", UNBOUNDED),
]


def _accepted(events: list[Event], lateness_ms: int) -> list[Event]:
    out, wm = [], None
    for e in events:
        if wm is None or e.ts >= wm - lateness_ms:
            out.append(e)
            wm = e.ts if wm is None else max(wm, e.ts)
    return out


def _reference(f: Feature, accepted: list[Event], row: dict[str, Any]) -> object:
    start = f.window.start(row["ts"])
    seen = [
        e
        for e in accepted
        if e.offset <= row["offset"]
        and e.ts <= row["ts"]
        and (start is None or e.ts >= start)
        and (f.actions is None or e.action in f.actions)
        and key_of(f.entity, {"user_id": e.user_id, "item_id": e.item_id}) == key_of(f.entity, row)
    ]
    if f.agg == "count":
        return len(seen)
    return {a: sum(e.action == a for e in seen) for a in ACTIONS}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    lateness=st.sampled_from([0, 5 * MINUTE_MS, 30 * MINUTE_MS]),
    rows=spine_rows(["i0", "i1", "i9"], 10 * MINUTE_MS),
)
def test_tiled_counts_equal_their_definition_at_any_time_and_offset(
    events: list[Event], lateness: int, rows: list[tuple[str, str, int, int, int]]
) -> None:
    reg = FeatureRegistry.of(COUNTS, lateness_ms=lateness)
    spine = spine_of(events, rows)
    got = compute(reg, events_to_arrow(events), pa.Table.from_pylist(spine)).to_pylist()
    accepted = _accepted(events, lateness)
    for row, have in zip(spine, got, strict=True):
        for f in COUNTS:
            assert have[f.name] == _reference(f, accepted, row), (f.name, row)


def test_tiled_counts_leave_out_late_events_that_arrive_after_the_row() -> None:
    base = T0 - T0 % HOUR_MS
    events = [ev(n, "u", "a", base + n * MINUTE_MS) for n in range(30)]  # one a minute, in order
    events += [ev(30 + n, "u", "a", base + (25 + n) * MINUTE_MS, "purchase") for n in range(4)]  # late, allowed
    reg = FeatureRegistry.of(COUNTS)
    spine = pa.table(
        {
            "user_id": ["u"] * 4,
            "item_id": ["a"] * 4,
            "ts": pa.array([base + 29 * MINUTE_MS, base + 29 * MINUTE_MS, base + 26 * MINUTE_MS, base], pa.int64()),
            "offset": pa.array([29, 33, 33, 33], pa.int64()),
        }
    )
    got = compute(reg, events_to_arrow(events), spine).to_pylist()
    assert [r["ui_n"] for r in got] == [30, 34, 27 + 2, 1]
    assert [r["i_acts"]["purchase"] for r in got] == [0, 4, 2, 0]
    assert [r["u_n"] for r in got] == [30, 34, 29, 1]
    for row, have in zip(spine.to_pylist(), got, strict=True):
        assert have["g_n"] == _reference(reg["g_n"], events, row)


def test_sessions_are_the_accepted_events_numbered_by_the_session_rule() -> None:
    base = T0 - T0 % HOUR_MS
    events = [
        ev(0, "u", "a", base),
        ev(1, "v", "x", base + MINUTE_MS, session="s1"),
        ev(2, "u", "b", base + 30 * MINUTE_MS),  # exactly the gap: same session
        ev(3, "u", "c", base + 61 * MINUTE_MS),  # more than the gap: a new session
        ev(4, "v", "y", base + 62 * MINUTE_MS, session="s1"),  # the client's id keeps it open
        ev(5, "u", "d", base + 50 * MINUTE_MS),  # 12 minutes late: dropped
        ev(6, "u", "e", base + 58 * MINUTE_MS),  # late but allowed: joins the open session
        ev(7, "v", "z", base + 63 * MINUTE_MS, session="s2"),
    ]
    rel = sessions(default_registry(), events_to_arrow(events))
    got = [(r["offset"], r["user_id"], r["sess"]) for r in rel.to_arrow_table().to_pylist()]
    assert got == [(0, "u", 0), (1, "v", 0), (2, "u", 0), (3, "u", 1), (4, "v", 0), (6, "u", 1), (7, "v", 1)]
    assert rel.columns[0] == "offset"
    assert set(EVENT_ARROW_SCHEMA.names) - set(rel.columns) == {"event_id", "ingest_ts"}


@settings(max_examples=20, deadline=None)
@given(events=streams())
def test_sessions_drop_what_the_online_engine_drops(events: list[Event]) -> None:
    engine = FeatureEngine(default_registry())
    engine.update_many(events)
    accepted = sessions(default_registry(), events_to_arrow(events)).to_arrow_table()
    assert accepted.num_rows == len(events) - engine.too_late
    assert accepted["offset"].to_pylist() == [e.offset for e in _accepted(events, engine.registry.lateness_ms)]


# 10 examples, not 20: each computes every default feature once whole and once per chunk (up to 20 chunks),
# 30 s of the suite at 20; the parity tests above cover the features themselves.
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), chunk_rows=st.integers(1, 8))
def test_a_spine_answered_in_chunks_equals_it_answered_at_once(events: list[Event], chunk_rows: int) -> None:
    table = events_to_arrow(events)
    spine = _spine(
        [(f"u{n % 3}", f"i{n % 5}", events[n % len(events)].ts + n * MINUTE_MS) for n in range(20)], list(range(20))
    )
    whole = compute(default_registry(), table, spine).to_pylist()
    assert compute(default_registry(), table, spine, chunk_rows=chunk_rows).to_pylist() == whole
    assert len(whole) == 20
