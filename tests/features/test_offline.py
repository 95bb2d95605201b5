"""The offline engine: inputs it accepts, spines without offsets, point-in-time correctness."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from features_helpers import T0, ev, key_of

from insession.features import FeatureEngine, default_registry
from insession.features.declare import MINUTE_MS
from insession.features.offline import compute
from insession.log.export import events_to_arrow, write_day_partitions
from insession.schema import ACTIONS, Event


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
