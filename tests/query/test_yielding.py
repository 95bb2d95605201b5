"""Serving first: the analytics lane pauses its query workers while the serving process runs late
(`insession.query.yielding`). The rule on made-up lateness sequences (property-tested); the lane with real
worker processes, made late by a real cause: a thread of this process that holds the GIL."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.query import Limits
from insession.query.analytics import AnalyticsLane
from insession.query.workers import Job
from insession.query.yielding import TICK_S, WINDOW, YieldRule

from .test_analytics import SMALL, _sources

LAG = 0.005


def _run(rule: YieldRule, lateness: list[float]) -> list[tuple[float, bool]]:
    """(time, paused) after each sample, one sample per tick."""
    return [(k * TICK_S, rule.step(x, k * TICK_S)) for k, x in enumerate(lateness)]


def test_a_late_window_pauses_and_a_calm_hold_continues() -> None:
    lateness = [0.001] * 20 + [0.02] * 5 + [0.0] * 60
    rule = YieldRule(LAG, hold_s=0.2)
    states = _run(rule, lateness)
    paused = [t for t, p in states if p]

    def late(k: int) -> bool:
        window = lateness[max(0, k - WINDOW + 1) : k + 1]
        return sum(window) / len(window) > LAG

    first_late = next(k for k in range(len(lateness)) if late(k))
    assert 20 <= first_late < 25 and paused[0] == first_late * TICK_S  # paused at the first late window
    calm = next(k for k in range(first_late, len(lateness)) if not late(k))
    hold_ticks = round(0.2 / TICK_S)
    assert paused[-1] == (calm + hold_ticks - 1) * TICK_S  # continued after 0.2 s of calm windows
    assert not states[-1][1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.001, 0.004, 0.006, 0.02, 0.1]), min_size=1, max_size=600))
def test_the_rule_pauses_when_late_never_starves_and_continues_only_after_a_calm_hold(lateness: list[float]) -> None:
    rule = YieldRule(LAG, hold_s=0.2, max_pause_s=2.0, min_run_s=0.2)
    states = _run(rule, lateness)
    run_start: float | None = None
    pause_start: float | None = None
    for k, (t, paused) in enumerate(states):
        window = lateness[max(0, k - WINDOW + 1) : k + 1]
        late = sum(window) / len(window) > LAG
        if paused:
            pause_start = t if pause_start is None else pause_start
            assert t - pause_start < 2.0 + 1e-9  # never longer than max_pause_s in one go
            run_start = None
        else:
            if pause_start is not None:  # a pause ended: by the starvation guard, or after 0.2 s of calm
                hold_ticks = round(0.2 / TICK_S)
                calm = k >= hold_ticks and all(
                    sum(lateness[max(0, j - WINDOW + 1) : j + 1]) / len(lateness[max(0, j - WINDOW + 1) : j + 1]) <= LAG
                    for j in range(k - hold_ticks, k + 1)
                )
                assert t - pause_start >= 2.0 - 1e-9 or calm
                pause_start = None
                run_start = t
            # running while late only during a starvation guard's run
            if late:
                assert run_start is not None and t - run_start < 0.2 + 1e-9


def _hog(stop: threading.Event) -> None:
    """Holds the GIL in pure Python until told to stop: the way serving work makes the process late."""
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


def _state(pid: int) -> str:
    """The process's state letter (/proc/PID/stat): T when stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _wait_for(cond: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _job(sql: str) -> Job:
    """A query job as the lane sends it for sources given as callables (the tables shipped as Arrow IPC)."""
    src = _sources()

    def ipc(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return sink.getvalue().to_pybytes()

    return Job("query", sql, {}, tail=ipc(src.tail_arrow(0)), items=ipc(src.items_arrow()))


SLOW = "SELECT count(*) FROM range(0, 100000000) t(i) WHERE hash(i) % 7 = 0"  # ~0.5 s of one core
SLOW_ROWS = [[14286499]]


def test_a_running_query_pauses_while_the_process_is_late_and_goes_on_after() -> None:
    # The hog makes this process wake ~50 ms late (the GIL's switch interval, raised for the test), far above the
    # 20 ms threshold; a busy test machine alone makes it a few ms late at most.
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, yield_lag_ms=20.0, **SMALL))
    first = lane.serving_first
    assert first is not None
    try:
        assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=60).rows == [[1000]]
        (pid,) = lane.pids
        assert not first.paused and first.pauses == 0  # the lane was never late while it ran nothing heavy
        stop = threading.Event()
        hog = threading.Thread(target=_hog, args=(stop,))
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.05)
        hog.start()
        try:
            fut = lane.submit(SLOW, {})
            assert _wait_for(lambda: _state(pid) == "T"), "the worker was not stopped while the process was late"
            assert first.paused and first.lateness_s > 0.02
        finally:
            stop.set()
            hog.join()
            sys.setswitchinterval(switch)
        assert fut.result(timeout=60).rows == SLOW_ROWS
        assert _wait_for(lambda: not first.paused and _state(pid) != "T"), "not continued after the query"
        assert first.pauses >= 1 and first.paused_s() > 0
    finally:
        lane.close()


def test_time_paused_is_not_counted_against_a_querys_timeout() -> None:
    """The deadline arithmetic with a real worker: a ~0.5 s query under a 0.25 s timeout completes when the
    lane says 90% of the time since it was sent was paused, and is killed when nothing was."""
    from insession.query.workers import WorkerProcess, WorkerTimeout

    lane = AnalyticsLane(_sources(), Limits(concurrency=1, yield_lag_ms=0, **SMALL))
    try:
        t0 = time.monotonic()
        held = WorkerProcess(lane.config, "held worker", paused_s=lambda: 0.9 * (time.monotonic() - t0))
        try:
            reply = held.call(_job(SLOW), timeout_s=0.25)
            assert reply.kind == "table", reply.message
        finally:
            held.close()
        unheld = WorkerProcess(lane.config, "unheld worker")
        try:
            unheld.call(_job("SELECT 1"), timeout_s=30)  # started (a start is not counted)
            try:
                unheld.call(_job(SLOW), timeout_s=0.25)
            except WorkerTimeout:
                pass
            else:
                raise AssertionError("a 0.5 s query finished within a 0.25 s timeout: the test proves nothing")
        finally:
            unheld.close()
    finally:
        lane.close()


def test_pausing_is_off_with_zero_and_a_negative_value_refuses() -> None:
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, yield_lag_ms=0, **SMALL))
    try:
        assert lane.serving_first is None
    finally:
        lane.close()
    try:
        AnalyticsLane(_sources(), Limits(concurrency=1, yield_lag_ms=-1, **SMALL))
    except ValueError as e:
        assert "yield_lag_ms" in str(e) and "0 to turn pausing off" in str(e)
    else:
        raise AssertionError("a negative yield_lag_ms was accepted")
