"""The `Log` contract (insession/log/base.py), the same tests for both implementations: the embedded
SQLite log, and the JetStream log against a real three-node cluster on loopback (one per module)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_event
from nats_helpers import log_config, start_cluster

from insession.log import Log, LogConfig, open_log
from insession.log.catalog import Catalog
from insession.log.cluster import LocalCluster
from insession.log.export import events_to_arrow
from insession.schema import Event, Item, partition_of

P = 4
MakeLog = Callable[..., Log]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("nats"))
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "jetstream"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLog]:
    """Opens the log under test; every call of one test opens the same log (a reopen after close)."""
    config = LogConfig()
    if request.param == "jetstream":
        config = log_config(request.getfixturevalue("cluster"))
    opened: list[Log] = []

    def make(on_commit: Callable[[list[Event]], None] | None = None) -> Log:
        log = open_log(tmp_path / "data", config, partitions=P, on_commit=on_commit)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def _bodies(events: list[Event]) -> list[tuple]:
    return [(e.offset, e.event_id, e.user_id, e.item_id, e.ts, e.properties, e.category) for e in events]


def test_empty_log(make_log: MakeLog) -> None:
    log = make_log()
    assert (log.last_offset(), list(log.read()), log.exported_offset()) == (-1, [], -1)


def test_offsets_dense_from_zero_and_read_back(make_log: MakeLog) -> None:
    log = make_log()
    first = log.append([make_event(i, f"e{i}") for i in range(10)])
    second = log.append([make_event(i, f"e{i}") for i in range(10, 25)])
    assert [r.offset for r in first + second] == list(range(25))
    assert not any(r.duplicate for r in first + second)
    assert log.last_offset() == 24
    stored = list(log.read())
    expected = [make_event(i, f"e{i}") for i in range(25)]
    for off, e in enumerate(expected):
        e.offset = off
    assert _bodies(stored) == _bodies(expected)
    assert [e.offset for e in log.read(7, limit=3)] == [7, 8, 9]
    assert [e.offset for e in log.read(20)] == [20, 21, 22, 23, 24]
    assert [e.offset for e in log.read(3, upto=6)] == [3, 4, 5, 6]
    assert list(log.read(25)) == []


def test_single_event_append(make_log: MakeLog) -> None:
    log = make_log()
    ev = make_event(1, "only")
    assert [(r.offset, r.duplicate) for r in log.append([ev])] == [(0, False)]
    assert ev.offset == 0
    assert [(r.offset, r.duplicate) for r in log.append([make_event(1, "only")])] == [(0, True)]
    assert [(r.offset, r.duplicate) for r in log.append([make_event(2)])] == [(1, False)]  # no event_id


def test_idempotent_by_event_id_across_batches_and_inside_one(make_log: MakeLog) -> None:
    log = make_log()
    log.append([make_event(i, f"e{i}") for i in range(5)])
    # a retry mixing known ids, new ids, a repeat inside the batch and an event without id
    batch = [make_event(2, "e2"), make_event(5, "e5"), make_event(6, "e6"), make_event(5, "e5"),
             make_event(0, "e0"), make_event(7)]
    res = log.append(batch)
    assert [(r.offset, r.duplicate) for r in res] == [(2, True), (5, False), (6, False), (5, True), (0, True),
                                                      (7, False)]
    assert [e.offset for e in batch] == [2, 5, 6, 5, 0, 7]
    assert [e.event_id for e in log.read()] == ["e0", "e1", "e2", "e3", "e4", "e5", "e6", None]
    again = log.append([make_event(i, f"e{i}") for i in range(7)])  # a whole batch of known ids
    assert [(r.offset, r.duplicate) for r in again] == [(i, True) for i in range(7)]
    assert log.last_offset() == 7


ODD_IDS = ["x", " x", "x ", "x\r\n", "x\ny", "x y", "x%20y", "x%y", "é", "x:y", "Nats-Msg-Id: z", "\t"]


@pytest.mark.parametrize("batched", [True, False])
def test_event_ids_are_compared_exactly_whatever_their_characters(make_log: MakeLog, batched: bool) -> None:
    """Ids differing only in spaces, line breaks, escapes or non-ASCII characters are different events, and
    each retried is a duplicate of its own first copy: NATS headers are CRLF-framed text that the client
    trims, so a message id is an injective encoding of the event id, never the id itself."""
    log = make_log()
    events = [make_event(i, eid) for i, eid in enumerate(ODD_IDS)]
    first = log.append(events) if batched else [r for e in events for r in log.append([e])]
    assert [(r.offset, r.duplicate) for r in first] == [(i, False) for i in range(len(ODD_IDS))]
    again = log.append([make_event(i, eid) for i, eid in reversed(list(enumerate(ODD_IDS)))])
    assert [(r.offset, r.duplicate) for r in again] == [(i, True) for i in reversed(range(len(ODD_IDS)))]
    assert [e.event_id for e in log.read()] == ODD_IDS


def test_catalogue_upserts_go_through_the_log_and_the_last_one_wins(make_log: MakeLog, tmp_path: Path) -> None:
    log = make_log()
    catalog = Catalog(tmp_path / "catalog.sqlite")
    try:
        log.keep_catalog(catalog)
        assert log.upsert_items([Item("a", "c1", "s1"), Item("b", "c1", "s2", price=2.5)]) == 2
        assert log.upsert_items([Item("a", "c2", "s1", available=False)]) == 1
        assert catalog.get("a") == Item("a", "c2", "s1", available=False)
        assert catalog.get("b") == Item("b", "c1", "s2", price=2.5) and len(catalog) == 2
    finally:
        catalog.close()


def test_on_commit_gets_new_events_in_offset_order_before_append_returns(make_log: MakeLog) -> None:
    seen: list[Event] = []
    log = make_log(on_commit=seen.extend)
    for start in range(0, 30, 6):
        res = log.append([make_event(i, f"e{i}") for i in range(start, start + 6)])
        assert seen[-1].offset == res[-1].offset  # delivered before the ack: read-your-writes
    log.append([make_event(3, "e3"), make_event(4, "e4")])  # duplicates are not delivered again
    assert [e.offset for e in seen] == list(range(30))
    assert [e.event_id for e in seen] == [f"e{i}" for i in range(30)]


def test_concurrent_appends_get_distinct_dense_offsets(make_log: MakeLog) -> None:
    seen: list[Event] = []
    log = make_log(on_commit=seen.extend)
    results: dict[int, list[int]] = {}

    def writer(t: int) -> None:
        for b in range(5):
            batch = [make_event(t * 100 + b * 10 + i, f"t{t}-{b}-{i}") for i in range(1 + (t + b) % 4)]
            res = log.append(batch)
            results.setdefault(t, []).extend(r.offset for r in res)
            assert [r.offset for r in res] == list(range(res[0].offset, res[0].offset + len(batch)))  # contiguous

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    every = sorted(o for offs in results.values() for o in offs)
    assert every == list(range(len(every)))
    assert [e.offset for e in seen] == every
    assert [e.offset for e in log.read()] == every


def test_read_one_partition(make_log: MakeLog) -> None:
    log = make_log()
    log.append([make_event(i, f"e{i}") for i in range(60)])
    whole = list(log.read())
    for p in range(P):
        mine = [e.offset for e in whole if partition_of(e.user_id, P) == p]
        assert mine, "the seeded users cover every partition"
        assert [e.offset for e in log.read(partition=p)] == mine
        assert [e.offset for e in log.read(mine[2], partition=p)] == mine[2:]


def test_export_history_and_tail(make_log: MakeLog, tmp_path: Path) -> None:
    history = tmp_path / "history"
    log = make_log()
    log.append([make_event(i, f"e{i}", day=i % 3) for i in range(40)])
    assert log.export(history, upto_offset=24) == 24
    assert log.export(history, min_events=100) == 24  # fewer than min_events pending: nothing
    files = sorted(history.glob("day=*/part-*.parquet"))
    exported = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("offset")
    tail = log.tail_arrow(log.exported_offset() + 1)
    assert pa.concat_tables([exported, tail]).equals(events_to_arrow(list(log.read())))
    log.close()
    log = make_log()  # the mark is durable
    assert log.exported_offset() == 24
    assert log.export(history) == 39


def test_reopen_sees_every_acknowledged_event_and_continues(make_log: MakeLog) -> None:
    log = make_log()
    log.append([make_event(i, f"e{i}") for i in range(12)])
    log.close()
    seen: list[Event] = []
    log = make_log(on_commit=seen.extend)
    assert log.last_offset() == 11
    assert [e.event_id for e in log.read()] == [f"e{i}" for i in range(12)]
    assert [(r.offset, r.duplicate) for r in log.append([make_event(3, "e3"), make_event(12, "e12")])] == [
        (3, True), (12, False)]
    assert [e.offset for e in seen] == [12]  # on_commit: what was stored after this handle opened
