"""The embedded handle's guards: one process per data directory, a log that fell behind its state is
refused, background jobs survive their failures, and a full disk (a real 4 MiB tmpfs) refuses event writes
and catalogue upserts with 507, nothing half-stored, until space is freed."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import insession
from insession import embedded
from insession.embedded import DataDirError
from insession.log.export import write_day_partitions
from insession.schema import BatchRejected
from insession.serve.app import create_app
from insession.train.build import load_events

T0 = 1_700_000_000_000


def _events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"user_id": f"u{k % 7}", "item_id": f"i{k % 5}", "action": "view", "ts": T0 + k * 1000}
            for k in range(start, start + n)]


def test_one_process_per_data_directory(tmp_path: Path) -> None:
    first = insession.open(tmp_path, maintenance_interval_s=None)
    try:
        with pytest.raises(DataDirError, match=r"in use by pid \d+: one insession per data directory"):
            insession.open(tmp_path, maintenance_interval_s=None)
        first.insert("events", _events(3))  # the first one is unharmed
    finally:
        first.close()
    with insession.open(tmp_path, maintenance_interval_s=None) as again:
        assert again.log.last_offset() == 2


@pytest.mark.parametrize("loss", ["deleted", "older copy"])
def test_a_log_behind_its_feature_state_is_refused_and_nothing_is_deleted(tmp_path: Path, loss: str) -> None:
    data = tmp_path / "data"
    with insession.open(data, maintenance_interval_s=None) as db:
        db.insert("events", _events(10))
    shutil.copy(data / "log.sqlite", tmp_path / "old.sqlite")
    with insession.open(data, maintenance_interval_s=None) as db:
        db.insert("events", _events(10, start=10))
    history = sorted(p.name for p in (data / "history").rglob("*.parquet"))
    assert history
    for suffix in ("", "-wal", "-shm"):
        (data / f"log.sqlite{suffix}").unlink(missing_ok=True)
    if loss == "older copy":
        shutil.copy(tmp_path / "old.sqlite", data / "log.sqlite")
    with pytest.raises(DataDirError, match="the log was lost or restored from an older copy"):
        insession.open(data, maintenance_interval_s=None)
    assert sorted(p.name for p in (data / "history").rglob("*.parquet")) == history
    with pytest.raises(DataDirError):  # the refusal released the directory and changed nothing
        insession.open(data, maintenance_interval_s=None)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own: a disk that really fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_background_jobs_survive_a_full_disk_and_report_it(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot meets a really full disk: counted, reported without a path, retried with backoff, and
    written once space is freed; the maintenance thread never dies."""
    monkeypatch.setattr(embedded, "RETRY_MAX_S", 0.05)
    with insession.open(small_disk / "data", maintenance_interval_s=0.02, snapshot_interval_s=3600.0) as db:
        db.insert("events", _events(5))
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * shutil.disk_usage(small_disk).free)
        db.snapshot_interval_s = 0.0  # due now
        deadline = time.monotonic() + 60
        while db.job_failures["snapshot"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.job_failures["snapshot"] >= 3, "the snapshot job stopped retrying"
        assert db.job_errors["snapshot"] == "OSError: No space left on device"  # no path
        assert db.features.snapshot_offset == -1
        filler.unlink()  # space is freed
        while db.features.snapshot_offset != 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.features.snapshot_offset == 4
        while db.job_errors["snapshot"] is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.job_errors["snapshot"] is None
        assert db._maintenance is not None and db._maintenance.is_alive()


def test_the_background_export_runs_in_a_worker_that_reads_the_log_itself(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving process never reads the log back for the background export (that Python work stalled its
    requests): an export worker reads the range from log.sqlite and writes the day parts; the history holds
    every event once, as an export in this process writes it. A failing worker moves no mark and is
    reported like any failed job, and the next round exports what it could not."""
    monkeypatch.setattr(embedded, "EXPORT_MIN_EVENTS", 1)
    monkeypatch.setattr(embedded, "RETRY_MAX_S", 0.05)
    with insession.open(tmp_path / "data", maintenance_interval_s=0.05) as db:
        db.insert("events", _events(30))
        db.insert("events", _events(30, start=100_000))  # a second day
        expected = load_events(tmp_path / "data").sort_by("offset")  # read before the log is fenced off

        def not_here(*_: object, **__: object) -> None:
            raise AssertionError("the serving process read the log for the background export")

        monkeypatch.setattr(db.log, "read", not_here)
        deadline = time.monotonic() + 60
        while db.log.exported_offset() != 59 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.log.exported_offset() == 59 and db.job_failures["export"] == 0
        history = db.history_dir
        assert len(list(history.glob("day=*/part-*.parquet"))) == 2
        assert load_events(tmp_path / "data").sort_by("offset").equals(expected)
        shutil.rmtree(history)
        history.write_text("not a directory")  # the worker cannot write its parts
        db.insert("events", _events(5, start=60))
        while db.job_failures["export"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.job_failures["export"] >= 2 and db.job_errors["export"] == "ExportFailed"
        assert db.log.exported_offset() == 59
        history.unlink()
        history.mkdir()  # an empty history again: the next rounds write every event after the mark
        while db.log.exported_offset() != 64 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.log.exported_offset() == 64 and db.job_errors["export"] is None


def test_a_full_disk_refuses_writes_with_507_loses_nothing_and_recovers(small_disk: Path) -> None:
    data = small_disk / "data"
    acked: list[int] = []
    db = insession.open(data, maintenance_interval_s=None)
    try:
        db.insert("events", _events(10))  # the log and its WAL exist
        acked += list(range(10))
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 96 * 1024))
        refused = None
        for k in range(1, 500):
            rows = [{**row, "event_id": f"e{k}-{n}"} for n, row in enumerate(_events(100, start=k * 100))]
            try:
                acked += db.insert("events", rows).offsets
            except BatchRejected as e:
                refused = e
                break
        assert refused is not None, "the disk never filled up"
        assert refused.status == 507 and "disk is full" in str(refused)
        filler.unlink()  # space is freed: writes go on, a retry of the refused batch included
        acked += db.insert("events", rows).offsets
    finally:
        db.close()
    with insession.open(data, maintenance_interval_s=None) as again:
        stored = [e.offset for e in again.log.read()]
    assert stored == sorted(acked) and len(set(stored)) == len(stored)  # every ack present once, nothing else


def _history_with_parts(data: Path) -> list[Path]:
    with insession.open(data, maintenance_interval_s=None) as db:
        for k in range(4):  # four exports: several parts per day
            db.insert("events", [{**row, "ts": T0 + k * 86_400_000 + n} for n, row in enumerate(_events(25))])
            db.export()
    return sorted((data / "history").glob("day=*/*.parquet"))


def _count(data: Path) -> tuple[int, object]:
    with insession.open(data, maintenance_interval_s=None) as db:
        return db.select("SELECT count(*) FROM events").rows[0][0], db.history_check


@pytest.mark.parametrize("damage", ["missing", "truncated", "same size, one byte changed", "stray copy"])
def test_a_damaged_history_is_rebuilt_or_set_aside_and_counts_stay_exact(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    parts = _history_with_parts(data)
    assert len(parts) >= 4
    victim = parts[1]
    body = victim.read_bytes()
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(body[: len(body) // 2])
    elif damage == "same size, one byte changed":
        victim.write_bytes(body[:100] + bytes([body[100] ^ 0xFF]) + body[101:])
    else:
        shutil.copy(victim, victim.with_name("part-copy.parquet"))
    count, check = _count(data)
    assert count == 100  # every acknowledged event exactly once, as before the damage
    assert (check.rebuilt, check.quarantined) == {
        "missing": (1, 0), "truncated": (1, 1), "same size, one byte changed": (1, 1), "stray copy": (0, 1),
    }[damage]
    assert victim.read_bytes() == body or damage == "stray copy"
    count, check = _count(data)  # nothing left to mend on the next start
    assert (count, check.rebuilt, check.quarantined) == (100, 0, 0)


def test_training_reads_the_history_as_analytics_does_never_a_quarantined_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    parts = _history_with_parts(data)
    shutil.copy(parts[1], parts[1].with_name("part-copy.parquet"))  # a stray copy: set aside at the next start
    count, check = _count(data)
    assert check.quarantined == 1 and list((data / "history" / "_quarantine").rglob("*.parquet"))
    assert load_events(data).num_rows == count == 100


def test_training_reads_the_log_after_its_export_mark_too_every_event_once(tmp_path: Path) -> None:
    """What analytics counts, training reads: the history, then the embedded log after its export mark
    (here also a history part beyond the mark, as a crashed export leaves one: counted once)."""
    data = tmp_path / "data"
    _history_with_parts(data)
    with insession.open(data, maintenance_interval_s=None) as db:
        db.insert("events", [{**row, "event_id": f"t{n}"} for n, row in enumerate(_events(10, start=500))])
        write_day_partitions(list(db.log.read(100, upto=104)), data / "history")  # beyond the mark (99)
        count = db.select("SELECT count(*) FROM events").rows[0][0]
        events = load_events(data)  # beside the server holding the directory: the log is read read-only
    assert events.num_rows == count == 110
    assert sorted(events["offset"].to_pylist()) == list(range(110))


# Catalogue upserts on a full disk: refused with 507 (the handle and `PUT /v1/items`), nothing of the refused
# batch stored (neither in the catalogue the events are enriched from nor on disk), and the same batch is
# stored once space is freed, without a restart.

def _items(batch: int, n: int = 50) -> list[dict[str, object]]:
    return [{"item_id": f"b{batch}-{j}", "category": f"c{j % 3}", "subcategory": f"s{j % 7}",
             "name": f"item {j} of batch {batch} " + "x" * 900} for j in range(n)]


def _stored(data: Path) -> set[str]:
    with insession.open(data, maintenance_interval_s=None) as db:
        return {row["item_id"] for row in db.catalog.to_arrow().to_pylist()}


def test_a_full_disk_refuses_item_upserts_with_507_stores_nothing_and_recovers(small_disk: Path) -> None:
    data = small_disk / "data"
    acked: set[str] = set()
    db = insession.open(data, maintenance_interval_s=None)
    try:
        with TestClient(create_app(handle=db), raise_server_exceptions=False) as http:  # what a client sees
            assert http.put("/v1/items", json=_items(0)).status_code == 200  # the catalogue and its WAL exist
            acked |= {row["item_id"] for row in _items(0)}
            filler = small_disk / "filler"
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 96 * 1024))
            refused = None
            for batch in range(1, 200):
                answer = http.put("/v1/items", json=_items(batch))
                if answer.status_code != 200:
                    refused = answer
                    break
                acked |= {row["item_id"] for row in _items(batch)}
            assert refused is not None, "the disk never filled up"
            assert refused.status_code == 507, refused.text
            assert "disk is full" in refused.json()["error"] and str(small_disk) not in refused.text
            assert db.catalog.get(f"b{batch}-0") is None  # events are not enriched from a refused batch
            with pytest.raises(BatchRejected) as again:  # the handle's own verb says the same
                db.insert("items", _items(batch))
            assert again.value.status == 507
            assert all(db.catalog.get(row["item_id"]) is None for row in _items(batch))
            filler.unlink()  # space is freed: the same batch goes through, no restart
            assert http.put("/v1/items", json=_items(batch)).status_code == 200
            acked |= {row["item_id"] for row in _items(batch)}
            assert db.catalog.get(f"b{batch}-0") is not None
    finally:
        db.close()
    assert _stored(data) == acked  # every acknowledged item on disk, nothing of a refused attempt


def test_training_reads_a_data_dir_before_its_first_export(tmp_path: Path) -> None:
    """No history/ yet (nothing exported): every acknowledged event is in the log, and training reads it."""
    data = tmp_path / "data"
    with insession.open(data, maintenance_interval_s=None) as db:
        db.insert("events", _events(12))
        assert not (data / "history").exists()
        events = load_events(data)
    assert sorted(events["offset"].to_pylist()) == list(range(12))
