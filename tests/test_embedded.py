"""The embedded handle's guards: one process per data directory, a log that fell behind its state is
refused, and background jobs survive their failures."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import insession
from insession import embedded
from insession.embedded import DataDirError

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


def test_background_jobs_survive_failures_and_report_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "RETRY_MAX_S", 0.05)
    with insession.open(tmp_path, maintenance_interval_s=0.02, snapshot_interval_s=0.0) as db:
        real = db.features.snapshot

        def full_disk() -> None:
            raise OSError(28, "No space left on device", str(tmp_path / "features" / "secret"))

        monkeypatch.setattr(db.features, "snapshot", full_disk)
        db.insert("events", _events(5))
        deadline = time.monotonic() + 30
        while db.job_failures["snapshot"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.job_failures["snapshot"] >= 3, "the snapshot job stopped retrying"
        assert db.job_errors["snapshot"] == "OSError: No space left on device"  # no path
        monkeypatch.setattr(db.features, "snapshot", real)  # space is freed
        while db.features.snapshot_offset != 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.features.snapshot_offset == 4
        while db.job_errors["snapshot"] is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert db.job_errors["snapshot"] is None
        assert db._maintenance is not None and db._maintenance.is_alive()
