"""Serving first: analytics queries pause while the serving process runs late.

The analytics workers already run under SCHED_IDLE, so they get only CPU that serving leaves. That is not
enough on a small machine: in `bench_mixed` (2 cores, 1,000,000 shoppers, 5,000 events/s, 500 reads/s,
100 ranks/s) two analytics scans beside the server raised feature-read p99 from 6.6 ms to 436 ms and queued
ingest acks for up to 2.5 s, although the scheduler gave the server every cycle it asked for. What a scan
takes from serving on top of CPU time (shared cache and memory bandwidth: a DuckDB hash aggregate over 20
million rows evicts the server's working set) no CPU priority controls. So the lane watches the serving
process itself and stops its query workers (SIGSTOP) while serving falls behind, and continues them
(SIGCONT) once it has kept up for a while.

The signal is the process's own lateness: while a query runs, a thread asks to wake every `TICK_S` and
measures how late it wakes. Lateness adds up everything serving waits for (the GIL held by other work, a
CPU taken by another process, a slowed CPU), so it rises when serving saturates, whatever the cause. The
thread sleeps while no query runs: ticking costs serving too (an A/B on the 1M shop without analytics, a
10 ms tick all the time: ingest ack p99 753 / 908 ms against 201 / 383 ms without it, runs alternated), so
it ticks only when there is something to pause, and every 20 ms. The rule (`YieldRule`, a pure function of
the lateness it sees, so it is tested on made-up sequences):

- pause when the mean lateness over the last `WINDOW` ticks exceeds `lag_s`;
- continue once it has stayed at or under `lag_s` for `hold_s`;
- never starve: after `max_pause_s` of pause, the workers run for `min_run_s` whatever the lateness (so
  analytics keep at least min_run / (max_pause + min_run) of the time, ~9% by default).

A paused query's time does not count against the lane's `timeout_s` (the lane's workers read
`paused_s()`). The export worker and the snapshot standby are not paused: they must keep up with the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

TICK_S = 0.02  # how often the lateness is sampled while a query runs
WINDOW = 5  # ticks averaged: 100 ms
EPSILON_S = 1e-9  # durations compared with this slack (a sum of ticks is not exact in floating point)


@dataclass
class YieldRule:
    """When analytics pause, from the lateness samples (seconds) of the serving process; `now` is monotonic."""

    lag_s: float
    hold_s: float = 0.2
    max_pause_s: float = 2.0
    min_run_s: float = 0.2
    paused: bool = False
    mean_s: float = 0.0  # the mean lateness over the window after the last step (0 before one)
    _samples: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    _since: float = 0.0  # when the current state (paused or running) began
    _calm_since: float | None = None  # while paused: since when the lateness has been at or under lag_s
    _forced_until: float = 0.0  # a starvation guard's run ends here

    def reset(self) -> None:
        """Forget the samples and any pause (no query runs any more)."""
        self._samples.clear()
        self.mean_s = 0.0
        self.paused, self._calm_since, self._forced_until = False, None, 0.0

    def step(self, lateness_s: float, now: float) -> bool:
        """Record one sample; whether the workers should be paused now."""
        self._samples.append(lateness_s)
        self.mean_s = sum(self._samples) / len(self._samples)
        late = self.mean_s > self.lag_s
        if now < self._forced_until:
            return self.paused
        if not self.paused:
            if late:
                self.paused, self._since, self._calm_since = True, now, None
        elif now - self._since >= self.max_pause_s - EPSILON_S:
            self.paused, self._since, self._forced_until = False, now, now + self.min_run_s
        elif late:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= self.hold_s - EPSILON_S:
            self.paused, self._since = False, now
        return self.paused


class ServingFirst:
    """The thread that applies `YieldRule` to the processes `pids()` names while a query runs (between
    `begin()` and `end()`, which the lane calls around each query); `paused_s()` is the time spent paused so
    far (the lane's workers add it to their deadlines, /metrics reports it); `pauses` is for /metrics. `close()`
    continues the workers and stops."""

    def __init__(self, rule: YieldRule, pids: Callable[[], list[int]]) -> None:
        self.rule = rule
        self._pids = pids
        self._lock = threading.Lock()
        self._running = 0  # queries between begin() and end()
        self._active = threading.Event()  # set while _running > 0 (or to wake the thread for close)
        self._paused_total = 0.0
        self._paused_at: float | None = None
        self.pauses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="insession-serving-first", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        """A query starts running: watch serving's lateness."""
        with self._lock:
            self._running += 1
            self._active.set()

    def end(self) -> None:
        """A query ended; with none left the thread sleeps (and continues the workers if they are paused)."""
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._active.clear()

    def paused_s(self) -> float:
        """Seconds the workers have been held paused, in total (including a pause going on now)."""
        with self._lock:
            extra = 0.0 if self._paused_at is None else time.monotonic() - self._paused_at
            return self._paused_total + extra

    @property
    def lateness_s(self) -> float:
        """The last window's mean lateness (0 while no query runs), for /metrics."""
        return self.rule.mean_s

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused_at is not None

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):  # ended between the listing and the signal
                os.kill(pid, sig)

    def _set(self, pause: bool, now: float) -> None:
        with self._lock:
            was = self._paused_at is not None
            if pause and not was:
                self._paused_at = now
                self.pauses += 1
            elif not pause and was:
                assert self._paused_at is not None
                self._paused_total += now - self._paused_at
                self._paused_at = None
        if pause:
            self._signal(signal.SIGSTOP)  # every tick: a worker started since the last one is held too
        elif was:
            self._signal(signal.SIGCONT)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._active.wait()
            due = time.monotonic() + TICK_S
            while self._active.is_set() and not self._stop.wait(max(0.0, due - time.monotonic())):
                now = time.monotonic()
                lateness, due = now - due, now + TICK_S
                self._set(self.rule.step(lateness, now), now)
            self._set(False, time.monotonic())  # no query left (or closing): nothing stays stopped
            self.rule.reset()

    def close(self) -> None:
        self._stop.set()
        self._active.set()
        self._thread.join()
        self._signal(signal.SIGCONT)
