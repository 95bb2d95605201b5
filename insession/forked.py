"""Run a job in a forked copy of this process: a copy-on-write picture of the state, worked on off the GIL.

`run_forked(job, hold)` enters `hold` (the locks that make the state consistent), forks, leaves `hold` in
the parent at once, and waits (without the GIL) for the child, which runs `job()` on its frozen copy of
memory and exits. The parent's threads stop only while the kernel copies the page tables (measured
~40-50 ms for a 2 GiB heap, ~20 ms per GiB); the child's CPU is the other core's, not the server's GIL.
Redis writes its snapshots the same way (BGSAVE).

The child is made safe for a process that had other threads (ONNX Runtime, torch, SQLite, uvicorn):
- it never returns into the caller's stack and ends with `os._exit`: no atexit handlers, no destructors of
  libraries whose threads did not follow it into the child (an earlier fork-based writer without this
  died with SIGSEGV at exit);
- the garbage collector is off (a collection would write every object header and copy the whole heap);
- every inherited file descriptor but its error pipe is closed, so the data directory's lock and the
  listening socket die with the parent, not with a still-running child;
- it gets SIGKILL when the parent dies (PR_SET_PDEATHSIG), so no orphan writes on after a crash;
- it runs under SCHED_IDLE (else nice 19): at nice 0 the child's core-second of encoding starved the
  server on a busy 2-core machine as surely as the in-process snapshot had.

A failure in the child comes back as the exception the parent raises: `OSError(errno, strerror)` for an
operating-system error (a full disk reads the same as in-process), else `ForkedJobError` with the message.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager

_PR_SET_PDEATHSIG = 1


class ForkedJobError(RuntimeError):
    """The forked child failed other than by an OSError, or died by a signal."""


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def yield_cpu() -> None:
    """Serving first: SCHED_IDLE (run only on a CPU nothing else wants), else the lowest nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def _child(job: Callable[[], None], err: int, parent: int) -> None:
    """Never returns."""
    code = 1
    try:
        gc.disable()
        _die_with_parent(parent)
        yield_cpu()
        os.closerange(3, err)
        os.closerange(err + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
        job()
        code = 0
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        if isinstance(e, OSError) and e.errno is not None:
            msg = f"{e.errno}\t{e.strerror}"
        else:
            msg = f"\t{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(err, msg.encode()[:4000])
    finally:
        os._exit(code)


def run_forked(job: Callable[[], None], hold: AbstractContextManager[object]) -> None:
    """Run `job()` in a child forked while `hold` is held; return when it has finished, raise if it failed."""
    r, w = os.pipe()
    parent = os.getpid()
    try:
        with hold:
            pid = os.fork()
            if pid == 0:
                _child(job, w, parent)
    finally:
        os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return
    message = b"".join(chunks).decode(errors="replace")
    errno_text, _, text = message.partition("\t")
    if errno_text.isdigit():
        raise OSError(int(errno_text), text)
    if code < 0:
        raise ForkedJobError(f"the forked job died by signal {signal.Signals(-code).name}")
    raise ForkedJobError(f"the forked job failed: {text or f'exit status {code}'}")
