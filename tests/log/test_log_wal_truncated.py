"""A truncated `log.sqlite-wal`: after a crash the WAL holds every transaction since the last checkpoint,
and cutting it (a bad copy, a restore, an operator's `: > log.sqlite-wal`) makes SQLite recover silently
what comes before the cut. The handle must then refuse to start whenever acknowledged events are missing
(found by the log's acknowledged mark, the feature snapshot or the Parquet history), change nothing on
disk when it refuses, and lose nothing that was checkpointed into log.sqlite.

A writer process (killed_handle.py) acknowledges events through the embedded handle and is SIGKILLed,
so the WAL is exactly what a crash leaves."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import msgspec
import pytest
from killed_handle import BATCH, rows

import insession
from insession.embedded import DataDirError
from insession.schema import Event

WRITER = Path(__file__).with_name("killed_handle.py")
CHECKPOINTED = 30  # events 0..29: stored by a handle that stopped cleanly (checkpointed into log.sqlite)
IN_WAL = 100  # events 30..129: acknowledged by the killed writer, in the WAL only unless checkpointed
LAST = CHECKPOINTED + IN_WAL - 1


def _kill_after_writing(data: Path, witness: str) -> list[int]:
    """Run the writer to its SIGKILL; returns the last offset of each batch it acknowledged."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(WRITER), str(data), str(CHECKPOINTED), str(IN_WAL), witness],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert done.stdout.endswith("witnessed\n"), done.stderr[-2000:]
    return [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("acked")]


def _stored(data: Path) -> list[tuple[int, int]]:
    """(offset, properties.k) of every event log.sqlite holds, read with SQLite alone."""
    with closing(sqlite3.connect(data / "log.sqlite")) as conn:
        found = conn.execute("SELECT offset, body FROM events ORDER BY offset").fetchall()
    return [(off, msgspec.msgpack.decode(body, type=Event).properties["k"]) for off, body in found]


def _files(data: Path) -> dict[str, str]:
    """Digest of every file under features/ and history/: what a refusal must leave as it was."""
    return {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("features", "history") for p in sorted((data / sub).rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    with insession.open(data, maintenance_interval_s=None) as db:
        db.insert("events", rows(0, CHECKPOINTED))
    assert not (data / "log.sqlite-wal").exists()  # a clean stop leaves everything in log.sqlite
    return data


@pytest.mark.parametrize(("witness", "cut", "says"), [
    ("none", "emptied", f"events up to offset {LAST} were acknowledged"),
    ("none", "cut in half", f"events up to offset {LAST} were acknowledged"),
    ("snapshot", "emptied", f"the feature snapshot holds events up to offset {LAST}"),
    ("history", "emptied", f"the Parquet history holds events up to offset {LAST}"),
])
def test_a_truncated_wal_missing_acknowledged_events_is_refused_and_nothing_changes(
        data: Path, witness: str, cut: str, says: str) -> None:
    acked = _kill_after_writing(data, witness)
    assert acked == list(range(CHECKPOINTED + BATCH - 1, LAST + 1, BATCH))
    wal = data / "log.sqlite-wal"
    size = wal.stat().st_size
    assert size > 0, "the killed writer left no WAL"
    if witness != "none":  # the mark lost as well (restored with an older log): the state's own records
        (data / "log.sqlite-acked").unlink()
    os.truncate(wal, 0 if cut == "emptied" else size // 2)
    before = _files(data)

    with pytest.raises(DataDirError, match="the log was lost or restored from an older copy") as refused:
        insession.open(data, maintenance_interval_s=None)
    assert says in str(refused.value)
    assert str(data) not in str(refused.value).removeprefix(f"{data}: ")  # one path: the directory named
    with pytest.raises(DataDirError):  # refused again: the first refusal repaired nothing by deleting
        insession.open(data, maintenance_interval_s=None)
    assert _files(data) == before

    stored = _stored(data)  # what SQLite recovered: the checkpointed events, then whole transactions
    assert stored[:CHECKPOINTED] == [(k, k) for k in range(CHECKPOINTED)]
    assert stored == [(k, k) for k in range(len(stored))]
    end = len(stored) - 1
    assert end == CHECKPOINTED - 1 if cut == "emptied" else end in acked[:-1]
    assert f"log.sqlite ends at offset {end} " in str(refused.value)


def test_a_wal_cut_after_its_checkpoint_loses_nothing_and_the_handle_serves(data: Path) -> None:
    _kill_after_writing(data, "checkpoint")
    os.truncate(data / "log.sqlite-wal", 0)
    with insession.open(data, maintenance_interval_s=None) as db:
        assert [(e.offset, e.properties["k"]) for e in db.log.read()] == [(k, k) for k in range(LAST + 1)]
        assert db.select("SELECT count(*) FROM events").rows == [[LAST + 1]]
        assert db.lag()["log_offset"] == LAST
        assert db.insert("events", rows(LAST + 1, 1)).offsets == [LAST + 1]  # offsets go on, none reused
