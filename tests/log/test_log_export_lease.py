"""One exporter at a time into a shared Parquet history, with real NATS servers (no mocks): two nodes on one
stream, only the export lease's holder writes and every acknowledged event is in the history once; a holder
SIGKILLed mid-ingest is replaced after the lease's TTL and the history stays exactly-once; a holder whose
lease expired is fenced off; `SELECT count(*) FROM events` on any node counts each event once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats.js.errors
import pyarrow.parquet as pq
import pytest
from conftest import make_event
from nats_helpers import log_config, start_cluster, wait_for

import insession
from insession.embedded import Insession
from insession.log import LogConfig
from insession.log.cluster import LocalCluster
from insession.log.export import load_manifest, write_day_partitions
from insession.log.jetstream import JetStreamError, JetStreamLog
from insession.log.lease import ERR_NO_PLACEMENT, ExportLease

TTL_S = 2
PARTITIONS = 4
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("nats"))
    yield c
    c.stop()


def shared(cluster: LocalCluster, history: Path, ttl_s: int = TTL_S) -> LogConfig:
    return msgspec.structs.replace(log_config(cluster), history=str(history), export_lease_s=ttl_s)


def history_offsets(history: Path) -> list[int]:
    """Every offset in the history's part files, sorted, repeats kept (a repeat is a double count)."""
    files = history.glob("day=*/part-*.parquet")
    return sorted(o for f in files for o in pq.read_table(f).column("offset").to_pylist())


def assert_exactly_once(history: Path, mark: int) -> None:
    """The history holds offsets 0..mark, each once, and its manifest lists exactly the part files on disk."""
    offsets = history_offsets(history)
    assert len(offsets) == len(set(offsets)), f"{len(offsets) - len(set(offsets))} events are in the history twice"
    assert offsets == list(range(mark + 1)), f"the history holds {len(offsets)} offsets, not 0..{mark}"
    on_disk = {str(p.relative_to(history)) for p in history.glob("day=*/part-*.parquet")}
    assert set(load_manifest(history)) == on_disk


def test_two_nodes_one_exporter_every_event_once(cluster: LocalCluster, tmp_path: Path) -> None:
    history = tmp_path / "history"
    ttl_s = 8  # longer than any takeover of a released lease, even on a loaded machine
    cfg = shared(cluster, history, ttl_s)
    a = JetStreamLog(cfg, tmp_path / "a", partitions=PARTITIONS)
    wait_for("node a holding the export lease", a.exporting)
    b = JetStreamLog(cfg, tmp_path / "b", partitions=PARTITIONS)
    try:
        wait_for("node b seeing a's lease", lambda: b._lease is not None and b._lease.holder is not None)
        assert not b.exporting()
        for i in range(0, 600, 100):
            (a if i % 200 else b).append([make_event(k, f"e{k}", day=k % 3) for k in range(i, i + 100)])
        assert b.export(history) == -1 and not history.exists()  # not the holder: writes nothing
        assert a.export(history, upto_offset=249) == 249
        wait_for("node b reading a's mark", lambda: b.exported_offset() == 249)

        stop = threading.Event()
        errors: list[BaseException] = []

        def exporting(log: JetStreamLog) -> None:  # both nodes export as fast as they can, while events arrive
            try:
                while not stop.is_set():
                    log.export(history)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=exporting, args=(log,)) for log in (a, b, a, b)]
        for t in threads:
            t.start()
        for i in range(600, 1400, 100):
            (a if i % 200 else b).append([make_event(k, f"e{k}", day=k % 3) for k in range(i, i + 100)])
        wait_for("a's export of every event", lambda: a.exported_offset() == 1399)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        assert not b.exporting()
        assert_exactly_once(history, 1399)

        a.close()  # a clean close hands the lease over at once, not after the TTL
        closed = time.monotonic()
        wait_for("node b taking over the released lease", b.exporting, timeout_s=ttl_s + 30)
        assert time.monotonic() - closed < ttl_s, "the released lease was only taken after its TTL"
        b.append([make_event(k, f"e{k}") for k in range(1400, 1500)])
        assert b.export(history) == 1499
        assert_exactly_once(history, 1499)
    finally:
        a.close()
        b.close()


def test_a_lease_bucket_not_yet_placeable_is_asked_again(cluster: LocalCluster, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease bucket is created like the stream, so it meets the same moments of a forming cluster (503,
    400 "no suitable peers for placement"): a mock, for moments that cannot be caused on demand; two such
    answers are waited out and the node exports."""
    real, left = ExportLease._open, {"n": 2}

    async def not_yet(self: ExportLease, replicas: int) -> object:
        if left["n"] > 0:
            left["n"] -= 1
            raise nats.js.errors.BadRequestError(code=400, err_code=ERR_NO_PLACEMENT, description="peer offline")
        return await real(self, replicas)

    monkeypatch.setattr(ExportLease, "_open", not_yet)
    with JetStreamLog(shared(cluster, tmp_path / "history"), tmp_path / "a", partitions=4) as log:
        log.append([make_event(k, f"e{k}") for k in range(5)])
        assert left["n"] == 0
        wait_for("the lease taken", log.exporting)
        assert log.export(tmp_path / "history") == 4


def test_a_holder_whose_lease_expired_is_fenced_off(cluster: LocalCluster, tmp_path: Path) -> None:
    history = tmp_path / "history"
    cfg = shared(cluster, history)
    a = JetStreamLog(cfg, tmp_path / "a", partitions=PARTITIONS)
    wait_for("node a holding the export lease", a.exporting)
    b = JetStreamLog(cfg, tmp_path / "b", partitions=PARTITIONS)
    try:
        a.append([make_event(k, f"e{k}") for k in range(100)])
        assert a.export(history) == 99
        assert a._lease is not None
        a._lease._stop.set()  # its renewals stop (a paused process): its lease expires on the server
        a._lease._thread.join()
        wait_for("node b taking the expired lease", b.exporting, timeout_s=TTL_S + 30)
        assert b.exported_offset() == 99  # it continues from the mark a committed
        b.append([make_event(k, f"e{k}") for k in range(100, 200)])
        wait_for("node a seeing b's events", lambda: a.last_offset() == 199)
        a._lease._deadline = time.monotonic() + 60  # as if a's clock still believed it held the lease
        assert a.export(history) == 99  # it writes a part, and its commit is refused: fenced off
        assert not a.exporting()
        assert history_offsets(history)[-1] == 199  # a's part, beyond the mark
        b.append([make_event(k, f"e{k}") for k in range(200, 250)])
        assert b.export(history) == 249  # b's takeover check removed a's part first
        assert_exactly_once(history, 249)
    finally:
        a.close()
        b.close()


def test_sigkilled_exporter_is_replaced_and_every_event_counted_once(cluster: LocalCluster, tmp_path: Path) -> None:
    history = tmp_path / "history"
    cfg = shared(cluster, history)
    child = subprocess.Popen([sys.executable, str(HERE / "lease_node.py"), str(tmp_path / "k"),
                              msgspec.json.encode(cfg).decode()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdin is not None and child.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")), daemon=True)
    reader.start()
    nodes: list[Insession] = []
    try:
        wait_for("the child node holding the export lease", lambda: "holding\n" in lines, timeout_s=60)
        nodes = [insession.open(tmp_path / name, log_config=cfg, maintenance_interval_s=None, partitions=PARTITIONS)
                 for name in ("b", "c")]
        assert not any(db.log.exporting() for db in nodes)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(60) == -signal.SIGKILL
        died = time.monotonic()
        reader.join(10)
        acked = [int(line.split()[1]) for line in lines if line.startswith("acked")]
        orphaned = [int(line.split()[1]) for line in lines if line.startswith("orphaned")]
        assert orphaned and history_offsets(history)[-1] == acked[-1], lines  # parts beyond its mark, uncommitted
        for db in nodes:  # not holders: they write nothing and return the shared mark
            assert db.export() <= orphaned[0]
        assert history_offsets(history)[-1] == acked[-1]

        holder = wait_for("a surviving node taking the lease", lambda: [db for db in nodes if db.log.exporting()],
                          timeout_s=TTL_S + 30)
        taken_after = time.monotonic() - died
        assert len(holder) == 1, "both surviving nodes hold the export lease"
        exporter, other = holder[0], next(db for db in nodes if db is not holder[0])
        assert taken_after > TTL_S / 2, "the lease of a node killed a moment ago was taken before it expired"
        assert exporter.log.exported_offset() == orphaned[0]  # it continues from the dead holder's mark
        more = other.insert("events", [{"user_id": f"m{k}", "item_id": "i1", "action": "view",
                                        "ts": 1_763_800_000_000 + k * 60_000, "event_id": f"m{k}"}
                                       for k in range(50)])
        wait_for("the new events at the exporter", lambda: exporter.log.last_offset() == more.offsets[-1])
        mark = exporter.export()  # after removing the dead holder's uncommitted parts
        assert mark == more.offsets[-1] > acked[-1]
        assert other.export() <= mark and not other.log.exporting()
        assert_exactly_once(history, mark)

        tail = other.insert("events", [{"user_id": f"t{k}", "item_id": "i1", "action": "view",
                                        "ts": 1_763_800_000_000 + k, "event_id": f"t{k}"} for k in range(40)])
        total = tail.offsets[-1] + 1
        wait_for("the tail at the exporter", lambda: exporter.log.last_offset() == total - 1)
        for db in nodes:  # history + the stream's unexported tail, each event once, on either node
            assert db.select('SELECT count(*), count(DISTINCT "offset") FROM events').rows == [[total, total]]
        print(json.dumps({"acked_by_killed": acked[-1] + 1, "exported": mark + 1, "total": total,
                          "takeover_s": round(taken_after, 2)}))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for db in nodes:
            db.close()


def test_a_shared_history_of_another_stream_is_refused_not_deleted(cluster: LocalCluster, tmp_path: Path) -> None:
    history = tmp_path / "history"
    foreign = [make_event(k, f"o{k}") for k in range(50)]
    for k, event in enumerate(foreign):
        event.offset = k
    write_day_partitions(foreign, history)  # another stream's history, up to offset 49
    with JetStreamLog(shared(cluster, history), tmp_path / "a", partitions=PARTITIONS) as log:
        log.append([make_event(k, f"e{k}") for k in range(10)])
        wait_for("the node holding the export lease", log.exporting)
        with pytest.raises(JetStreamError, match="another stream's history"):
            log.export(history)
    assert history_offsets(history) == list(range(50))  # none of its parts taken for a dead exporter's leftovers
