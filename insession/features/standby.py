"""The snapshot standby: a second process that keeps its own copy of the online state and writes the snapshots.

Why: at a million shoppers one snapshot's capture is ~0.65 s of msgpack under the GIL (16 partitions of
~38 ms and ~40 ms of item units, measured on bench_mixed's state on 2026-11-30), on top of a server whose
request handling already takes 0.7-0.9 of the one core its GIL gives it under bench_mixed's load. For the
5-7 s a snapshot lasted there, requests queued: feature reads at 100-200 ms, and arcs of seconds with
analytics beside. Chunked captures and reads off the event loop (engine.py) did not remove that, and a
forked child writing its copy-on-write picture lost to the page-copy tax (docs/features.md). A standby
pays in memory instead: a second copy of the state (about the server's own RSS) and the CPU to apply the
log, with its own GIL, on a core serving leaves idle (SCHED_IDLE, as the backfill's child: it only runs when
nothing else wants the CPU, and its snapshots lag instead of taking CPU from serving).

The contract:
- `standby_process` (the server's handle, `insession.embedded`, a `ChildProcess`) starts
  `python -m insession.features.standby` with the server's partitions and shopper cap. The child opens the
  state as the server does (the last snapshot, under `snapshot_lock`), then applies the log's events after
  it in offset order, read through a read-only connection of `log.sqlite` (`insession.features.tail`).
  Every `interval_s`, if it applied something, it writes a snapshot with `FeatureEngine.snapshot`, under
  the same lock, so a snapshot is whole before `CURRENT` names it, and a restart is that snapshot plus the
  log after it, as with the server's own snapshots.
- The child exits 0 on SIGTERM or when its parent is gone. It exits `EXIT_RESTART` when the declarations
  change (`registry.json`), or when a declared feature is still backfilling, since its snapshot would lack
  that feature. The server starts it again later (`ChildProcess.check`: after a snapshot interval, or with
  backoff after a failure) and writes its own snapshots meanwhile.
- The embedded log only (`log.sqlite`): with a replicated log the server refuses `standby` at start.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from insession.features.backfill import yield_cpu
from insession.features.child import EXIT_RESTART, ChildProcess
from insession.features.engine import REGISTRY_FILE, FeatureEngine
from insession.features.tail import LogTail
from insession.log.eventlog import LOG_FILE

log = logging.getLogger(__name__)

POLL_S = 0.05  # how long the standby waits when the log has nothing new
SWEEP_EVERY_S = 5.0  # expired state leaves the standby's memory as it leaves the server's (one unit a turn)
STATE_DIR = "features"  # the feature state under a data directory (as the embedded handle opens it)


def standby_process(data_dir: Path, *, partitions: int, max_users: int, interval_s: float) -> ChildProcess:
    """The server's snapshot standby (`python -m insession.features.standby`), supervised as a `ChildProcess`:
    started again `interval_s` after asking to be, with backoff after a failure."""
    command = [sys.executable, "-m", "insession.features.standby", str(data_dir), "--partitions", str(partitions),
               "--max-users", str(max_users), "--interval", repr(interval_s), "--parent", str(os.getpid())]
    return ChildProcess("snapshot standby", command, restart_after_s=interval_s,
                        consequence="; this process writes the snapshots until it is back")


def run(data_dir: Path, *, partitions: int, max_users: int, interval_s: float, parent: int,
        stop: threading.Event) -> int:
    """The standby's loop (see the module docstring); returns its exit code."""
    state_dir = data_dir / STATE_DIR
    registry = state_dir / REGISTRY_FILE
    stamp = registry.stat().st_mtime_ns
    engine = FeatureEngine.open(state_dir, partitions=partitions, max_users=max_users)
    if engine.unbuilt:
        log.info("snapshot standby: %s still backfilling, exiting until it is served",
                 ", ".join(f.name for f in engine.unbuilt))
        return EXIT_RESTART
    gc.collect()
    gc.freeze()  # the state is not cyclic garbage: keep full collections from walking it (as the server does)
    tail = LogTail(engine, data_dir / LOG_FILE)
    log.info("snapshot standby: state at offset %d, following the log", engine.applied_offset)
    last_snapshot = last_sweep = time.monotonic()
    try:
        while not stop.is_set() and os.getppid() == parent:
            read = tail.step()
            if registry.stat().st_mtime_ns != stamp:
                log.info("snapshot standby: the declarations changed, exiting to start on them")
                return EXIT_RESTART
            now = time.monotonic()
            if now - last_sweep >= SWEEP_EVERY_S:
                engine.sweep_next()
                last_sweep = now
            if now - last_snapshot >= interval_s and engine.applied_offset != engine.snapshot_offset:
                engine.snapshot()
                gc.freeze()
                last_snapshot = time.monotonic()
            if read < tail.page:
                stop.wait(POLL_S)
    finally:
        tail.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m insession.features.standby", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--max-users", type=int, required=True)
    ap.add_argument("--interval", type=float, required=True)
    ap.add_argument("--parent", type=int, required=True, help="the server's pid: exit when it is gone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s insession-standby %(levelname)s %(message)s")
    yield_cpu()  # serving first (SCHED_IDLE): at nice 5 it took a quarter core from a saturated server
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server's whole process group: it stops me
    return run(args.data_dir, partitions=args.partitions, max_users=args.max_users, interval_s=args.interval,
               parent=args.parent, stop=stop)


if __name__ == "__main__":
    sys.exit(main())
