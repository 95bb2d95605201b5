"""The analytics lane: DuckDB over the Parquet history plus the log's tail, off the serving path.

QoS: queries run on a small thread pool (DuckDB releases the GIL while it works, so the serving
event loop keeps its core), at most `concurrency` at a time with `threads` DuckDB threads each; at
most `queue` more wait, and a query beyond that is refused at once with 429 and Retry-After. Each
query has a deadline (DuckDB `interrupt()`), a memory limit, and a cap on rows and bytes returned
(the answer is truncated and flagged). Every query gets a fresh, locked-down in-memory DuckDB
(`insession.query.tables.connect`), so nothing one query does can be seen by the next.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from insession.query.errors import QueryError
from insession.query.tables import connect, schema_connection


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
    nice: int = 10  # added to the analytics threads' OS niceness (Linux; 0 leaves it)
    timeout_s: float = 30.0  # per query, from the moment it starts running
    memory_limit: str = "1GB"  # per query (DuckDB memory_limit)
    max_rows: int = 10_000  # rows returned at most (more: truncated=true)
    max_bytes: int = 16 * 1024 * 1024  # Arrow bytes returned at most (more: truncated=true)
    retry_after_s: int = 1  # told to a client refused with 429
    items_ttl_s: float = 1.0  # the `items` table is re-read from the catalogue at most this often


def _lower_priority(nice: int) -> None:
    """Pool thread initializer: raise this thread's niceness (DuckDB's threads started from it inherit it)."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:  # not permitted here: run at normal priority
            pass


@dataclass(frozen=True)
class Sources:
    """Where the analytics lane reads from (the event log, the catalogue and the history directory)."""

    history_dir: Path | None
    exported_offset: Callable[[], int]
    tail_arrow: Callable[[int], pa.Table]  # events with offset >= argument, EVENT_ARROW_SCHEMA
    items_arrow: Callable[[], pa.Table]  # the catalogue, ITEM_ARROW_SCHEMA

    @classmethod
    def of(cls, log: Any, catalog: Any, history_dir: Path | None) -> Sources:
        """From an `EventLog` and a `Catalog` (`insession.log`)."""
        return cls(history_dir, log.exported_offset, log.tail_arrow, catalog.to_arrow)


@dataclass(frozen=True)
class Table:
    """An analytics answer: column names, DuckDB types, rows, and whether a limit cut it short."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool


_COLUMN_NOT_FOUND = re.compile(r'Referenced column "([^"]+)" not found')
_DUCKDB_NOISE = re.compile(r"\n\s*LINE \d+:.*", re.S)

# Errors that mean the query's own fault (bad types, bad casts, bad input to a function).
_INPUT_ERRORS = (
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


def input_error(e: duckdb.Error, position: Callable[[str], dict[str, int]] | None = None) -> QueryError:
    """A DuckDB error raised by a user's query as a 400 with DuckDB's message (minus its echo of the SQL)."""
    text = _DUCKDB_NOISE.sub("", str(e)).strip()
    pos: dict[str, int] = {}
    m = _COLUMN_NOT_FOUND.search(text)
    if m and position is not None:
        pos = position(m.group(1))
    code = "unknown_column" if m else "invalid_query"
    return QueryError(text, 400, code=code, **pos)


class AnalyticsLane:
    """Runs sandboxed SELECTs (already checked by `insession.query.sql`) under the limits above."""

    def __init__(self, sources: Sources, limits: Limits | None = None) -> None:
        self.sources = sources
        self.limits = limits or Limits()
        self._pool = ThreadPoolExecutor(
            max_workers=self.limits.concurrency,
            thread_name_prefix="insession-analytics",
            initializer=_lower_priority,
            initargs=(self.limits.nice,),
        )
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self.rejected = 0
        self.timeouts = 0
        self._items: tuple[float, pa.Table] | None = None
        self._local = threading.local()
        self._closed = False

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

    def submit(
        self,
        sql: str,
        params: Mapping[str, Any],
        *,
        explain: bool = False,
        position: Callable[[str], dict[str, int]] | None = None,
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
        try:
            fut = self._pool.submit(self._run, sql, dict(params), explain, position)
        except RuntimeError:
            with self._lock:
                self._admitted -= 1
            raise QueryError("the analytics lane is shut down", 503, code="unavailable") from None
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: Future[Table]) -> None:
        with self._lock:
            self._admitted -= 1

    # -- validation (caller's thread, no data read) ---------------------------------------------

    def validate(self, sql: str, position: Callable[[str], dict[str, int]] | None = None) -> None:
        """Bind the query against empty tables of the right schema: unknown columns, type errors -> 400."""
        con = getattr(self._local, "schema", None)
        if con is None:
            con = self._local.schema = schema_connection()
        try:
            con.execute(f"PREPARE _q AS {sql}")
            con.execute("DEALLOCATE _q")
        except _INPUT_ERRORS as e:
            raise input_error(e, position) from None

    # -- execution (pool thread) ----------------------------------------------------------------

    def _items_table(self) -> pa.Table:
        now = time.monotonic()
        cached = self._items
        if cached is not None and now - cached[0] < self.limits.items_ttl_s:
            return cached[1]
        items = self.sources.items_arrow()
        self._items = (now, items)
        return items

    def _run(
        self,
        sql: str,
        params: dict[str, Any],
        explain: bool,
        position: Callable[[str], dict[str, int]] | None,
    ) -> Table:
        with self._lock:
            self._running += 1
        try:
            return self._execute(sql, params, explain, position)
        finally:
            with self._lock:
                self._running -= 1

    def _execute(
        self,
        sql: str,
        params: dict[str, Any],
        explain: bool,
        position: Callable[[str], dict[str, int]] | None,
    ) -> Table:
        lim = self.limits
        src = self.sources
        tail = src.tail_arrow(src.exported_offset() + 1)
        con = connect(
            history_dir=src.history_dir,
            tail=tail,
            items=self._items_table(),
            threads=lim.threads,
            memory_limit=lim.memory_limit,
        )
        timer = threading.Timer(lim.timeout_s, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            if explain:
                rows = con.sql(f"EXPLAIN {sql}", params=params or None).fetchall()
                return Table(["plan"], ["VARCHAR"], [["\n".join(r[1] for r in rows)]], False)
            return self._fetch(con.sql(sql, params=params or None).to_arrow_reader(2048))
        except duckdb.InterruptException:
            self.timeouts += 1
            raise QueryError(
                f"the query ran past the analytics lane's limit of {lim.timeout_s:g}s", 408, code="timeout"
            ) from None
        except duckdb.OutOfMemoryException:
            raise QueryError(
                f"the query needs more than the analytics lane's {lim.memory_limit} of memory",
                413,
                code="too_large",
            ) from None
        except _INPUT_ERRORS as e:
            raise input_error(e, position) from None
        except duckdb.IOException:  # a history file replaced under the query (an export's clean-up)
            raise QueryError(
                "the history changed while the query ran; retry", 503, code="retry", retry_after_s=lim.retry_after_s
            ) from None
        except duckdb.InternalException as e:  # DuckDB's own limitation, reached by this query's SQL
            raise QueryError(f"DuckDB could not run this query: {e}", 400, code="unsupported_query") from None
        finally:
            timer.cancel()
            con.close()

    def _fetch(self, reader: pa.RecordBatchReader) -> Table:
        lim = self.limits
        batches: list[pa.RecordBatch] = []
        rows = nbytes = 0
        truncated = False
        for batch in reader:
            room = lim.max_rows - rows
            if batch.num_rows > room:
                batch = batch.slice(0, room)
                truncated = True
            if nbytes + batch.nbytes > lim.max_bytes:
                # Keep the share of this batch that still fits (rows are roughly equal in size).
                keep = int(batch.num_rows * (lim.max_bytes - nbytes) / max(batch.nbytes, 1))
                batch = batch.slice(0, max(keep, 0))
                truncated = True
            batches.append(batch)
            rows += batch.num_rows
            nbytes += batch.nbytes
            if truncated:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema)
        columns = [c.to_pylist() for c in table.columns]
        return Table(
            columns=table.schema.names,
            types=[str(f.type) for f in table.schema],
            rows=[list(r) for r in zip(*columns, strict=True)] if columns else [],
            truncated=truncated,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
