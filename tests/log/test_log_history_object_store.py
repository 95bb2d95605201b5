"""A Parquet history in an object store (`[log] history = "s3://bucket/prefix?..."`), against a real
S3-compatible server on loopback (moto's server, a test dependency, in a child process) through pyarrow.fs:
exports land as whole objects plus a manifest, the analytics lane (DuckDB in worker processes, which
cannot reach S3 itself) counts history + tail once, `verify_history` removes, quarantines and rebuilds
there as on a disk, and the trainer reads a shared S3 history plus a JetStream stream's tail once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pyarrow.fs as pafs
import pytest
from conftest import make_event
from nats_helpers import log_config, start_cluster, wait_for

import insession
from insession.embedded import DataDirError
from insession.features import FeatureEngine, FeatureRegistry, backfill, default_registry
from insession.features.backfill import JOB_FILE, PROGRESS_FILE, Job
from insession.log import EventLog, LogConfig
from insession.log.cluster import LocalCluster, free_ports
from insession.log.export import HistoryStore, load_manifest, verify_history, write_day_partitions
from insession.log.jetstream import JetStreamLog
from insession.train.build import load_events, read_cluster_events

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "insession-test", "AWS_SECRET_ACCESS_KEY": "insession-test",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields the query string that points pyarrow at it."""
    (port,) = free_ports(1)
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # pyarrow (and the analytics workers, which inherit it) read them
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.05)
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        proc.kill()
        proc.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def history(s3: str) -> str:
    """A fresh bucket's history URI."""
    bucket = f"h{uuid.uuid4().hex[:12]}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{s3}&allow_bucket_creation=true")
    fs.create_dir(bucket)
    return f"s3://{bucket}/insession/history?{s3}"


def _objects(uri: str) -> dict[str, int]:
    store = HistoryStore(uri)
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    return {i.path[len(store.root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _offsets(uri: str) -> list[int]:
    """Every offset in the history's part objects, sorted, repeats kept."""
    store = HistoryStore(uri)
    return sorted(o for rel in store.parts() for o in store.dataset([rel]).to_table()["offset"].to_pylist())


def _events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"user_id": f"u{i % 7}", "item_id": f"i{i % 11}", "action": "view", "ts": 1_763_800_000_000 + i * 3_600_000,
             "event_id": f"x{i}"} for i in range(start, start + n)]


def test_an_embedded_node_exports_to_s3_and_analytics_counts_history_plus_tail_once(history: str,
                                                                                    tmp_path: Path) -> None:
    data = tmp_path / "data"
    with insession.open(data, maintenance_interval_s=None, log_config=LogConfig(history=history)) as db:
        db.insert("items", [{"item_id": f"i{j}", "category": "c", "subcategory": "s"} for j in range(11)])
        db.insert("events", _events(300))
        assert db.export() == 299
        db.insert("events", _events(100, start=300))  # the tail, not yet exported
        rows = db.select('SELECT count(*), count(DISTINCT "offset"), min("offset"), max("offset") FROM events').rows
        assert rows == [[400, 400, 0, 399]]
    assert not (data / "history").exists()  # nothing on the local disk
    objects = _objects(history)
    parts = sorted(k for k in objects if k.startswith("day="))
    assert parts and all(k.endswith(".parquet") for k in parts) and "_manifest.json" in objects
    assert sorted(load_manifest(history)) == parts  # the close exported the tail too
    assert _offsets(history) == list(range(400))
    assert load_events(history)["offset"].to_pylist() == list(range(400))  # the trainer reads it without a log
    with insession.open(data, maintenance_interval_s=None, log_config=LogConfig(history=history)) as db:
        assert db.history_check.parts == len(parts) and db.history_check.quarantined == 0
        assert db.select("SELECT count(*) FROM events").rows == [[400]]


def test_verify_history_on_s3_removes_quarantines_and_rebuilds(history: str, tmp_path: Path) -> None:
    store = HistoryStore(history)
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i, f"v{i}", day=i % 3) for i in range(90)])
        assert log.export(history, upto_offset=59) == 59
        write_day_partitions(list(log.read(60, upto=74)), history)  # an export that died before its mark
        parts = sorted(rel for rel, part in load_manifest(history).items() if part.last <= 59)  # committed
        assert len(parts) == 3  # one per event day
        victim, damaged = parts[0], parts[1]
        body = store.read_bytes(victim)
        assert body is not None
        store.delete(victim)  # lost
        store.write_bytes(damaged, (store.read_bytes(damaged) or b"")[:100])  # truncated
        day = victim.split("/")[0]
        store.write_bytes(f"{day}/part-0-0.parquet", body)  # a stray copy the manifest does not list
        check = verify_history(history, 59, lambda first, last: log.read(first, upto=last))
        assert (check.rebuilt, check.quarantined) == (2, 2)
        assert _offsets(history) == list(range(60))  # the dead export's parts beyond the mark are gone
        assert sorted(k for k in _objects(history) if k.startswith("_quarantine/")) == sorted(
            [f"_quarantine/{day}/part-0-0.parquet", f"_quarantine/{damaged}"])
        assert store.read_bytes(victim) == body  # rebuilt from the log byte for byte
        assert log.export(history) == 89
        assert _offsets(history) == list(range(90))
        assert verify_history(history, 89, lambda first, last: log.read(first, upto=last)).rebuilt == 0


def test_a_bad_history_uri_or_a_missing_bucket_refuses_to_start(s3: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"history 's3://b/p\?bogus=1' is not a filesystem URI pyarrow can open"):
        HistoryStore("s3://b/p?bogus=1")
    with pytest.raises(DataDirError, match=r"\[log\] history: history 's3://b/p\?bogus=1' is not a filesystem URI"):
        insession.open(tmp_path / "a", maintenance_interval_s=None, log_config=LogConfig(history="s3://b/p?bogus=1"))
    missing = f"s3://nobucket-{uuid.uuid4().hex[:8]}/history?{s3}"
    with pytest.raises(DataDirError, match=r"bucket 'nobucket-[0-9a-f]+' does not exist; create it"):
        insession.open(tmp_path / "b", maintenance_interval_s=None, log_config=LogConfig(history=missing))
    assert HistoryStore("s3://KEY:SECRET@b/p?region=x").__str__() == "s3://***@b/p?region=x"  # never in a message


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("nats"))
    yield c
    c.stop()


def test_a_shared_s3_history_and_the_streams_tail_are_every_event_once(cluster: LocalCluster, history: str,
                                                                       tmp_path: Path) -> None:
    """The lease holder exports into S3, dies leaving parts beyond its mark; the trainer and another node's
    analytics lane each count every acknowledged event once."""
    cfg = msgspec.structs.replace(log_config(cluster), history=history, export_lease_s=8)
    a = JetStreamLog(cfg, tmp_path / "a", partitions=4)
    try:
        wait_for("node a holding the export lease", a.exporting)
        a.append([make_event(k, f"s{k}", day=k % 2) for k in range(200)])
        assert a.export(history, upto_offset=119) == 119
        a.append([make_event(k, f"s{k}", day=k % 2) for k in range(200, 260)])
        write_day_partitions(list(a.read(120, upto=149)), history)  # written, never committed
        stored = list(a.read(0))
    finally:
        a.close()
    got = read_cluster_events(history, cfg)
    assert (got.mark, got.stream_end) == (119, 259)
    assert got.events["offset"].to_pylist() == list(range(260))
    assert got.events["event_id"].to_pylist() == [e.event_id for e in stored]
    with insession.open(tmp_path / "b", maintenance_interval_s=None, partitions=4, log_config=cfg) as db:
        assert db.log.exported_offset() == 119  # the mark, read from the lease bucket
        rows = db.select('SELECT count(*), count(DISTINCT "offset") FROM events').rows
        assert rows == [[260, 260]]
        wait_for("node b taking over the export lease", db.log.exporting)  # a released it at close
        assert db.export() == 259  # its takeover first removes a's uncommitted parts
        assert _offsets(history) == list(range(260))
        assert db.select('SELECT count(*), count(DISTINCT "offset") FROM events').rows == [[260, 260]]


def test_a_feature_backfill_replays_an_s3_history(history: str, tmp_path: Path) -> None:
    """The backfill child (`CREATE FEATURE`'s history half) reads a complete S3 history through pyarrow.fs,
    in offset order, and builds exactly what replaying the log builds; an incomplete one is not used."""
    feature = default_registry()["top_categories_15d"]
    with EventLog(tmp_path / "log.sqlite") as log:
        log.append([make_event(i, f"b{i}", day=i % 3) for i in range(120)])
        assert log.export(history) == 119
        events = list(log.read(0))
    rules = FeatureRegistry.of([feature])
    job = Job(feature.to_json(), rules.lateness_ms, rules.session_gap_ms, 4, 0, history)
    out = tmp_path / "backfill"
    out.mkdir()
    (out / JOB_FILE).write_bytes(msgspec.json.encode(job))
    built = backfill.build(out)
    assert built.applied_offset == 119  # from the history, not left to the log's replay
    assert msgspec.json.decode((out / PROGRESS_FILE).read_bytes())["done"] == 120
    replayed = FeatureEngine(rules, partitions=4)
    replayed.update_many(events)
    assert all(built.read(feature.name, f"u{u}") == replayed.read(feature.name, f"u{u}") for u in range(13))
    HistoryStore(history).delete(sorted(load_manifest(history))[0])  # a gap: the log is replayed instead
    gap = tmp_path / "gap"
    gap.mkdir()
    (gap / JOB_FILE).write_bytes(msgspec.json.encode(job))
    assert backfill.build(gap).applied_offset == -1
