"""Serving first: the analytics lane pauses its query workers while the serving process runs late
(`insession.query.yielding`). The rule on made-up lateness sequences (property-tested); the lane with real
worker processes, made late by a real cause: a thread of this process that holds the GIL."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from insession.query import Limits
from insession.query.analytics import AnalyticsLane
from insession.query.yielding import TICK_S, WINDOW, YieldRule

from .test_analytics import SMALL, _sources

LAG = 0.005


def _run(rule: YieldRule, lateness: list[float]) -> list[tuple[float, bool]]:
    """(time, paused) after each sample, one sample per tick."""
    return [(k * TICK_S, rule.step(x, k * TICK_S)) for k, x in enumerate(lateness)]


def test_a_late_window_pauses_and_a_calm_hold_continues() -> None:
    rule = YieldRule(LAG, hold_s=0.2)
    states = _run(rule, [0.001] * 20 + [0.02] * 5 + [0.0] * 60)
    paused = [t for t, p in states if p]
    # 20 calm ticks, then the mean over 10 ticks first exceeds 5 ms at the third late one (0.06 / 10 > 0.005)
    assert paused[0] == 22 * TICK_S
    # calm from the tick whose window mean falls to <= 5 ms again, then held for 0.2 s
    calm = next(k for k in range(25, 85) if sum(([0.001] * 20 + [0.02] * 5 + [0.0] * 60)[k - 9 : k + 1]) / 10 <= LAG)
    assert paused[-1] == (calm + 19) * TICK_S
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
                calm = all(
                    sum(lateness[max(0, j - WINDOW + 1) : j + 1]) / len(lateness[max(0, j - WINDOW + 1) : j + 1]) <= LAG
                    for j in range(k - 20, k + 1)
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


def test_workers_pause_while_the_process_is_late_and_paused_time_is_not_a_timeout() -> None:
    # The hog makes this process wake ~50 ms late (the GIL's switch interval, raised for the test), far above the
    # 20 ms threshold; a busy test machine alone makes it a few ms late at most.
    lane = AnalyticsLane(_sources(), Limits(concurrency=1, yield_lag_ms=20.0, timeout_s=1.0, **SMALL))
    first = lane.serving_first
    assert first is not None
    try:
        assert lane.submit("SELECT count(*) FROM events", {}).result(timeout=60).rows == [[1000]]
        (pid,) = lane.pids
        stop = threading.Event()
        hog = threading.Thread(target=_hog, args=(stop,))
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.05)
        hog.start()
        try:
            assert _wait_for(lambda: _state(pid) == "T"), "the worker was not stopped while the process was late"
            assert first.paused and first.lateness_s > 0.02
            # sent to a stopped worker, the query first runs in the starvation guard's run, 2 s into the pause:
            # past its 1 s timeout in wall time, and not killed for it
            sent = time.monotonic()
            fut = lane.submit("SELECT count(*), count(DISTINCT user_id) FROM events", {})
            _wait_for(fut.done, timeout_s=20.0)
            waited = time.monotonic() - sent
        finally:
            stop.set()
            hog.join()
            sys.setswitchinterval(switch)
        assert fut.result(timeout=30).rows == [[1000, 10]]
        assert waited > 1.5 and lane.timeouts == 0
        assert _wait_for(lambda: not first.paused and _state(pid) != "T"), "not continued once the process kept up"
        assert first.pauses >= 1 and first.paused_s() > 1.0 and first.held_s > 1.0
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
