"""Analytics worker processes: DuckDB runs outside the serving process, bounded by the operating system.

Each worker is a fresh interpreter (running `main` below, started by fork+exec, which is
what multiprocessing's `spawn` does underneath; never a bare fork of the server, whose ONNX Runtime,
torch and DuckDB threads a forked child would inherit half-locked). Plain `subprocess` rather than
multiprocessing, because multiprocessing's spawn also starts a resource-tracker process that outlives
the pool and re-imports the server's `__main__` in every worker.

At start a worker raises its niceness (and, with `idle_cpu`, takes Linux's SCHED_IDLE policy), caps its
address space with `RLIMIT_AS` (DuckDB's memory limit plus `HEADROOM_BYTES` and `THREAD_HEADROOM_BYTES`
per DuckDB thread for the interpreter, the libraries, thread stacks and allocations DuckDB does not
count, such as one huge string), selects the system allocator for Arrow and at most two glibc arenas
(both otherwise reserve gigabytes of address space they never touch), and then answers jobs one at a
time over a socket pair: a pickled `Job` in (from the trusted parent), a msgpack `Reply` out (typed, so
a compromised worker cannot make the server unpickle anything). Results travel as Arrow IPC bytes,
already cut to the row and byte limits.

The worker reads the sources itself: the history directory, the log's tail and the catalogue through
read-only SQLite connections (one read transaction for the export mark and the tail, so the two agree),
or Arrow IPC shipped with the job when the lane was given callables instead of files. A history in an
object store (`s3://...`, see `insession.log.export`) is read through pyarrow.fs and handed to DuckDB as
an Arrow dataset (parts scanned lazily, with projection and filter pushdown), unioned with the tail:
DuckDB's own httpfs extension is neither installed nor allowed (external access is off).

`WorkerProcess` is the parent's handle: `call(job, timeout_s)` sends a job and waits at most
`timeout_s`; past it the worker is SIGKILLed, reaped and restarted, and `WorkerTimeout` is raised.
A worker that dies (the memory bound, a crash) raises `WorkerDied` and is restarted the same way.
"""

from __future__ import annotations

import os
import pickle
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from insession.log.base import LogConfig
from insession.log.eventlog import connect_read_only, decode_rows
from insession.log.export import (
    HistoryStore,
    events_to_arrow,
    history_dataset,
    is_object_store,
    write_day_partitions,
)
from insession.query.tables import connect
from insession.schema import ITEM_ARROW_SCHEMA, Event

if TYPE_CHECKING:
    from collections.abc import Callable

    from insession.log.jetstream import StreamReader

HEADROOM_BYTES = 768 * 2**20  # a worker's address space beyond DuckDB's memory_limit (measured: ~0.5 GiB idle)
MIN_WORKER_BYTES = 512 * 2**20  # below this a worker cannot even run a small query (idle: ~0.45 GiB)
THREAD_HEADROOM_BYTES = 64 * 2**20  # and per DuckDB thread (stack, allocator arena)
START_TIMEOUT_S = 60.0  # a worker that is not ready by then is reported as failed to start
CLOSE_GRACE_S = 2.0  # an idle worker told to exit (EOF) is SIGKILLed after this
READ_PAGE = 5_000  # events an export job reads from log.sqlite per statement
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)


def size_bytes(text: str, setting: str) -> int:
    """A size setting ("1GB" = 10^9, "1GiB" = 2^30, "512MB", as DuckDB reads them) in bytes; ValueError
    naming `setting` when it is not one."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"[query] {setting} = {text!r} is not a size; write it like '1GB', '512MB' or '2GiB'")
    return int(float(m.group(1)) * _UNITS[unit])


class WorkerConfig(msgspec.Struct, frozen=True):
    """What a worker needs, fixed for its life (sent as JSON, its first message)."""

    nice: int
    idle_cpu: bool  # SCHED_IDLE (where the OS has it): CPU only when nothing else wants it
    address_space: int  # RLIMIT_AS in bytes
    threads: int
    memory_limit: str
    max_rows: int
    max_bytes: int
    items_ttl_s: float
    retry_after_s: int  # told to a client whose query met a history file replaced under it
    history_dir: str | None
    log_path: str | None  # with catalog_path: read the sources from the files, else from the job
    catalog_path: str | None
    stream: LogConfig | None = None  # with catalog_path: read the tail from this replicated log's stream


class Job(msgspec.Struct):
    """One request. kind: "query", "explain" (DuckDB's plan) or "export" (the log's events tail_from..tail_upto
    written to the history by `write_day_partitions`; `sql` unused)."""

    kind: str
    sql: str
    params: dict[str, Any] = {}
    tail: bytes | None = None  # Arrow IPC of the log tail, when the lane reads the sources itself
    items: bytes | None = None  # Arrow IPC of the catalogue, likewise
    tail_from: int = 0  # with a `stream` worker: the tail is the stream's offsets tail_from..tail_upto
    tail_upto: int = -1


class Reply(msgspec.Struct):
    """One answer. kind: "ready", "table" (Arrow IPC in `ipc`), "plan", "exported" or "error"."""

    kind: str
    ipc: bytes | None = None
    truncated: bool = False
    plan: str | None = None
    status: int = 0
    code: str = ""
    message: str = ""
    column: str | None = None  # an unknown column's name (the parent knows where it is in the SQL)
    retry_after_s: int | None = None


class WorkerTimeout(Exception):
    """The job ran past its time limit; the worker was killed."""


class WorkerDied(Exception):
    """The worker exited (or could not start); `started` says whether it had been ready."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


# -- the parent's handle -------------------------------------------------------------------------


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class WorkerProcess:
    """One worker process, started on first use and restarted after a kill or a death; thread-safe."""

    def __init__(self, config: WorkerConfig, name: str, paused_s: Callable[[], float] | None = None) -> None:
        self.config = config
        self.name = name
        # seconds this worker has been held paused so far (`insession.query.yielding`); a job's deadline moves
        # by the pauses that fall inside it
        self._paused_s = paused_s
        self._lock = threading.Lock()  # one job at a time; held by `call` for the job's duration
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._closed = False
        # A reply is bounded by the byte limit (plus Arrow's framing); anything longer is refused.
        self._max_reply = 2 * config.max_bytes + 2**20

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None before the first job and after close)."""
        proc = self._proc
        return None if proc is None else proc.pid

    def _start(self) -> None:
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # the same insession as the server's
        env = {
            **os.environ,
            **WORKER_ENV,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        }
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from insession.query.workers import main; main(sys.argv)",
                    str(child.fileno()),
                ],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C at the server's terminal is the server's to handle
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        # over the socket, not the command line: a log or history URI may carry credentials, and every user
        # of the host can read a process's command line
        self._conn.send_bytes(msgspec.json.encode(self.config))
        self._ready = False

    def _reap(self, kill: bool) -> str:
        """Kill (if asked), wait for and forget the process; how it ended, in words."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._ready = False
        if conn is not None:
            conn.close()
        if proc is None:
            return "not running"
        if kill:
            proc.kill()
        try:
            code = proc.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return _exit_text(code)

    def _receive(self, timeout_s: float) -> Reply | None:
        """The next reply, or None after `timeout_s` of the worker's running time (pauses not counted)."""
        assert self._conn is not None
        paused = self._paused_s
        deadline = time.monotonic() + timeout_s
        start = paused() if paused is not None else 0.0
        while True:
            left = deadline - time.monotonic() + (paused() - start if paused is not None else 0.0)
            if self._conn.poll(max(0.0, min(left, 0.25) if paused is not None else left)):
                break
            if left <= 0:
                return None
        return msgspec.msgpack.decode(self._conn.recv_bytes(self._max_reply), type=Reply)

    def call(self, job: Job, timeout_s: float) -> Reply:
        """Run `job`, waiting at most `timeout_s` once it is sent (a fresh worker's start is not counted)."""
        with self._lock:
            if self._closed:
                raise WorkerDied(f"{self.name} is shut down", started=False)
            if self._proc is None:
                self._start()
            if not self._ready:
                self._await_ready()
            assert self._conn is not None
            try:
                self._conn.send_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
                reply = self._receive(timeout_s)
            except (EOFError, OSError, msgspec.DecodeError):
                how = self._reap(kill=True)
                self._restart()
                raise WorkerDied(f"{self.name} died while running the query ({how})", started=True) from None
            if reply is None:
                self._reap(kill=True)
                self._restart()
                raise WorkerTimeout(f"{self.name} ran past {timeout_s:g}s and was killed")
            return reply

    def _await_ready(self) -> None:
        try:
            hello = self._receive(START_TIMEOUT_S)
        except (EOFError, OSError, msgspec.DecodeError):
            hello = None
        if hello is None or hello.kind != "ready":
            how = self._reap(kill=True)
            raise WorkerDied(f"{self.name} did not start ({how}; its error is in the server log)", started=False)
        self._ready = True

    def _restart(self) -> None:
        """Start the replacement at once, so its start overlaps with the caller's handling of the error."""
        if not self._closed:
            self._start()

    def close(self) -> None:
        """Stop the worker: SIGKILL while a job or a start holds it, else EOF (it exits at once) and
        SIGKILL after a grace; reaped either way, so no zombie is left."""
        self._closed = True
        while not self._lock.acquire(timeout=0.05):
            proc = self._proc
            if proc is not None:
                proc.kill()  # the caller holding the lock sees EOF, reaps and does not restart
        try:
            self._reap(kill=not self._ready)  # one still starting has nothing to finish
        finally:
            self._lock.release()


# -- the worker ------------------------------------------------------------------------------------

# Errors that mean the query's own fault (bad types, bad casts, bad input to a function).
INPUT_ERRORS = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
    duckdb.NotImplementedException,
    duckdb.PermissionException,
    duckdb.SyntaxException,
    duckdb.DataError,
    duckdb.ProgrammingError,
    duckdb.ConstraintException,
)
_COLUMN_NOT_FOUND = re.compile(r'Referenced column "([^"]+)" not found')
_DUCKDB_NOISE = re.compile(r"\n\s*LINE \d+:.*", re.S)


class StreamUnavailable(Exception):
    """The replicated log's tail could not be read (no quorum, no server answering)."""


def error_reply(e: BaseException, config: WorkerConfig) -> Reply:
    """A failed job as the HTTP answer the lane gives (the same statuses and codes as before the workers)."""
    if isinstance(e, StreamUnavailable):
        return Reply("error", status=503, code="unavailable", message=str(e), retry_after_s=config.retry_after_s)
    if isinstance(e, duckdb.OutOfMemoryException | MemoryError):
        return Reply(
            "error",
            status=413,
            code="too_large",
            message=f"the query needs more than the analytics lane's {config.memory_limit} of memory",
        )
    if isinstance(e, INPUT_ERRORS):
        text = _DUCKDB_NOISE.sub("", str(e)).strip()
        m = _COLUMN_NOT_FOUND.search(text)
        return Reply(
            "error",
            status=400,
            code="unknown_column" if m else "invalid_query",
            message=text,
            column=m.group(1) if m else None,
        )
    if isinstance(e, duckdb.IOException):  # a history file replaced under the query (an export's clean-up)
        return Reply(
            "error",
            status=503,
            code="retry",
            message="the history changed while the query ran; retry",
            retry_after_s=config.retry_after_s,
        )
    if isinstance(e, duckdb.InternalException):  # DuckDB's own limitation, reached by this query's SQL
        return Reply("error", status=400, code="unsupported_query", message=f"DuckDB could not run this query: {e}")
    return Reply("error", status=500, code="internal", message=f"{type(e).__name__}: {e}")


def read_tail(log_path: str) -> pa.Table:
    """The events after the export mark, read in one read transaction of the log (EVENT_ARROW_SCHEMA)."""
    con = connect_read_only(log_path)
    try:
        con.execute("BEGIN")
        (mark,) = con.execute("SELECT value FROM meta WHERE key = 'exported_offset'").fetchone()
        events = decode_rows(con.execute("SELECT offset, body FROM events WHERE offset > ? ORDER BY offset", (mark,)))
        con.execute("COMMIT")
    finally:
        con.close()
    return events_to_arrow(events)


def read_range(log_path: str, first: int, last: int) -> list[Event]:
    """The log's events first..last in offset order, READ_PAGE at a time (each page its own short read
    transaction: one over the whole range would keep the writer's checkpoints from emptying the WAL while it
    lasts); ValueError when the log does not hold all of them."""
    con = connect_read_only(log_path)
    events: list[Event] = []
    try:
        for start in range(first, last + 1, READ_PAGE):
            events += decode_rows(con.execute("SELECT offset, body FROM events WHERE offset BETWEEN ? AND ? "
                                           "ORDER BY offset", (start, min(last, start + READ_PAGE - 1))))
    finally:
        con.close()
    if len(events) != last - first + 1:
        raise ValueError(f"the log holds {len(events)} of the events {first}..{last} to export")
    return events


def read_items(catalog_path: str) -> pa.Table:
    """The whole catalogue (ITEM_ARROW_SCHEMA)."""
    con = connect_read_only(catalog_path)
    try:
        names = ITEM_ARROW_SCHEMA.names
        rows = con.execute(f"SELECT {', '.join(names)} FROM items").fetchall()
    finally:
        con.close()
    columns = {name: [r[i] for r in rows] for i, name in enumerate(names)}
    columns["available"] = [bool(v) for v in columns["available"]]
    return pa.table(columns, schema=ITEM_ARROW_SCHEMA)


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class _Executor:
    """The worker's side: runs jobs in fresh locked-down DuckDBs (`insession.query.tables.connect`)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._items: tuple[float, pa.Table] | None = None
        self._store: HistoryStore | None = None  # an object-store history's filesystem, opened on first use
        self._stream: StreamReader | None = None  # a replicated log's reader, connected on first use

    def _items_table(self) -> pa.Table:
        assert self.config.catalog_path is not None
        now = time.monotonic()
        if self._items is None or now - self._items[0] >= self.config.items_ttl_s:
            self._items = (now, read_items(self.config.catalog_path))
        return self._items[1]

    def _history(self) -> HistoryStore:
        assert self.config.history_dir is not None
        if self._store is None:
            self._store = HistoryStore(self.config.history_dir)
        return self._store

    def _stream_events(self, stream: LogConfig, first: int, upto: int) -> list[Event]:
        """The replicated log's events first..upto (a query: the node's tail when it was dispatched)."""
        if upto < first:
            return []
        try:
            if self._stream is None:
                from insession.log.jetstream import StreamReader  # nats-py only where a replicated log is used

                self._stream = StreamReader(stream)
            return list(self._stream.read(first, upto))
        except Exception as e:  # no quorum, no server: the next job connects anew
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            raise StreamUnavailable(f"the replicated log's events {first}..{upto} cannot be read now ({e}); "
                                    "retry") from e

    def run(self, job: Job) -> Reply:
        try:
            return self._export(job) if job.kind == "export" else self._query(job)
        except Exception as e:  # every failure is an answer; the worker lives on
            return error_reply(e, self.config)

    def _export(self, job: Job) -> Reply:
        """Read the log's events tail_from..tail_upto from its files or stream and write them to the history."""
        cfg = self.config
        if cfg.history_dir is None:
            raise ValueError("an export job for a worker without a history")
        if cfg.stream is not None:
            events = self._stream_events(cfg.stream, job.tail_from, job.tail_upto)
        elif cfg.log_path is not None:
            events = read_range(cfg.log_path, job.tail_from, job.tail_upto)
        else:
            raise ValueError("an export job for a worker that reads no log")
        write_day_partitions(events, self._history())
        return Reply("exported")

    def _query(self, job: Job) -> Reply:
        cfg = self.config
        if job.tail is not None and job.items is not None:
            tail, items = _from_ipc(job.tail), _from_ipc(job.items)
        elif cfg.stream is not None:
            tail = events_to_arrow(self._stream_events(cfg.stream, job.tail_from, job.tail_upto))
            items = self._items_table()
        elif cfg.log_path is not None:
            tail, items = read_tail(cfg.log_path), self._items_table()
        else:
            raise ValueError("the job carries no sources and the worker has no log to read")
        if cfg.history_dir is not None and is_object_store(cfg.history_dir):
            # DuckDB cannot read the object store itself (no httpfs here, and external access is off): the
            # history goes in as an Arrow dataset scanned through pyarrow.fs, unioned with the tail
            first = int(pc.min(tail.column("offset")).as_py()) if tail.num_rows else None
            events = pads.dataset([history_dataset(self._history(), below=first), pads.dataset(tail)])
            con = connect(history_dir=None, tail=events, items=items,  # type: ignore[arg-type]  # scanned as Arrow
                          threads=cfg.threads, memory_limit=cfg.memory_limit)
        else:
            history = Path(cfg.history_dir) if cfg.history_dir is not None else None
            con = connect(history_dir=history, tail=tail, items=items, threads=cfg.threads,
                          memory_limit=cfg.memory_limit)
        try:
            params = job.params or None
            if job.kind == "explain":
                rows = con.sql(f"EXPLAIN {job.sql}", params=params).fetchall()
                return Reply("plan", plan="\n".join(r[1] for r in rows))
            return self._fetch(con.sql(job.sql, params=params).to_arrow_reader(2048))
        finally:
            con.close()

    def _fetch(self, reader: pa.RecordBatchReader) -> Reply:
        """The answer cut to max_rows and max_bytes (Arrow sizes) before it is sent."""
        cfg = self.config
        sink = pa.BufferOutputStream()
        rows = nbytes = 0
        truncated = False
        with pa.ipc.new_stream(sink, reader.schema) as out:
            for batch in reader:
                room = cfg.max_rows - rows
                if batch.num_rows > room:
                    batch = batch.slice(0, room)
                    truncated = True
                if nbytes + batch.nbytes > cfg.max_bytes:
                    # Keep the share of this batch that still fits (rows are roughly equal in size).
                    keep = int(batch.num_rows * (cfg.max_bytes - nbytes) / max(batch.nbytes, 1))
                    batch = batch.slice(0, max(keep, 0))
                    truncated = True
                out.write_batch(batch)
                rows += batch.num_rows
                nbytes += batch.nbytes
                if truncated:
                    break
        return Reply("table", ipc=sink.getvalue().to_pybytes(), truncated=truncated)


def _confine(config: WorkerConfig) -> None:
    """Lower this process's CPU priority and cap its address space (both inherited by DuckDB's threads)."""
    if config.nice > 0:
        os.nice(config.nice)
    if config.idle_cpu and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    resource.setrlimit(resource.RLIMIT_AS, (config.address_space, config.address_space))


def _exit_with_parent() -> None:
    """A worker whose server died (even by SIGKILL) exits within a second instead of finishing its query."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def main(argv: list[str]) -> None:
    """The worker process: `main(["-c", FD])` in a fresh interpreter (started by WorkerProcess), whose first
    message on FD is its `WorkerConfig`."""
    conn = Connection(int(argv[1]))
    os.dup2(2, 1)  # anything a library prints goes to the log, never into the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        config = msgspec.json.decode(conn.recv_bytes(), type=WorkerConfig)
    except (EOFError, ConnectionResetError):
        os._exit(0)
    _confine(config)
    threading.Thread(target=_exit_with_parent, name="insession-worker-watchdog", daemon=True).start()
    executor = _Executor(config)
    try:
        conn.send_bytes(msgspec.msgpack.encode(Reply("ready")))
        while True:
            data = conn.recv_bytes()
            conn.send_bytes(msgspec.msgpack.encode(executor.run(pickle.loads(data))))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The lane closed (or gave up on this worker): nothing to flush, and a full interpreter
        # teardown of DuckDB, Arrow and numpy takes seconds on a busy machine.
        os._exit(0)
