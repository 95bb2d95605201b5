"""The analytics lane: history UNION tail, limits, deadline, and the bounded queue (429)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from insession.query import Limits, QueryError, Sources
from insession.query.analytics import AnalyticsLane
from insession.schema import EVENT_ARROW_SCHEMA, ITEM_ARROW_SCHEMA

from .conftest import World, events, make_world


def test_every_acknowledged_event_is_seen_exactly_once(tmp_path: Path) -> None:
    w = make_world(tmp_path, n=300, exported=120)
    try:

        def counts() -> tuple[int, int, int]:
            r = w.query.execute('SELECT count(*), count(DISTINCT "offset"), max("offset") FROM events')
            return tuple(r.rows[0])  # type: ignore[return-value]

        assert counts() == (300, 300, 299)
        w.append(events(5, w.now_ms, seed=9))  # acknowledged a moment ago, not exported
        assert counts() == (305, 305, 304)
        w.log.export(w.history_dir)  # everything exported, no tail
        assert counts() == (305, 305, 304)
    finally:
        w.close()


def test_history_files_beyond_the_export_mark_are_not_counted_twice(tmp_path: Path) -> None:
    """An export that wrote files but had not yet recorded its mark: the tail still holds those events."""
    w = make_world(tmp_path, n=200, exported=50)
    try:
        frozen = w.log.exported_offset()
        w.log.export(w.history_dir)  # files now cover all 200 events
        sources = Sources(w.history_dir, lambda: frozen, w.log.tail_arrow, w.catalog.to_arrow)
        lane = AnalyticsLane(sources)
        table = lane.submit('SELECT count(*), count(DISTINCT "offset") FROM events', {}).result()
        assert table.rows == [[200, 200]]
        lane.close()
    finally:
        w.close()


def test_times_are_timestamps_in_sql(world: World) -> None:
    r = world.query.execute("SELECT min(ts), max(ingest_ts) FROM events WHERE ts > now() - INTERVAL 1 DAY")
    assert r.rows[0][0] is not None
    assert world.query.execute("SELECT typeof(ts) FROM events LIMIT 1").rows == [["TIMESTAMP"]]


def _sources(n: int = 1000, gate: threading.Event | None = None) -> Sources:
    tail = pa.table(
        {
            "offset": list(range(n)),
            "user_id": [f"u{i % 10}" for i in range(n)],
            "item_id": ["i1"] * n,
            "action": ["view"] * n,
            "ts": [1_700_000_000_000 + i for i in range(n)],
            "event_id": [None] * n,
            "session_id": [None] * n,
            "surface": [None] * n,
            "properties": [None] * n,
            "category": ["c"] * n,
            "subcategory": ["s"] * n,
            "ingest_ts": [1_700_000_000_000] * n,
        },
        schema=EVENT_ARROW_SCHEMA,
    )

    def tail_arrow(_: int) -> pa.Table:
        if gate is not None:
            gate.wait(30)
        return tail

    return Sources(None, lambda: -1, tail_arrow, ITEM_ARROW_SCHEMA.empty_table)


def test_row_limit_truncates_and_says_so() -> None:
    lane = AnalyticsLane(_sources(), Limits(max_rows=100))
    t = lane.submit("SELECT * FROM events", {}).result()
    assert len(t.rows) == 100 and t.truncated
    small = lane.submit("SELECT * FROM events LIMIT 10", {}).result()
    assert len(small.rows) == 10 and not small.truncated
    lane.close()


def test_byte_limit_truncates_and_says_so() -> None:
    lane = AnalyticsLane(_sources(5000), Limits(max_bytes=20_000))
    t = lane.submit("SELECT * FROM events", {}).result()
    assert t.truncated and 0 < len(t.rows) < 5000
    lane.close()


def test_a_query_past_its_deadline_is_interrupted() -> None:
    lane = AnalyticsLane(_sources(), Limits(timeout_s=0.3))
    fut = lane.submit(
        'SELECT count(*) FROM events a, events b, events c, events d WHERE a."offset" + b."offset" '
        '+ c."offset" + d."offset" = -1',
        {},
    )
    with pytest.raises(QueryError) as info:
        fut.result(timeout=20)
    assert info.value.status == 408 and info.value.code == "timeout"
    assert lane.timeouts == 1
    lane.close()


def test_full_queue_is_refused_with_429_and_recovers() -> None:
    gate = threading.Event()
    lane = AnalyticsLane(_sources(gate=gate), Limits(concurrency=1, queue=2, retry_after_s=3))
    admitted = [lane.submit("SELECT count(*) FROM events", {}) for _ in range(3)]  # 1 running + 2 waiting
    with pytest.raises(QueryError) as info:
        lane.submit("SELECT count(*) FROM events", {})
    assert info.value.status == 429 and info.value.retry_after_s == 3
    assert lane.rejected == 1
    assert lane.queue_depth == 2 and lane.running == 1
    gate.set()
    assert [f.result(timeout=20).rows for f in admitted] == [[[1000]]] * 3
    assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=20).rows == [[1000]]
    assert lane.queue_depth == 0
    lane.close()


def test_validation_binds_without_reading_data(world: World) -> None:
    world.query.analytics.validate("SELECT user_id, count(*) FROM events GROUP BY 1")
    with pytest.raises(QueryError) as info:
        world.query.analytics.validate("SELECT nope FROM items")
    assert info.value.code == "unknown_column"


def test_analytics_threads_run_at_a_lower_os_priority() -> None:
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, nice=5))
    lane.submit("SELECT 1", {}).result()
    (worker,) = lane._pool._threads  # the pool's one thread, started by the first query
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(19, own + 5)
    lane.close()
