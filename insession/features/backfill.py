"""The history half of a backfill, run in a child process: a new feature's state from the Parquet history.

`python -m insession.features.backfill OUT_DIR` reads `OUT_DIR/job.json` (the feature, the stream rules,
the partitions and shopper cap, the history directory), replays every history event in offset order into
an engine holding that one feature, writes its snapshot into OUT_DIR (the usual per-unit files and CURRENT)
and exits 0. The server then restores it, catches up from the log and installs it (`manage.py`).

Decisions:
- A child process, not a thread: replaying millions of events is seconds to minutes of Python, which in
  the server's process would take the GIL from serving for as long; the child has its own.
- The history is used only when it is complete: offsets 0..N, each once (the manifest's parts, checked
  with one DuckDB aggregate; in an object store, scanned through pyarrow.fs as an Arrow dataset). Otherwise
  the child replays nothing and the server replays the log from offset 0 instead (slower, still exact). The
  snapshot's offset says which.
- DuckDB sorts the parts by offset (a part is one export batch's events of one day, so parts overlap in
  offsets), streaming record batches; memory stays at a batch plus the feature's state.
- Progress (`progress.json`: done, total) is rewritten atomically every batch; `DESCRIBE FEATURE` reads it.
- The child runs under SCHED_IDLE (else nice 19): it gets only the CPU serving leaves, so on a busy
  machine the backfill takes longer, never serving. Measured at 10M events with ingest and reads running
  on 2 cores: see docs/benchmarks.md (bench_zero_code).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import duckdb
import msgspec

from insession.durable import write_atomic
from insession.features.declare import Feature, FeatureRegistry
from insession.features.engine import FeatureEngine
from insession.log.export import events_from_arrow, history_dataset, is_object_store, load_manifest
from insession.schema import event_columns_sql

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"
BATCH = 50_000  # events per record batch read from the history


class Job(msgspec.Struct):
    """What the server asks the child to build."""

    feature: dict[str, object]
    lateness_ms: int
    session_gap_ms: int
    partitions: int
    max_users: int
    history_dir: str


class Progress(msgspec.Struct):
    """How far the child is: `done` of `total` history events replayed (total 0: no usable history)."""

    done: int = 0
    total: int = 0
    note: str = ""


def _complete_history(con: duckdb.DuckDBPyConnection, location: str) -> tuple[duckdb.DuckDBPyRelation | None, int]:
    """The history's events as one relation and their count when they hold offsets 0..count-1 once each,
    else (None, 0) (a gap, a duplicate or no history: the log is replayed instead). A local history is the
    manifest's part files; one in an object store an Arrow dataset through pyarrow.fs (DuckDB cannot reach
    the store itself), scanned lazily."""
    if is_object_store(location):
        if not load_manifest(location):
            return None, 0
        rel = con.from_arrow(history_dataset(location))
    else:
        parts = sorted(str(Path(location) / p) for p in load_manifest(Path(location)))
        if not parts:
            return None, 0
        rel = con.read_parquet(parts, union_by_name=True)
    (lo, hi, n, distinct), = rel.aggregate('min("offset"), max("offset"), count(*), count(DISTINCT "offset")'
                                          ).fetchall()
    if n == 0 or lo != 0 or hi != n - 1 or distinct != n:
        return None, 0
    return rel, int(n)


def build(out_dir: Path) -> FeatureEngine:
    """Run the job in `out_dir` (see the module docstring); returns the engine after its snapshot."""
    job = msgspec.json.decode((out_dir / JOB_FILE).read_bytes(), type=Job)
    reg = FeatureRegistry.of([Feature.from_json(job.feature)], lateness_ms=job.lateness_ms,
                             session_gap_ms=job.session_gap_ms)
    engine = FeatureEngine.open(out_dir / "state", reg, partitions=job.partitions, max_users=job.max_users)
    with duckdb.connect(config={"threads": 1, "memory_limit": "1GB"}) as con:
        history, total = _complete_history(con, job.history_dir)
        progress = Progress(0, total, "" if total else "no complete history: the server replays the log")
        write_atomic(out_dir / PROGRESS_FILE, msgspec.json.encode(progress))
        if history is not None:
            history.create_view("history")
            reader = con.sql(f'SELECT {event_columns_sql(history.columns)} FROM history ORDER BY "offset"'
                             ).to_arrow_reader(BATCH)
            for batch in reader:
                engine.update_many(events_from_arrow(batch))
                progress.done += batch.num_rows
                write_atomic(out_dir / PROGRESS_FILE, msgspec.json.encode(progress))
    engine.snapshot()
    return engine


def yield_cpu() -> None:
    """Serving first: SCHED_IDLE (run only on a CPU nothing else wants), else the lowest nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m insession.features.backfill OUT_DIR", file=sys.stderr)
        return 2
    yield_cpu()
    try:
        build(Path(args[0]))
    except Exception as e:  # the server reads the reason from stderr and shows it in DESCRIBE
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
