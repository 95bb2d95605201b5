"""The embedded event log: a crash-safe, append-only, group-committed log of events on SQLite.

Storage: one SQLite database in WAL mode with `synchronous=FULL`, so a transaction is acknowledged
only after its WAL frames are fsynced; SQLite's WAL recovery guarantees that a restart sees every
committed transaction and nothing of an uncommitted one (tests/log/test_log_crash.py kill -9s a writer
at random moments; power loss additionally relies on the disk honouring fsync). Each row is

    offset INTEGER PRIMARY KEY   -- global, dense (0, 1, 2, ...), monotonically increasing
    event_id TEXT                -- idempotency key, partial UNIQUE index where not null
    partition INTEGER            -- crc32(user_id) % partitions: the key of the replicated log at scale
    body BLOB                    -- the whole Event as msgpack (offset not included; it is the row key)

Only event_id is indexed (besides the primary key) and nothing else is a column: every extra index or
column costs ingest throughput, and every reader of the log scans by offset.

Group commit (leader/follower, as in RocksDB's write groups): `append` prepares its rows (msgpack,
partition) in the caller's thread and queues its batch. If no commit is running, that caller becomes
the writer: it takes every batch waiting at that moment, de-duplicates them against the table and each
other, inserts them in ONE transaction, commits (one fsync for all of them), calls `on_commit` with the
newly stored events, and only then releases the callers of the group; callers that queued meanwhile
form the next group. One committer at a time, so offsets and `on_commit` calls are strictly ordered. A
lone caller commits in its own thread (no hand-off to another thread on the latency path). A batch is
all-or-nothing: it is inside exactly one transaction. Offsets are assigned in memory, so one process
owns a log file (a second writer process would fail its inserts on the primary key, never corrupt).

Unknown items (decision): an event for an item the catalogue does not know is accepted and stored with
category=None (the caller counts it); a later catalogue upsert does not rewrite history.

Idempotency keys: time-ordered event ids (UUIDv7, ULID) land at the right edge of the event_id index;
random ones (UUIDv4) touch a random index page per event, which costs throughput once the index
outgrows the page cache (the benchmark measures both).

The acknowledged mark (`log.sqlite-acked`): after each commit's fsync, and before its callers are
acknowledged, the newest offset is written into this small file (one `pwrite` of 21 bytes, no fsync:
1.3 µs measured on ext4, beside a commit's fsync of milliseconds). It survives a crash of the process
(the page cache holds it) and can lag after a power loss, but is never ahead of what was fsynced. A log that opens
below its mark lost acknowledged events (deleted, restored from an older copy, or its `-wal` file
truncated after a crash: SQLite then recovers the transactions before the cut, silently) and is
refused with `LogBehindError` before it could hand out their offsets again; nothing is changed on
disk, so restoring the files is still possible (tests/log/test_log_wal_truncated.py).

Export: closed ranges of the log go to day-partitioned Parquet (see `insession.log.export`); rows stay
in SQLite (retention is out of scope), so `tail_arrow` and `read` never race with an export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import msgspec
import pyarrow as pa

from insession.log.base import AppendResult, LogUnavailable
from insession.log.export import (
    ChunkWriter,
    events_to_arrow,
    history_location,
    remove_orphans,
    writer_here,
)
from insession.schema import Event, Item, partition_of

if TYPE_CHECKING:
    from insession.log.catalog import Catalog

log = logging.getLogger(__name__)

READ_PAGE = 5_000  # rows per read query: bounded memory, short read transactions (checkpoints proceed)
EXPORT_CHUNK = 200_000  # events per export round (one Parquet file per day per round)
_LOOKUP_CHUNK = 500  # event_ids per IN (...) lookup, under SQLite's variable limit
_SYNCHRONOUS = ("FULL", "OFF")
_MAX_OFFSET = 2**63 - 1
ACKED_SUFFIX = "-acked"  # the acknowledged mark beside the database: log.sqlite-acked
_MARK_WIDTH = 20  # digits of the mark, so every write overwrites the whole previous one

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    offset INTEGER PRIMARY KEY,
    event_id TEXT,
    partition INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events(event_id) WHERE event_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)

Row = tuple[str | None, int, bytes]  # event_id, partition, body


LOG_FILE = "log.sqlite"  # the embedded log in a data directory

class LogBehindError(RuntimeError):
    """The log holds fewer events than it acknowledged (its acknowledged mark is further): refused at open."""


class _Batch:
    """One caller's batch waiting for a commit. `wake` is released once: when the batch is committed
    (or failed), or when its caller is handed the committer role."""

    __slots__ = ("events", "rows", "done", "results", "error", "wake")

    def __init__(self, events: list[Event], rows: list[Row]) -> None:
        self.events = events
        self.rows = rows
        self.done = False
        self.results: list[AppendResult] = []
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def connect_read_only(path: str | Path, *, handed_over: bool = False) -> sqlite3.Connection:
    """A read-only connection to a log (or catalogue) file another process writes: the analytics and export
    workers', the snapshot standby's and a feature reader's (`insession.features.tail`); never takes a write
    lock. `handed_over`: opened in one thread and used in another afterwards (never two at once)."""
    return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=not handed_over)


def decode_rows(rows: Iterable[tuple[int, bytes]]) -> list[Event]:
    """(offset, body) rows of the events table as events carrying their offsets."""
    events = []
    for offset, body in rows:
        ev = _decoder.decode(body)
        ev.offset = offset
        events.append(ev)
    return events


class EventLog:
    """Durable append-only log of events; thread-safe. `path` is the SQLite file (created if absent).

    `synchronous` other than "FULL" (acknowledged means fsynced) exists for the benchmark's ceiling only.
    """

    def __init__(self, path: Path, partitions: int = 16,
                 on_commit: Callable[[list[Event]], None] | None = None,
                 *, synchronous: str = "FULL") -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partitions = partitions
        self._on_commit = on_commit
        self._synchronous = synchronous
        self._conn = _connect(self.path, synchronous)  # used by one committer at a time
        self._conn.executescript(_SCHEMA)
        self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('partitions', ?)", (partitions,))
        self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('exported_offset', -1)")
        meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        if meta["partitions"] != partitions:
            self._conn.close()
            raise ValueError(f"{self.path} has {meta['partitions']} partitions, not {partitions}")
        self._exported = int(meta["exported_offset"])
        (last,) = self._conn.execute("SELECT COALESCE(MAX(offset), -1) FROM events").fetchone()
        self._last = int(last)
        self._mark_fd = self._open_mark() if synchronous == "FULL" else None  # only fsynced acks are marked
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._catalog: Catalog | None = None
        self._history_clean = False  # orphans of a crashed export removed from the history dir
        self._lock = threading.Lock()  # guards _pending, _committing, _closed
        self._idle = threading.Condition(self._lock)  # notified when no commit is running
        self._pending: list[_Batch] = []
        self._committing = False
        self._closed = False

    def _open_mark(self) -> int:
        """Open the acknowledged mark; refuse a log that ends below it, bring a missing or lagging one up."""
        path = self.path.with_name(self.path.name + ACKED_SUFFIX)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        text = os.pread(fd, _MARK_WIDTH + 1, 0).strip()
        mark = int(text) if text.lstrip(b"-").isdigit() else -1
        if mark > self._last:
            os.close(fd)
            self._conn.close()
            raise LogBehindError(
                f"{self.path.name} ends at offset {self._last} but events up to offset {mark} were acknowledged "
                f"({path.name}): the log was lost or restored from an older copy, or its -wal file was truncated. "
                f"Restore {self.path.name} with its -wal file; or, to serve what it holds now and lose the "
                f"acknowledged events after offset {self._last}, delete {path.name}"
            )
        if mark < self._last:  # a log from before the mark, or a mark the power loss kept from disk
            self._write_mark(fd, self._last)
        return fd

    def _write_mark(self, fd: int, offset: int) -> None:
        try:
            os.pwrite(fd, f"{offset:>{_MARK_WIDTH}}\n".encode(), 0)
        except OSError:  # the events are durable already: a guard that cannot be written fails nothing
            log.warning("the acknowledged mark of %s could not be written", self.path.name, exc_info=True)

    # -- writes ---------------------------------------------------------------------------------

    def append(self, events: list[Event]) -> list[AppendResult]:
        """Store a batch durably (all-or-nothing); returns once it is fsynced. Sets `ev.offset` in place."""
        if not events:
            return []
        n = self.partitions
        rows = [(ev.event_id, partition_of(ev.user_id, n), _encoder.encode(ev)) for ev in events]
        batch = _Batch(events, rows)
        with self._lock:
            if self._closed:
                raise RuntimeError("the event log is closed")
            self._pending.append(batch)
            lead = not self._committing
            self._committing = True
        if not lead:
            batch.wake.acquire()  # each waiter is woken exactly once, never by a broadcast
        if not batch.done:  # this caller is the committer for everything queued so far
            self._lead()
        if batch.error is not None:
            raise batch.error
        return batch.results

    def _lead(self) -> None:
        with self._lock:
            group, self._pending = self._pending, []
        try:
            self._commit_group(group)
        finally:
            with self._lock:
                successor = self._pending[0] if self._pending else None
                if successor is None:
                    self._committing = False
                    self._idle.notify_all()
            for batch in group:
                batch.done = True
                batch.wake.release()
            if successor is not None:  # hand the committer role to the oldest waiting caller
                successor.wake.release()

    def _lookup(self, event_ids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(event_ids), _LOOKUP_CHUNK):
            chunk = event_ids[i : i + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT event_id, offset FROM events WHERE event_id IN ({marks})"
            found.update(self._conn.execute(sql, chunk))
        return found

    def _commit_group(self, group: list[_Batch]) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            ids = list({row[0] for batch in group for row in batch.rows if row[0] is not None})
            known = self._lookup(ids) if ids else {}
            offset = self._last
            inserts: list[tuple[int, str | None, int, bytes]] = []
            stored: list[Event] = []
            results: list[list[AppendResult]] = []
            for batch in group:
                out = []
                for ev, row in zip(batch.events, batch.rows, strict=True):
                    eid = row[0]
                    if eid is not None:
                        original = known.get(eid)
                        if original is not None:
                            out.append(AppendResult(original, True))
                            continue
                        known[eid] = offset + 1
                    offset += 1
                    inserts.append((offset, *row))
                    stored.append(ev)
                    out.append(AppendResult(offset, False))
                results.append(out)
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", inserts)
            conn.execute("COMMIT")
        except BaseException as e:  # nothing of the group is stored: every caller gets the error
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                log.error("the log's disk is full: a batch of %d events was refused", sum(len(b.rows) for b in group))
                e = LogUnavailable("the log's disk is full: nothing of this batch was stored; retry once space "
                                   "is freed (the same event_ids store each event once)", 507)
            for batch in group:
                batch.error = e
            if not isinstance(e, Exception):
                raise
            return
        self._last = offset
        if self._mark_fd is not None and stored:  # after the fsync, before anyone is acknowledged
            self._write_mark(self._mark_fd, offset)
        for batch, out in zip(group, results, strict=True):
            for ev, res in zip(batch.events, out, strict=True):
                ev.offset = res.offset
        if self._on_commit is not None and stored:
            try:
                self._on_commit(stored)
            except Exception:  # the events are durable; a failing subscriber must not fail the writers
                log.exception("on_commit callback failed for offsets %d..%d", stored[0].offset, offset)
        for batch, out in zip(group, results, strict=True):
            batch.results = out

    # -- reads ----------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._readers:
                return self._readers.pop()
        conn = _connect(self.path, self._synchronous)
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            if self._closed:
                conn.close()
            else:
                self._readers.append(conn)

    def _page(self, start: int, end: int | None, n: int, partition: int | None) -> list[tuple[int, bytes]]:
        conn = self._reader()
        try:
            sql = "SELECT offset, body FROM events WHERE offset >= ? AND offset <= ?"
            args: tuple[int, ...] = (start, _MAX_OFFSET if end is None else end)
            if partition is not None:  # a scan filtered on the unindexed column: fine for a catch-up read
                sql += " AND partition = ?"
                args += (partition,)
            return conn.execute(sql + " ORDER BY offset LIMIT ?", (*args, n)).fetchall()
        finally:
            self._release(conn)

    def read(self, from_offset: int = 0, limit: int | None = None, *,
             upto: int | None = None, partition: int | None = None) -> Iterator[Event]:
        """Stored events in offset order with from_offset <= offset (<= upto), at most `limit` of them;
        with `partition`, only that partition's (crc32(user_id) % partitions)."""
        start = max(from_offset, 0)
        left = limit
        while left is None or left > 0:
            n = READ_PAGE if left is None else min(READ_PAGE, left)
            page = self._page(start, upto, n, partition)
            yield from decode_rows(page)
            if len(page) < n:
                return
            start = page[-1][0] + 1
            if left is not None:
                left -= len(page)

    def last_offset(self) -> int:
        """Offset of the newest acknowledged event; -1 when the log is empty."""
        return self._last

    def count(self) -> int:
        """Number of stored events (offsets are dense from 0: nothing is ever deleted)."""
        return self._last + 1

    # -- history --------------------------------------------------------------------------------

    def exported_offset(self) -> int:
        """Last offset written to the Parquet history; -1 when nothing is exported."""
        return self._exported

    def export(self, history_dir: Path | str, upto_offset: int | None = None, *, min_events: int = 1,
               write: ChunkWriter | None = None) -> int:
        """Export (exported_offset, upto_offset] to Parquet by event day; idempotent; returns the new mark.

        Does nothing while fewer than `min_events` are pending: a periodic caller can pass a segment size
        so the history is a few large files instead of many small ones (the tail stays in `tail_arrow`).
        Each chunk is written by `write` (None: read and written here), then the mark moves.
        """
        history_dir = history_location(history_dir)  # a Path, or an object-store URI as it is
        write = write or writer_here(lambda a, b: self.read(a, upto=b), history_dir)
        with self._export_lock:
            upto = self._last if upto_offset is None else min(upto_offset, self._last)
            if upto - self._exported < max(min_events, 1):
                return self._exported
            if not self._history_clean:  # first export of this process, or one after a failed export
                remove_orphans(history_dir, self._exported)
                self._history_clean = True
            conn = _connect(self.path, "FULL")
            try:
                while self._exported < upto:
                    end = min(upto, self._exported + EXPORT_CHUNK)
                    write(self._exported + 1, end)
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'exported_offset'", (end,))
                    self._exported = end
            except BaseException:
                self._history_clean = False
                raise
            finally:
                conn.close()
            return self._exported

    def tail_arrow(self, from_offset: int) -> pa.Table:
        """Events with offset >= from_offset (call with exported_offset() + 1) as `EVENT_ARROW_SCHEMA`."""
        return events_to_arrow(list(self.read(from_offset)))

    # -- lifecycle ------------------------------------------------------------------------------

    def follow(self, from_offset: int) -> None:
        """Nothing to follow: this process is the log's one writer (on_commit sees every append)."""

    def wake(self) -> None:
        """Nothing to read: every acknowledged event was applied before its append returned."""

    def keep_catalog(self, catalog: Catalog) -> None:
        """The catalogue `upsert_items` writes to: this machine's, its only copy."""
        self._catalog = catalog

    def upsert_items(self, items: list[Item]) -> int:
        """Write the rows to the kept catalogue (durable before return)."""
        if self._catalog is None:
            raise RuntimeError("upsert_items before keep_catalog: no catalogue to write to")
        return self._catalog.upsert(items)

    def close(self) -> None:
        """Wait for the running commit and queued appends, then close the database (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._committing:
                self._idle.wait()
        self._conn.close()
        if self._mark_fd is not None:
            os.close(self._mark_fd)
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
