"""The event log: append/read/offsets, de-duplication, group commit under concurrent callers."""

from __future__ import annotations

import random
import sqlite3
import threading
import zlib
from contextlib import closing
from pathlib import Path

import pytest
from conftest import make_event

from insession.log.eventlog import EventLog
from insession.schema import Event, partition_of


def test_append_assigns_dense_offsets_and_reads_back(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    assert (log.last_offset(), log.count(), list(log.read())) == (-1, 0, [])
    batch = [make_event(i) for i in range(10)]
    results = log.append(batch)
    assert [r.offset for r in results] == list(range(10))
    assert not any(r.duplicate for r in results)
    assert [e.offset for e in batch] == list(range(10))
    more = [make_event(i) for i in range(10, 25)]
    assert [r.offset for r in log.append(more)] == list(range(10, 25))
    assert (log.last_offset(), log.count()) == (24, 25)
    stored = list(log.read())
    assert stored == batch + more  # every field round-trips, offsets included
    assert [e.offset for e in log.read(7, limit=3)] == [7, 8, 9]
    assert [e.offset for e in log.read(20)] == [20, 21, 22, 23, 24]
    assert list(log.read(25)) == []
    log.close()


def test_read_pages_through_large_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("insession.log.eventlog.READ_PAGE", 7)
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i) for i in range(50)])
        assert [e.offset for e in log.read()] == list(range(50))
        assert [e.offset for e in log.read(3, limit=15)] == list(range(3, 18))
        assert [e.offset for e in log.read(10, upto=24)] == list(range(10, 25))


def test_duplicates_across_retries_and_within_a_batch(tmp_path: Path) -> None:
    seen: list[Event] = []
    log = EventLog(tmp_path / "log.sqlite", on_commit=seen.extend)
    first = log.append([make_event(0, "a"), make_event(1, "b"), make_event(2)])
    assert [(r.offset, r.duplicate) for r in first] == [(0, False), (1, False), (2, False)]
    # a retry of "b", a new "c" twice in the same batch, an event without id (never de-duplicated)
    retry = [make_event(1, "b"), make_event(3, "c"), make_event(4, "c"), make_event(2)]
    res = log.append(retry)
    assert [(r.offset, r.duplicate) for r in res] == [(1, True), (3, False), (3, True), (4, False)]
    assert [e.offset for e in retry] == [1, 3, 3, 4]
    assert log.count() == 5
    assert [e.event_id for e in log.read()] == ["a", "b", None, "c", None]
    assert [e.offset for e in seen] == [0, 1, 2, 3, 4]  # duplicates are not passed to on_commit
    log.close()
    # and after a restart
    log = EventLog(tmp_path / "log.sqlite")
    again = log.append([make_event(0, "a"), make_event(5, "d")])
    assert [(r.offset, r.duplicate) for r in again] == [(0, True), (5, False)]
    log.close()


def test_partition_is_stable_crc32(tmp_path: Path) -> None:
    assert partition_of("u42", 16) == zlib.crc32(b"u42") % 16
    with EventLog(tmp_path / "log.sqlite", partitions=8) as log:
        log.append([make_event(i) for i in range(30)])
        users = {e.offset: e.user_id for e in log.read()}
    with closing(sqlite3.connect(tmp_path / "log.sqlite")) as conn:
        rows = conn.execute("SELECT offset, partition FROM events").fetchall()
    assert len(rows) == 30
    assert all(part == zlib.crc32(users[off].encode()) % 8 for off, part in rows)
    with pytest.raises(ValueError, match="has 8 partitions"):
        EventLog(tmp_path / "log.sqlite", partitions=16)


def test_reopen_keeps_offsets_going(tmp_path: Path) -> None:
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i) for i in range(5)])
    with EventLog(tmp_path / "log.sqlite") as log:
        assert (log.last_offset(), log.count()) == (4, 5)
        assert [r.offset for r in log.append([make_event(5)])] == [5]
        assert [e.offset for e in log.read()] == list(range(6))


def test_append_after_close_raises(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.append([make_event(0)])


def test_group_commit_under_concurrent_callers(tmp_path: Path) -> None:
    commits: list[list[int]] = []
    log = EventLog(tmp_path / "log.sqlite", on_commit=lambda evs: commits.append([e.offset for e in evs]))
    threads, batches_per_thread = 8, 25
    outcomes: dict[int, list[tuple[list[str], list[tuple[int, bool]]]]] = {t: [] for t in range(threads)}
    barrier = threading.Barrier(threads)

    def caller(t: int) -> None:
        rng = random.Random(t)
        barrier.wait()
        for b in range(batches_per_thread):
            if b and rng.random() < 0.2:  # retry an earlier batch of this caller
                ids = outcomes[t][rng.randrange(len(outcomes[t]))][0]
            else:
                ids = [f"t{t}b{b}e{j}" for j in range(rng.randint(1, 20))]
            res = log.append([make_event(j, eid) for j, eid in enumerate(ids)])
            outcomes[t].append((ids, [(r.offset, r.duplicate) for r in res]))

    workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stored = {e.event_id: e.offset for e in log.read()}
    n_unique = len({eid for outs in outcomes.values() for ids, _ in outs for eid in ids})
    assert len(stored) == log.count() == n_unique
    assert sorted(stored.values()) == list(range(n_unique))
    for outs in outcomes.values():
        for ids, res in outs:
            assert [off for off, _ in res] == [stored[eid] for eid in ids]
    # a first-time batch is never a duplicate; a retried one always is
    first_seen: set[str] = set()
    for t in range(threads):
        for ids, res in outcomes[t]:
            assert all(dup == (eid in first_seen) for eid, (_, dup) in zip(ids, res, strict=True))
            first_seen.update(ids)
    flat = [off for c in commits for off in c]
    assert flat == list(range(n_unique))  # each stored event exactly once, in offset order
    assert len(commits) < threads * batches_per_thread  # callers really were committed together
    log.close()


def test_a_failed_commit_stores_nothing_and_the_log_goes_on(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    log.append([make_event(0, "a")])

    def broken_lookup(ids: list[str]) -> dict[str, int]:  # fails inside the open transaction
        raise sqlite3.OperationalError("disk I/O error")

    log._lookup = broken_lookup  # type: ignore[method-assign]
    batch = [make_event(1, "b"), make_event(2, "c")]
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        log.append(batch)
    assert [e.offset for e in batch] == [-1, -1]
    assert (log.last_offset(), log.count()) == (0, 1)
    del log._lookup
    assert [r.offset for r in log.append(batch)] == [1, 2]  # offsets stay dense after the rollback
    assert [e.event_id for e in log.read()] == ["a", "b", "c"]
    log.close()


def test_a_failing_on_commit_does_not_fail_durable_appends(tmp_path: Path) -> None:
    def boom(events: list[Event]) -> None:
        raise RuntimeError("subscriber bug")

    with EventLog(tmp_path / "log.sqlite", on_commit=boom) as log:
        assert [r.offset for r in log.append([make_event(0), make_event(1)])] == [0, 1]
        assert log.count() == 2
