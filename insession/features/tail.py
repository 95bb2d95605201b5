"""Following `log.sqlite` from another process: the events the server appends, applied to a copy of the state.

The snapshot standby (`insession.features.standby`) and the feature reader (`insession.serve.reader`) each
keep their own `FeatureEngine` and bring it up to the server's through a read-only connection of the log
file (never a write lock; the server's commits go on). `LogTail.step` reads the next page after the engine's
applied offset and applies it, in offset order, so the copy equals the server's state at that offset (the
engine skips what it already holds: a restart from a snapshot is that snapshot plus the log after it).

The page bounds one hold of the copy's GIL: the standby reads `READ_PAGE` (5,000 events) at a time, as
nothing waits on it; a reader serving requests reads `READER_PAGE` (200 events, a few ms of applying), so a
request waits at most about that behind it.
"""

from __future__ import annotations

from pathlib import Path

from insession.features.engine import FeatureEngine
from insession.log.eventlog import READ_PAGE, connect_read_only, decode_rows

READER_PAGE = 200  # events per step of a process that serves requests meanwhile


class LogTail:
    """`LogTail(engine, log_path).step()`: apply the next page of the log after `engine.applied_offset`."""

    def __init__(self, engine: FeatureEngine, log_path: Path, page: int = READ_PAGE) -> None:
        self.engine = engine
        self.page = page
        self._conn = connect_read_only(log_path, handed_over=True)  # a reader catches up, then its follower goes on

    def step(self) -> int:
        """Apply the next page (at most `page` events); returns how many were read (fewer: the tail is reached)."""
        rows = self._conn.execute("SELECT offset, body FROM events WHERE offset > ? ORDER BY offset LIMIT ?",
                                  (self.engine.applied_offset, self.page)).fetchall()
        if rows:
            self.engine.update_many(decode_rows(rows))
        return len(rows)

    def last_offset(self) -> int:
        """The newest offset in the log file (-1: empty), whatever this copy has applied."""
        row = self._conn.execute("SELECT max(offset) FROM events").fetchone()
        return -1 if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        self._conn.close()
