"""Export of the log to day-partitioned Parquet: readable, atomic, idempotent, complete with tail_arrow."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import T0, make_event

from insession.log.eventlog import EventLog
from insession.log.export import (
    ARROW_CHUNK,
    day_of,
    events_from_arrow,
    events_to_arrow,
    load_manifest,
    write_parquet_atomic,
)
from insession.schema import EVENT_ARROW_SCHEMA


def _history(history: Path) -> pa.Table:
    files = sorted(history.glob("day=*/part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("offset") if files else \
        EVENT_ARROW_SCHEMA.empty_table()


def test_export_by_day_readable_idempotent_and_complete_with_tail(tmp_path: Path) -> None:
    history = tmp_path / "history"
    log = EventLog(tmp_path / "log.sqlite")
    events = [make_event(i, f"e{i}", day=i % 3) for i in range(40)]
    log.append(events)
    assert log.exported_offset() == -1
    assert log.export(history, upto_offset=24) == 24
    assert log.exported_offset() == 24
    days = sorted(p.name for p in history.iterdir())
    assert days == ["_manifest.json", *(f"day={day_of(T0 + d * 86_400_000)}" for d in range(3))]
    for f in history.glob("day=*/*.parquet"):  # every file holds only its own day, in offset order
        t = pq.read_table(f)
        assert t.schema.equals(EVENT_ARROW_SCHEMA)
        assert {day_of(ts) for ts in t.column("ts").to_pylist()} == {f.parent.name.removeprefix("day=")}
        first, last = (int(x) for x in f.stem.removeprefix("part-").split("-"))
        assert t.column("offset").to_pylist() == sorted(t.column("offset").to_pylist())
        assert (first, last) == (t.column("offset")[0].as_py(), t.column("offset")[-1].as_py())
    files_before = sorted(history.rglob("*.parquet"))
    assert log.export(history, upto_offset=24) == 24  # idempotent: nothing new, nothing rewritten
    assert log.export(history, upto_offset=10) == 24
    assert sorted(history.rglob("*.parquet")) == files_before
    tail = log.tail_arrow(log.exported_offset() + 1)
    whole = pa.concat_tables([_history(history), tail])
    assert whole.column("offset").to_pylist() == list(range(40))
    assert whole.equals(events_to_arrow(list(log.read())))
    assert log.export(history) == 39
    assert log.tail_arrow(log.exported_offset() + 1).num_rows == 0
    assert _history(history).equals(events_to_arrow(list(log.read())))
    # duckdb reads the hive-partitioned history, properties as JSON text
    rows = duckdb.sql(
        f"SELECT count(*), count(DISTINCT \"offset\"), max(day)::VARCHAR "
        f"FROM read_parquet('{history}/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert rows == [(40, 40, day_of(T0 + 2 * 86_400_000))]
    props = dict(duckdb.sql(
        f"SELECT event_id, properties FROM read_parquet('{history}/*/*.parquet') WHERE properties IS NOT NULL"
    ).fetchall())
    assert json.loads(props["e4"]) == {"i": 4, "q": "shoes"}
    log.close()
    with EventLog(tmp_path / "log.sqlite") as log:  # the exported mark is durable
        assert log.exported_offset() == 39


def test_export_cleans_files_of_a_crashed_export(tmp_path: Path) -> None:
    history = tmp_path / "history"
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i, day=0) for i in range(10)])
        log.export(history, upto_offset=3)
        # a crash after the rename but before the mark was recorded leaves this behind:
        orphan = history / f"day={day_of(T0)}" / "part-4-6.parquet"
        pq.write_table(events_to_arrow(list(log.read(4, upto=6))), orphan)
        (orphan.parent / ".part-4-9.parquet.tmp").write_bytes(b"half a file")
    with EventLog(tmp_path / "log.sqlite") as log:  # the restart after that crash
        assert log.export(history) == 9
        assert sorted(p.name for p in history.rglob("*")) == ["_manifest.json", f"day={day_of(T0)}",
                                                              "part-0-3.parquet", "part-4-9.parquet"]
        assert sorted(load_manifest(history)) == [f"day={day_of(T0)}/part-0-3.parquet",
                                                  f"day={day_of(T0)}/part-4-9.parquet"]
        offsets = ds.dataset(history, format="parquet").to_table().column("offset").to_pylist()
        assert sorted(offsets) == list(range(10))


def test_a_failed_export_is_cleaned_up_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = tmp_path / "history"
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i, day=i % 2) for i in range(10)])
        log.export(history)  # nothing to clean afterwards in this process...
        log.append([make_event(i, day=i % 2) for i in range(10, 20)])
        written: list[Path] = []

        def one_day_then_fail(table: pa.Table, path: Path) -> None:  # ...until an export fails half-way
            if written:
                raise OSError("disk full")
            write_parquet_atomic(table, path)
            written.append(path)

        monkeypatch.setattr("insession.log.export.write_parquet_atomic", one_day_then_fail)
        with pytest.raises(OSError, match="disk full"):
            log.export(history)
        assert log.exported_offset() == 9 and written and written[0].exists()
        monkeypatch.undo()
        assert log.export(history) == 19
        assert sorted(_history(history).column("offset").to_pylist()) == list(range(20))


def test_export_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("insession.log.eventlog.EXPORT_CHUNK", 7)
    history = tmp_path / "history"
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i) for i in range(20)])
        assert log.export(history) == 19
        assert sorted(p.name for p in history.rglob("*.parquet")) == sorted(
            ["part-0-6.parquet", "part-7-13.parquet", "part-14-19.parquet"])
        assert _history(history).column("offset").to_pylist() == list(range(20))


def test_export_waits_for_a_segment_of_min_events(tmp_path: Path) -> None:
    history = tmp_path / "history"
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i) for i in range(5)])
        assert log.export(history, min_events=10) == -1
        assert not history.exists()
        log.append([make_event(i) for i in range(5, 10)])
        assert log.export(history, min_events=10) == 9
        assert _history(history).num_rows == 10


def test_events_from_arrow_inverts_events_to_arrow() -> None:
    evs = [make_event(n) for n in range(5)]
    for n, e in enumerate(evs):
        e.offset, e.properties, e.brand, e.price, e.price_band = n, {"q": "milk", "n": n}, "acme", 12.5, "10-25"
    evs[2].properties = evs[2].brand = evs[2].price = evs[2].price_band = None
    assert events_from_arrow(events_to_arrow(evs)) == evs


def test_events_convert_to_arrow_in_chunks_and_back_unchanged() -> None:
    events = [make_event(i, f"c{i}") for i in range(2 * ARROW_CHUNK + 5)]
    for i, e in enumerate(events):
        e.offset = i
    table = events_to_arrow(events)
    assert table.num_rows == len(events) and table.column("offset").num_chunks == 3
    assert events_from_arrow(table) == events
