"""The server's supervision of its child processes (the snapshot standby, the feature reader): real child
processes, the supervisor's clock given by the test."""

from __future__ import annotations

import sys

from insession.features.child import EXIT_RESTART, RETRY_MAX_S, ChildProcess

# The child sleeps (so the test sees it running), then exits with the code it reads on stdin.
SCRIPT = "import sys, time; code = int(sys.stdin.read()); time.sleep(0.3); sys.exit(code)"


def child(code: int, restart_after_s: float = 30.0) -> ChildProcess:
    return ChildProcess("test child", [sys.executable, "-c", SCRIPT], restart_after_s=restart_after_s,
                        stdin=str(code).encode())


def exit_of(c: ChildProcess) -> None:
    assert c.proc is not None
    c.proc.wait(30)


def test_failures_back_off_doubling_and_running_between_them_does_not_reset_it() -> None:
    c = child(1)
    assert c.check(now=0.0) and c.starts == 1  # started, and still running (it sleeps first)
    assert c.check(now=0.1)  # seen running: the old standby rule reset its backoff here
    exit_of(c)
    waits = []
    now = 1.0
    for _ in range(7):
        assert not c.check(now=now)  # the exit is noticed, and the restart is not due yet
        due = c._start_at
        assert not c.check(now=due - 0.01) and c.proc is None
        assert c.check(now=due)  # started again when due
        waits.append(due - now)
        exit_of(c)
        now = due + 0.5
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, RETRY_MAX_S, RETRY_MAX_S]
    assert (c.starts, c.failures) == (8, 7)
    c.stop(5.0)


def test_a_child_that_ran_a_while_starts_the_backoff_again() -> None:
    c = child(1)
    c.check(now=0.0)
    exit_of(c)
    c.check(now=1.0)
    c.check(now=c._start_at)  # second start, at 3.0
    exit_of(c)
    c.check(now=3.0 + RETRY_MAX_S)  # it ran RETRY_MAX_S before failing: the first wait again
    assert c._start_at - (3.0 + RETRY_MAX_S) == 2.0 and c.failures == 2
    c.stop(5.0)


def test_asking_to_be_restarted_is_no_failure() -> None:
    c = child(EXIT_RESTART, restart_after_s=7.0)
    c.check(now=0.0)
    exit_of(c)
    assert not c.check(now=1.0) and c._start_at == 8.0
    assert c.check(now=8.0) and (c.starts, c.failures) == (2, 0)
    c.stop(5.0)


def test_stop_ends_a_running_child_and_is_harmless_otherwise() -> None:
    c = ChildProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], restart_after_s=1.0)
    c.stop(1.0)  # never started
    c.check(now=0.0)
    assert c.running()
    c.stop(5.0)
    assert not c.running() and c.proc is not None and c.proc.returncode is not None
    c.stop(1.0)  # already gone
