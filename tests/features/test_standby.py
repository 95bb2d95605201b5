"""The snapshot standby (`insession.features.standby`): a second process writes the snapshots, and a restart
from them equals never stopping; a killed standby is counted and replaced, the server writing meanwhile;
new declarations reach the standby's snapshots."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
from features_helpers import key_of, until

import insession
from insession.embedded import DataDirError, Insession
from insession.features import FeatureEngine
from insession.log import LogConfig
from insession.serve.metrics import Metrics

T0 = 1_700_000_000_000
USERS = [f"u{u}" for u in range(25)]
ITEMS = [f"i{i}" for i in range(40)]


def _events(n: int, seed: int, start_ms: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"user_id": rng.choice(USERS), "item_id": rng.choice(ITEMS),
             "action": rng.choice(["view", "view", "view", "add_to_cart", "purchase"]),
             "ts": start_ms + j * 20_000 + rng.randrange(-90_000, 1000)}  # some late, a few beyond the lateness
            for j in range(n)]


def _reads(engine: FeatureEngine) -> dict[tuple[str, str, str], Any]:
    return {(f.name, u, i): engine.read(f.name, key_of(f.entity, {"user_id": u, "item_id": i}))
            for f in engine.registry for u in USERS[:8] for i in ITEMS[:8]}


def _open(path: Path) -> Insession:
    db = insession.open(path, maintenance_interval_s=0.05, snapshot_interval_s=0.3, snapshot_writer="standby")
    if not len(db.catalog):
        db.insert("items", [{"item_id": i, "category": f"c{n % 4}", "brand": f"b{n % 3}", "price": 2.0 * n}
                            for n, i in enumerate(ITEMS)])
    return db


def _caught_up(db: Insession) -> bool:
    return db.features.written_snapshot_offset() == db.log.last_offset()


def _restarted_equals_running(db: Insession) -> None:
    """A restart from the snapshot CURRENT names (plus the log after it, nothing here) equals the live state."""
    reopened = FeatureEngine.open(db.data_dir / "features", partitions=db.features.partitions)
    assert reopened.applied_offset == db.log.last_offset()
    assert not reopened.unbuilt
    assert _reads(reopened) == _reads(db.features)


def test_the_standby_writes_every_snapshot_and_a_restart_from_them_equals_never_stopping(tmp_path: Path) -> None:
    with _open(tmp_path / "data") as db:
        for batch in range(3):
            db.insert("events", _events(200, seed=batch, start_ms=T0 + batch * 4_000_000))
            until("the standby's snapshot holds every event", lambda: _caught_up(db))
            _restarted_equals_running(db)
        assert db.features.snapshots_written == 0  # the serving process wrote none of them
        assert db.standby is not None and db.standby.starts == 1 and db.standby.running()
        assert db.standby.failures == 0
        # the server reports the standby's snapshots as its own (its maintenance reads CURRENT every 50 ms)
        until("the server's snapshot offset follows the standby's", lambda: db.lag()["snapshot_lag"] == 0)
    assert db.standby.proc is None or db.standby.proc.poll() is not None  # stopped at close


def test_a_killed_standby_is_counted_the_server_writes_meanwhile_and_it_comes_back(tmp_path: Path) -> None:
    with _open(tmp_path / "data") as db:
        db.insert("events", _events(100, seed=1, start_ms=T0))
        until("the standby's snapshot", lambda: _caught_up(db))
        assert db.standby is not None and db.standby.proc is not None
        db.standby.proc.send_signal(signal.SIGKILL)
        db.insert("events", _events(100, seed=2, start_ms=T0 + 3_000_000))
        until("the server's own snapshot", lambda: db.features.snapshots_written >= 1 and _caught_up(db))
        assert db.standby.failures == 1
        until("the standby started again", lambda: db.standby is not None and db.standby.starts == 2)
        written = db.features.snapshots_written
        db.insert("events", _events(100, seed=3, start_ms=T0 + 6_000_000))
        until("the new standby's snapshot", lambda: _caught_up(db))
        assert db.features.snapshots_written == written  # the standby wrote it
        _restarted_equals_running(db)
        metrics = Metrics()
        metrics.bind(db)
        sample = metrics.registry.get_sample_value
        assert sample("insession_snapshot_standby_running") == 1
        assert sample("insession_snapshot_standby_starts_total") == 2
        assert sample("insession_background_failures_total", {"job": "standby"}) == 1


def test_a_feature_declared_while_the_standby_runs_reaches_its_snapshots(tmp_path: Path) -> None:
    with _open(tmp_path / "data") as db:
        db.insert("events", _events(200, seed=4, start_ms=T0))
        until("the standby's snapshot", lambda: _caught_up(db))
        db.execute("CREATE FEATURE brands_1d AS SELECT user_id, distinct_topk(brand, 2) FROM events "
                   "WHERE ts > now() - INTERVAL '1' DAY GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)")
        assert db.feature_manager.wait("brands_1d") == "serving"
        until("the server's snapshot at the install", lambda: db.features.snapshots_written >= 1)
        # the standby exits at each change of the declarations and is started again; until it runs on the new
        # ones the server writes the snapshots, so insert until one holding everything is not the server's
        for attempt in range(10):
            written = db.features.snapshots_written
            db.insert("events", _events(50, seed=5 + attempt, start_ms=T0 + (5 + attempt) * 1_000_000))
            until("a snapshot of every event", lambda: _caught_up(db))
            if db.features.snapshots_written == written:
                break
        else:
            pytest.fail("no snapshot written by the standby after the new declaration")
        assert db.standby is not None and db.standby.starts >= 2
        assert db.standby.failures == 0  # asked to be restarted: not a failure
        _restarted_equals_running(db)
        assert "brands_1d" in db.features.registry


def test_the_standby_is_refused_with_a_replicated_log_and_a_typo_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="needs the embedded log"):
        insession.open(tmp_path / "a", log_config=LogConfig(url="nats://127.0.0.1:4222"), snapshot_writer="standby")
    with pytest.raises(ValueError, match="snapshot_writer must be one of server, standby"):
        insession.open(tmp_path / "b", snapshot_writer="stanby")
