"""The analytics lane: DuckDB over the Parquet history plus the log's tail, in worker processes.

QoS by isolation: every query runs in one of `concurrency` worker processes (`insession.query.workers`),
each at a lower CPU priority, with its address space capped by the operating system (`RLIMIT_AS`) and
`threads` DuckDB threads; at most `queue` more queries wait, and a query beyond that is refused at once
with 429 and Retry-After. A query that runs past `timeout_s` has its worker SIGKILLed (not asked to
stop: DuckDB checks for interrupts only between vectors, and one huge `levenshtein` call is one vector)
and is answered with 408; a worker that dies, e.g. on its memory bound, is answered with 413; both are
replaced at once. Answers are cut to `max_rows` and `max_bytes` in the worker and come back as Arrow
IPC, so no query can grow the server's memory beyond that. Every query gets a fresh, locked-down
in-memory DuckDB (`insession.query.tables.connect`), so nothing one query does can be seen by the next.

Validation (binding against empty tables) runs in a worker of its own too: DuckDB folds constant
expressions while it prepares, so a `PREPARE` of `SELECT lpad('x', 1100000000, 'y')` already builds
the 1.1 GB string.

The background export of the log to the Parquet history runs in a worker of its own as well
(`export_writer`), which reads the log's files or stream itself.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from insession.log.base import LogConfig
from insession.log.export import ChunkWriter
from insession.query.errors import QueryError
from insession.query.workers import (
    HEADROOM_BYTES,
    MIN_WORKER_BYTES,
    THREAD_HEADROOM_BYTES,
    Job,
    Reply,
    WorkerConfig,
    WorkerDied,
    WorkerProcess,
    WorkerTimeout,
    size_bytes,
)
from insession.query.yielding import ServingFirst, YieldRule

Position = Callable[[str], dict[str, int]]
EXPORT_TIMEOUT_S = 300.0  # one export chunk (at most 200,000 events) in the export worker; past it, killed


class ExportFailed(RuntimeError):
    """The export worker answered with an error (its message says which); the export is retried."""


def _quarter_of_cores() -> int:
    return max(1, (os.cpu_count() or 2) // 4)


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Analytics lane limits (a server config section `[query]` maps onto these fields).

    By default analytics may use about a quarter of the machine (at least one core), at a lower OS
    priority than serving, so the serving lane keeps its cores whatever analysts run.
    """

    concurrency: int = msgspec.field(default_factory=_quarter_of_cores)  # analytics queries running at once
    queue: int = 8  # analytics queries waiting beyond those; one more gets 429
    threads: int = msgspec.field(default_factory=_quarter_of_cores)  # DuckDB threads per analytics query
    nice: int = 10  # added to the analytics worker processes' OS niceness (0 leaves it)
    # The workers (queries and the export) run under SCHED_IDLE where the OS has it: niceness 10 still gave
    # two analytics scans about a core of a 2-core machine beside the server and its load client
    # (bench_mixed), and serving's latency ran away each time a snapshot added its work on top.
    idle_cpu: bool = True
    timeout_s: float = 30.0  # per query, from the moment it starts running
    memory_limit: str = "1GB"  # per query (DuckDB memory_limit; the worker's RLIMIT_AS adds headroom)
    max_rows: int = 10_000  # rows returned at most (more: truncated=true)
    max_bytes: int = 16 * 1024 * 1024  # Arrow bytes returned at most (more: truncated=true)
    retry_after_s: int = 1  # told to a client refused with 429
    items_ttl_s: float = 1.0  # the `items` table is re-read from the catalogue at most this often
    # Serving first (`insession.query.yielding`): while the serving process wakes on average more than this
    # late (ms, over 100 ms), the running queries are paused; 0 turns it off.
    yield_lag_ms: float = 5.0
    # Each worker process's address-space cap (RLIMIT_AS); None: memory_limit + 768MiB + 64MiB per DuckDB
    # thread. At least 512MiB: an idle worker's interpreter and libraries take about 0.45GiB.
    worker_memory: str | None = None


@dataclass(frozen=True)
class Sources:
    """Where the analytics lane reads from (the event log, the catalogue and the history directory).

    With `log_path` and `catalog_path` (what `of` gives for the embedded log) each worker reads the log's
    tail and the catalogue itself through read-only SQLite connections, so the server never materialises
    them for a query. With `stream` (a replicated log's `[log]`, what `of` gives for JetStream) and
    `catalog_path`, each worker reads the stream's tail itself, from the export mark to the offset this
    node knows acknowledged (`last_offset()`) when the query is dispatched: reading tens of thousands of
    events back from NATS is Python work that, done in the server, held its requests up. Without either,
    the lane calls `tail_arrow(exported_offset() + 1)` and `items_arrow()` (cached for `items_ttl_s`) in
    the server and ships the tables to the worker as Arrow IPC.
    """

    history_dir: Path | str | None  # a local directory, or an object-store URI (read through pyarrow.fs)
    exported_offset: Callable[[], int]
    tail_arrow: Callable[[int], pa.Table]  # events with offset >= argument, EVENT_ARROW_SCHEMA
    items_arrow: Callable[[], pa.Table]  # the catalogue, ITEM_ARROW_SCHEMA
    log_path: Path | None = None
    catalog_path: Path | None = None
    stream: LogConfig | None = None
    last_offset: Callable[[], int] | None = None  # with `stream`: the newest offset this node knows stored

    @classmethod
    def of(cls, log: Any, catalog: Any, history_dir: Path | str | None) -> Sources:
        """From a `Log` and a `Catalog` (`insession.log`): workers read their files, or the replicated log's
        stream (a log without a file of its own: `path` None, its `config` the `[log]` it opened)."""
        stream = log.config if log.path is None else None
        return cls(history_dir, log.exported_offset, log.tail_arrow, catalog.to_arrow, log.path, catalog.path,
                   stream, log.last_offset if stream is not None else None)


@dataclass(frozen=True)
class Table:
    """An analytics answer: column names, DuckDB types, rows, and whether a limit cut it short."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)
    return sink.getvalue().to_pybytes()


def _answer(reply: Reply, position: Position | None) -> Table:
    """A worker's reply as a `Table`, or the QueryError it reports."""
    if reply.kind == "error":
        if reply.status >= 500 and reply.code == "internal":
            raise RuntimeError(f"an analytics worker failed: {reply.message}")
        pos = position(reply.column) if reply.column is not None and position is not None else {}
        raise QueryError(reply.message, reply.status, code=reply.code, retry_after_s=reply.retry_after_s, **pos)
    if reply.kind == "plan":
        return Table(["plan"], ["VARCHAR"], [[reply.plan]], False)
    if reply.kind != "table" or reply.ipc is None:
        raise RuntimeError(f"an analytics worker answered {reply.kind!r} to a query")
    table = pa.ipc.open_stream(reply.ipc).read_all()
    table.validate(full=True)  # the bytes come from another process: check them before reading them
    columns = [c.to_pylist() for c in table.columns]
    return Table(
        columns=table.schema.names,
        types=[str(f.type) for f in table.schema],
        rows=[list(r) for r in zip(*columns, strict=True)] if columns else [],
        truncated=reply.truncated,
    )


@dataclass
class _Request:
    future: Future[Table]
    sql: str
    params: dict[str, Any]
    explain: bool
    position: Position | None


class AnalyticsLane:
    """Runs sandboxed SELECTs (already checked by `insession.query.sql`) under the limits above.

    Workers start on first use (a fresh one takes about a second) and are replaced after a kill or a
    death; `close()` stops and reaps every one of them.
    """

    def __init__(self, sources: Sources, limits: Limits | None = None) -> None:
        self.sources = sources
        self.limits = lim = limits or Limits()
        files = sources.log_path is not None and sources.catalog_path is not None
        streamed = sources.stream is not None and sources.last_offset is not None and sources.catalog_path is not None
        address_space = (
            size_bytes(lim.memory_limit, "memory_limit") + HEADROOM_BYTES + lim.threads * THREAD_HEADROOM_BYTES
        )
        if lim.worker_memory is not None:
            address_space = size_bytes(lim.worker_memory, "worker_memory")
            if address_space < MIN_WORKER_BYTES:
                raise ValueError(
                    f"[query] worker_memory = {lim.worker_memory!r} is below the {MIN_WORKER_BYTES >> 20}MiB a "
                    "worker's interpreter and libraries take; raise it, or leave it out for "
                    "memory_limit + 768MiB + 64MiB per thread"
                )
        self.config = WorkerConfig(
            nice=max(lim.nice, 0),
            idle_cpu=lim.idle_cpu,
            address_space=address_space,
            threads=lim.threads,
            memory_limit=lim.memory_limit,
            max_rows=lim.max_rows,
            max_bytes=lim.max_bytes,
            items_ttl_s=lim.items_ttl_s,
            retry_after_s=lim.retry_after_s,
            history_dir=None if sources.history_dir is None else str(sources.history_dir),
            log_path=str(sources.log_path) if files else None,
            catalog_path=str(sources.catalog_path) if files or streamed else None,
            stream=sources.stream if streamed else None,
        )
        if lim.yield_lag_ms < 0:
            raise ValueError(f"[query] yield_lag_ms = {lim.yield_lag_ms!r} is negative; give 0 to turn pausing off")
        self.serving_first = (
            ServingFirst(YieldRule(lim.yield_lag_ms / 1000), lambda: self.pids) if lim.yield_lag_ms > 0 else None
        )
        paused_s = self.serving_first.paused_s if self.serving_first is not None else None
        self._workers = [
            WorkerProcess(self.config, f"analytics worker {i}", paused_s) for i in range(lim.concurrency)
        ]
        # the background export's own worker (a query never waits behind an export, nor an export behind one)
        self._exporter = WorkerProcess(self.config, "export worker") if files or streamed else None
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self.rejected = 0
        self.timeouts = 0
        self._items: tuple[float, pa.Table] | None = None
        self._closed = False
        self._dispatchers = [
            threading.Thread(target=self._dispatch, args=(w,), name=f"insession-analytics-{i}", daemon=True)
            for i, w in enumerate(self._workers)
        ]
        for t in self._dispatchers:
            t.start()

    # -- admission ------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Queries admitted but not yet running."""
        with self._lock:
            return self._admitted - self._running

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers alive now."""
        return [pid for w in self._workers if (pid := w.pid) is not None]

    def submit(
        self,
        sql: str,
        params: Mapping[str, Any],
        *,
        explain: bool = False,
        position: Position | None = None,
    ) -> Future[Table]:
        """Admit a query or refuse it with 429 at once; the future holds a `Table` or a QueryError."""
        lim = self.limits
        with self._lock:
            if self._closed:
                raise QueryError("the analytics lane is shut down", 503, code="unavailable")
            if self._admitted >= lim.concurrency + lim.queue:
                self.rejected += 1
                raise QueryError(
                    f"the analytics lane is full ({lim.concurrency} running, {lim.queue} waiting); "
                    f"retry in {lim.retry_after_s}s",
                    429,
                    code="overloaded",
                    retry_after_s=lim.retry_after_s,
                )
            self._admitted += 1
            fut: Future[Table] = Future()
            fut.add_done_callback(self._done)
            self._requests.put(_Request(fut, sql, dict(params), explain, position))
        return fut

    def _done(self, _: Future[Table]) -> None:
        with self._lock:
            self._admitted -= 1

    # -- execution (one dispatcher thread per worker) -------------------------------------------

    def _dispatch(self, worker: WorkerProcess) -> None:
        while (req := self._requests.get()) is not None:
            if not req.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running += 1
            outcome: Table | BaseException
            first = self.serving_first
            if first is not None:
                first.begin()
            try:
                outcome = self._execute(worker, req)
            except BaseException as e:  # handed to the waiting caller
                outcome = e
            finally:
                if first is not None:
                    first.end()
            with self._lock:
                self._running -= 1
            if isinstance(outcome, BaseException):
                req.future.set_exception(outcome)
            else:
                req.future.set_result(outcome)

    def _items_table(self) -> pa.Table:
        now = time.monotonic()
        cached = self._items
        if cached is not None and now - cached[0] < self.limits.items_ttl_s:
            return cached[1]
        items = self.sources.items_arrow()
        self._items = (now, items)
        return items

    def _execute(self, worker: WorkerProcess, req: _Request) -> Table:
        lim = self.limits
        job = Job("explain" if req.explain else "query", req.sql, req.params)
        src = self.sources
        if self.config.stream is not None:  # the worker reads the stream's tail itself, up to what this node knows
            assert src.last_offset is not None
            job.tail_from, job.tail_upto = src.exported_offset() + 1, src.last_offset()
        elif self.config.log_path is None:  # sources given as callables: read here, ship to the worker
            job.tail = _ipc(src.tail_arrow(src.exported_offset() + 1))
            job.items = _ipc(self._items_table())
        try:
            reply = worker.call(job, lim.timeout_s)
        except WorkerTimeout:
            with self._lock:
                self.timeouts += 1
            raise QueryError(
                f"the query ran past the analytics lane's limit of {lim.timeout_s:g}s", 408, code="timeout"
            ) from None
        except WorkerDied as e:
            if self._closed:
                raise QueryError("the analytics lane is shut down", 503, code="unavailable") from None
            if not e.started:
                raise QueryError(
                    f"{e}; retry later", 503, code="unavailable", retry_after_s=lim.retry_after_s
                ) from None
            raise QueryError(
                f"the query's worker died ({e}); the likeliest cause is its operating-system memory bound "
                f"of {self.config.address_space / 2**30:.1f} GiB: aggregate or filter more, or add a LIMIT",
                413,
                code="too_large",
            ) from None
        return _answer(reply, req.position)

    def export_writer(self) -> ChunkWriter | None:
        """The background export's `ChunkWriter`: the export worker reads the range from the log's files or
        stream itself and writes it to the history, so the serving process does none of that work (None:
        the sources are callables, nothing for a worker to read; the log exports in process)."""
        return self._export_chunk if self._exporter is not None else None

    def _export_chunk(self, first: int, last: int) -> None:
        assert self._exporter is not None
        reply = self._exporter.call(Job("export", "", tail_from=first, tail_upto=last), EXPORT_TIMEOUT_S)
        if reply.kind != "exported":
            raise ExportFailed(f"the export worker did not write offsets {first}..{last}: {reply.message}")

    def close(self) -> None:
        """Refuse new queries, cancel the waiting ones, kill running ones and reap every worker (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        pending: list[_Request] = []
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                pending.append(req)
        for req in pending:
            req.future.cancel()
        if self.serving_first is not None:
            self.serving_first.close()  # continued, so an idle worker can read its EOF and exit
        for _ in self._dispatchers:
            self._requests.put(None)
        for w in [*self._workers, *([self._exporter] if self._exporter is not None else [])]:
            w.close()
        for t in self._dispatchers:
            t.join()
