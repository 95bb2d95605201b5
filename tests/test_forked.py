"""`run_forked`: the child's failures come back as the parent's exceptions, it inherits no descriptors,
and it does not outlive a killed parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from insession.forked import ForkedJobError, run_forked


def test_the_job_runs_in_a_child_on_a_copy_and_the_hold_is_released() -> None:
    lock = threading.Lock()
    seen: list[int] = []

    def job() -> None:
        seen.append(os.getpid())  # the child's copy of the list: the parent's stays empty
        if not lock.locked():
            raise AssertionError("the hold was not held at the fork")

    run_forked(job, lock)
    assert seen == [] and not lock.locked()


def test_an_os_error_in_the_child_is_raised_as_the_same_os_error() -> None:
    def job() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as e:
        run_forked(job, contextlib.nullcontext())
    assert e.value.errno == 28


def test_other_failures_and_signals_are_named() -> None:
    def bad() -> None:
        raise ValueError("a bad record")

    with pytest.raises(ForkedJobError, match="ValueError: a bad record"):
        run_forked(bad, contextlib.nullcontext())
    with pytest.raises(ForkedJobError, match="SIGKILL"):
        run_forked(lambda: os.kill(os.getpid(), signal.SIGKILL), contextlib.nullcontext())


def test_the_child_inherits_no_descriptor(tmp_path: Path) -> None:
    """So the data directory's lock and the server's socket are never held by a snapshot writer."""
    with (tmp_path / "held").open("w") as f:
        fd = f.fileno()

        def job() -> None:
            try:
                os.fstat(fd)
            except OSError:
                return
            raise AssertionError(f"descriptor {fd} is open in the child")

        run_forked(job, contextlib.nullcontext())
        os.fstat(fd)  # still open in the parent


def test_the_child_dies_with_a_killed_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import contextlib, os, time\n"
        "from pathlib import Path\n"
        "from insession.forked import run_forked\n"
        f"def job():\n    Path({str(pid_file)!r}).write_text(str(os.getpid()))\n    time.sleep(60)\n"
        "run_forked(job, contextlib.nullcontext())\n"
    )])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(pid_file.read_text())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child), "the forked child outlived its killed parent"


def _alive(pid: int) -> bool:
    """Alive and not a zombie (the child is reparented; its new parent reaps it when it likes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
