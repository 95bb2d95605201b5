"""The analytics lane: history UNION tail, limits, deadline, the bounded queue (429), and the worker
processes that keep hostile queries' memory and CPU out of the server (real processes, no mocks)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
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
            "brand": [None] * n,
            "price": [None] * n,
            "price_band": [None] * n,
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
    _wait_for(lambda: lane.running == 1)  # a dispatcher thread has taken the first query
    assert lane.queue_depth == 2 and lane.running == 1
    gate.set()
    assert [f.result(timeout=20).rows for f in admitted] == [[[1000]]] * 3
    assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=20).rows == [[1000]]
    assert lane.queue_depth == 0
    lane.close()


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _children() -> set[int]:
    """This process's live and zombie children (every thread's), from /proc."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            out.update(int(p) for p in (task / "children").read_text().split())
    return out


def _status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/self/status")


HOSTILE_MEMORY = "SELECT length(lpad('x', 1100000000, 'y'))"  # a 1.1 GB string DuckDB's memory_limit misses
HOSTILE_CPU = "SELECT levenshtein(repeat('a', 200000), repeat('b', 200000))"  # minutes in one uninterruptible call
# Small bounds keep the hostile queries short: the worker idles at ~0.5 GiB of address space.
SMALL = {"memory_limit": "64MB", "worker_memory": "640MB", "threads": 1}


def test_workers_run_at_a_lower_os_priority_under_an_address_space_limit() -> None:
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, nice=5, **SMALL))
    try:
        lane.submit("SELECT 1", {}).result(timeout=60)
        (pid,) = lane.pids  # the one query worker, started by the first query
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # idle_cpu, the default
        limits = Path(f"/proc/{pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max address space")]
        assert line.split()[3:5] == [str(640 * 10**6)] * 2
    finally:
        lane.close()
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, nice=5, idle_cpu=False, **SMALL))
    try:
        lane.submit("SELECT 1", {}).result(timeout=60)
        assert os.sched_getscheduler(lane.pids[0]) == os.SCHED_OTHER
    finally:
        lane.close()


def test_a_workers_settings_never_appear_on_its_command_line(tmp_path: Path) -> None:
    """A history or log URI may carry credentials (`s3://...?secret_key=...`, `nats://user:pass@...`), and every
    user of the host can read a process's command line: the worker gets its settings over its socket."""
    secret = tmp_path / "history-s3cr3t"
    secret.mkdir()
    lane = AnalyticsLane(Sources(secret, lambda: -1, _sources().tail_arrow, ITEM_ARROW_SCHEMA.empty_table),
                         Limits(concurrency=1, **SMALL))
    try:
        assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=60).rows == [[1000]]
        (pid,) = lane.pids
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"insession.query.workers" in command and b"s3cr3t" not in command
    finally:
        lane.close()


def test_hostile_memory_query_gets_413_and_the_server_does_not_grow(tmp_path: Path) -> None:
    """Through the service, as the HTTP route runs it; the 1.1 GB strings never reach this process."""
    w = make_world(tmp_path, n=100, limits=Limits(concurrency=2, timeout_s=120, **SMALL))
    try:
        w.query.execute("SELECT count(*) FROM events")  # a worker started, the server warm
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
        before = _status_mb("VmRSS")
        errors: list[QueryError] = []

        def hostile() -> None:
            with pytest.raises(QueryError) as info:
                w.query.execute(HOSTILE_MEMORY)
            errors.append(info.value)

        threads = [threading.Thread(target=hostile) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [(e.status, e.code) for e in errors] == [(413, "too_large")] * 2, [str(e) for e in errors]
        assert _status_mb("VmHWM") - before < 100  # the 1.1 GB strings were never in this process
        assert w.query.execute("SELECT count(*) FROM events").rows == [[100]]
    finally:
        w.close()


def test_a_cpu_bound_query_is_killed_at_its_limit_and_the_worker_replaced() -> None:
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, timeout_s=1.0, **SMALL))
    try:
        assert lane.submit("SELECT 1", {}).result(timeout=60).rows == [[1]]
        (first,) = lane.pids
        start = time.monotonic()
        with pytest.raises(QueryError) as info:
            lane.submit(HOSTILE_CPU, {}).result(timeout=60)
        elapsed = time.monotonic() - start
        assert info.value.status == 408 and info.value.code == "timeout"
        assert elapsed < 1.0 + 3, elapsed
        assert lane.timeouts == 1
        assert first not in _children()  # killed and reaped
        assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=60).rows == [[1000]]
        assert lane.pids and lane.pids[0] != first
    finally:
        lane.close()


def test_hostile_queries_hold_workers_no_longer_than_their_limit() -> None:
    """Both workers busy with hostile queries: a normal query waits in the queue only until they are
    killed, one more is refused with 429, and the server's own threads stay responsive throughout."""
    lane = AnalyticsLane(_sources(), Limits(concurrency=2, queue=1, timeout_s=2.0, **SMALL))
    try:
        warm = [lane.submit("SELECT 1", {}) for _ in range(2)]
        assert [f.result(timeout=60).rows for f in warm] == [[[1]]] * 2
        _wait_for(lambda: len(lane.pids) == 2)
        hostile = [lane.submit(HOSTILE_CPU, {}), lane.submit(HOSTILE_MEMORY, {})]
        _wait_for(lambda: lane.running == 2)
        start = time.monotonic()
        normal = lane.submit("SELECT count(*) FROM events", {})
        with pytest.raises(QueryError) as refused:
            lane.submit("SELECT 1", {})
        assert refused.value.status == 429
        tick = time.monotonic()
        time.sleep(0.2)  # this process is not starved while the workers burn CPU
        assert time.monotonic() - tick < 0.5
        assert normal.result(timeout=60).rows == [[1000]]
        assert time.monotonic() - start < 2.0 + 4
        for f in hostile:
            with pytest.raises(QueryError) as info:
                f.result(timeout=60)
            assert info.value.status in (408, 413)  # the lpad may hit the memory bound before the deadline
    finally:
        lane.close()


def test_close_kills_running_queries_and_leaves_no_child_processes(tmp_path: Path) -> None:
    w = make_world(tmp_path, n=50, limits=Limits(concurrency=2, timeout_s=60, **SMALL))
    lane = w.query.analytics
    try:
        assert w.query.execute("SELECT count(*) FROM events").rows == [[50]]
        running = lane.submit(HOSTILE_CPU, {})
        _wait_for(lambda: lane.running == 1)
        pids = set(lane.pids)
        assert len(pids) >= 1 and pids <= _children()
        start = time.monotonic()
    finally:
        w.close()
    assert time.monotonic() - start < 5
    assert not pids & _children()  # none left, not even a zombie
    assert lane.pids == []
    with pytest.raises(QueryError) as info:
        running.result(timeout=5)
    assert info.value.status == 503
    with pytest.raises(QueryError) as info:
        lane.submit("SELECT 1", {})
    assert info.value.status == 503


def test_memory_settings_that_are_not_sizes_or_too_small_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"memory_limit = 'lots' is not a size"):
        AnalyticsLane(_sources(), Limits(memory_limit="lots"))
    with pytest.raises(ValueError, match=r"worker_memory = '100MB' is below"):
        AnalyticsLane(_sources(), Limits(worker_memory="100MB"))
    lane = AnalyticsLane(_sources(), Limits(memory_limit="1GiB", threads=2))
    assert lane.config.address_space == 2**30 + 768 * 2**20 + 2 * 64 * 2**20
    lane.close()


def test_a_worker_that_dies_mid_query_answers_413_and_is_replaced() -> None:
    """What the client sees when the OS ends a worker (the memory bound can end it outside DuckDB's
    accounting); the death here is a SIGKILL from outside, the same thing seen from the lane."""
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, timeout_s=60, **SMALL))
    try:
        lane.submit("SELECT 1", {}).result(timeout=60)
        (pid,) = lane.pids
        fut = lane.submit(HOSTILE_CPU, {})
        _wait_for(lambda: lane.running == 1)
        time.sleep(0.2)  # the job is in the worker
        os.kill(pid, 9)
        with pytest.raises(QueryError) as info:
            fut.result(timeout=10)
        assert info.value.status == 413 and info.value.code == "too_large"
        assert "SIGKILL" in info.value.message and "memory bound" in info.value.message
        assert lane.timeouts == 0
        assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=60).rows == [[1000]]
        assert lane.pids and lane.pids[0] != pid
    finally:
        lane.close()


def test_workers_read_the_catalogue_themselves(world: World) -> None:
    """Through read-only SQLite in the worker (the world's sources are files), with the stored types."""
    r = world.query.execute(
        "SELECT count(*), count(*) FILTER (WHERE available), typeof(any_value(available)) FROM items"
    )
    assert r.rows == [[55, 44, "BOOLEAN"]]


def test_history_parts_written_before_the_catalogue_columns_read_them_as_null(tmp_path: Path) -> None:
    """Parts exported before brand/price/price_band existed lack those columns; SQL still sees one schema."""
    import pyarrow.parquet as pq

    w = make_world(tmp_path, n=200, exported=120)
    try:
        for part in w.history_dir.rglob("*.parquet"):
            pq.write_table(pq.read_table(part).drop_columns(["brand", "price", "price_band"]), part)
        r = w.query.execute("SELECT count(*), count(brand), count(price_band) FROM events")
        tail = w.log.tail_arrow(w.log.exported_offset() + 1).to_pylist()
        assert r.rows == [[200, sum(e["brand"] is not None for e in tail),
                           sum(e["price_band"] is not None for e in tail)]]
    finally:
        w.close()
