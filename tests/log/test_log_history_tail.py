"""The trainer's read of a replicated log (`read_cluster_events`, `insession train --log`), against real NATS
servers on loopback: the Parquet history up to its export mark plus the stream after it holds every
acknowledged event exactly once, whatever the mark, a dead exporter's leftovers beyond it or a stray copy
below it; a history that is not the stream's, a bad URL, a missing stream, unreachable servers and a lost
quorum are refused with a message that says so."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from conftest import make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats_helpers import log_config, start_cluster, wait_for
from typer.testing import CliRunner

import insession
from insession.cli import app
from insession.log import LogConfig
from insession.log.cluster import LocalCluster, free_ports
from insession.log.export import write_day_partitions
from insession.log.jetstream import JetStreamError, JetStreamLog, StreamReader
from insession.query import QueryError
from insession.schema import Event
from insession.train.build import load_events, read_cluster_events

PARTITIONS = 4
N = 240  # events in the module's stream


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("nats"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stream(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[LogConfig, list[Event]]:
    """One stream of N acknowledged events over three event days, and what the stream holds (by offset)."""
    cfg = log_config(cluster)
    with JetStreamLog(cfg, tmp_path_factory.mktemp("writer"), partitions=PARTITIONS) as log:
        for i in range(0, N, 60):
            log.append([make_event(k, f"e{k}", day=k % 3) for k in range(i, i + 60)])
        stored = list(log.read(0))
    assert [e.offset for e in stored] == list(range(N))
    return cfg, stored


def _history(data: Path, stored: list[Event], mark: int, cuts: list[int]) -> Path:
    """A node's own history of `stored` up to `mark`, exported in chunks ending at `cuts`, with its mark file."""
    history = data / "history"
    start = 0
    for end in [*sorted(c for c in cuts if c < mark), mark]:
        if end >= start:
            write_day_partitions(stored[start:end + 1], history)
            start = end + 1
    history.mkdir(parents=True, exist_ok=True)
    return history


def _text(output: str) -> str:
    """CLI output with the error box's borders and line wraps taken out."""
    return " ".join(output.replace("│", " ").split())


def _assert_every_event_once(events: object, stored: list[Event]) -> None:
    offsets = events["offset"].to_pylist()  # type: ignore[index]
    assert len(offsets) == len(set(offsets)), f"{len(offsets) - len(set(offsets))} events read twice"
    assert offsets == list(range(len(stored))), f"{len(offsets)} events read, not offsets 0..{len(stored) - 1}"
    assert events["event_id"].to_pylist() == [e.event_id for e in stored]  # type: ignore[index]
    assert events["ts"].to_pylist() == [e.ts for e in stored]  # type: ignore[index]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mark=st.integers(-1, N - 1), cuts=st.lists(st.integers(0, N - 1), max_size=4),
       leftover=st.integers(0, 40), stray=st.booleans())
def test_history_plus_tail_is_every_acknowledged_event_once_for_any_mark(
        stream: tuple[LogConfig, list[Event]], mark: int, cuts: list[int], leftover: int, stray: bool) -> None:
    """Any export mark; parts a dead export wrote beyond it (not committed); a stray copy of a part below it:
    the history up to the mark plus the stream after it is the stream, each event once."""
    cfg, stored = stream
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        history = _history(data, stored, mark, cuts)
        (data / f"{cfg.stream}.exported").write_text(str(mark))
        if leftover and mark + 1 < N:  # an export that died between writing its parts and its mark
            write_day_partitions(stored[mark + 1:mark + 1 + leftover], history)
        parts = sorted(history.glob("day=*/part-*.parquet"))
        if stray and parts:  # a copy the exporter has not quarantined yet (the lane would count it twice)
            (history / "day=0000-copy").mkdir()
            shutil.copy(parts[0], history / "day=0000-copy" / parts[0].name)
        got = read_cluster_events(data, cfg)
        assert (got.mark, got.stream_end) == (mark, N - 1)
        _assert_every_event_once(got.events, stored)


def test_a_shared_history_is_read_at_the_lease_buckets_mark(cluster: LocalCluster, tmp_path: Path) -> None:
    """Two nodes share one history; the lease holder exports part of the stream and dies with parts beyond its
    mark: the trainer reads the history up to the bucket's mark and the rest from the stream, each event once,
    and its count equals what the analytics lane counts on a node."""
    history = tmp_path / "shared"
    cfg = msgspec.structs.replace(log_config(cluster), history=str(history), export_lease_s=8)
    a = JetStreamLog(cfg, tmp_path / "a", partitions=PARTITIONS)
    try:
        wait_for("node a holding the export lease", a.exporting)
        a.append([make_event(k, f"s{k}", day=k % 2) for k in range(150)])
        assert a.export(history, upto_offset=99) == 99
        a.append([make_event(k, f"s{k}", day=k % 2) for k in range(150, 200)])
        write_day_partitions(list(a.read(100, upto=129)), history)  # written, never committed
        stored = list(a.read(0))
    finally:
        a.close()
    got = read_cluster_events(history, cfg)
    assert (got.mark, got.stream_end) == (99, 199)
    assert got.mark_from == f"the lease bucket {cfg.stream}_export"
    _assert_every_event_once(got.events, stored)
    assert load_events(history, log=cfg).num_rows == 200


def test_a_history_missing_events_below_its_mark_is_refused(stream: tuple[LogConfig, list[Event]],
                                                            tmp_path: Path) -> None:
    cfg, stored = stream
    history = _history(tmp_path, stored, 99, [49])
    next(p for p in history.glob("day=*/part-0-*.parquet")).unlink()  # a lost part
    (tmp_path / f"{cfg.stream}.exported").write_text("99")
    with pytest.raises(ValueError, match=r"holds \d+ of the 100 events up to its export mark 99 \(offset 0 is missing"):
        read_cluster_events(tmp_path, cfg)


def test_a_mark_beyond_the_streams_end_is_another_streams_history(stream: tuple[LogConfig, list[Event]],
                                                                  tmp_path: Path) -> None:
    cfg, _ = stream
    (tmp_path / "history").mkdir()
    (tmp_path / f"{cfg.stream}.exported").write_text(str(N + 5))
    with pytest.raises(ValueError, match=f"export mark {N + 5} .* lies beyond the end of stream {cfg.stream}"):
        read_cluster_events(tmp_path, cfg)


def test_a_missing_stream_is_named(cluster: LocalCluster, tmp_path: Path) -> None:
    cfg = log_config(cluster)  # a stream nobody created
    with pytest.raises(JetStreamError, match=f"stream {cfg.stream} does not exist .* check --stream"):
        read_cluster_events(tmp_path, cfg)


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "nats://127.0.0.1:42x22", "nats:///nohost",
                                 "nats://127.0.0.1:4222/path"])
def test_a_bad_url_is_refused_naming_it(url: str, tmp_path: Path) -> None:
    with pytest.raises(JetStreamError, match="is not a NATS server URL"):
        StreamReader(LogConfig(url=url))
    result = CliRunner().invoke(app, ["training-data", str(tmp_path), "--out", str(tmp_path / "out"), "--log", url])
    assert result.exit_code == 2 and "is not a NATS server URL" in _text(result.output)


def test_unreachable_servers_stop_the_trainer_with_the_reason(tmp_path: Path) -> None:
    ports = free_ports(2)  # nothing listens there
    config = tmp_path / "server.toml"
    config.write_text(f'[log]\nurl = "nats://127.0.0.1:{ports[0]},nats://127.0.0.1:{ports[1]}"\n'
                      'ack_timeout_s = 1.5\n')
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--config", str(config)])
    assert result.exit_code == 1, result.output
    text = _text(result.output)
    assert f"no NATS server of nats://127.0.0.1:{ports[0]}" in text and "answered within 2 s" in text


def test_a_lost_quorum_stops_the_read_instead_of_reading_one_replica(tmp_path: Path) -> None:
    """The stream's leader and one other server down: the survivor leads nothing, so no reader can know every
    acknowledged event. (Had the leader survived, it would answer, with every acknowledged event, until NATS's
    lost-quorum interval passed: which server led decided this test's outcome before the leader was chosen.)"""
    with LocalCluster.on_free_ports(tmp_path / "nats") as c:
        c.start()
        cfg = log_config(c)  # the default timeout: a new cluster may take seconds to create the stream
        with JetStreamLog(cfg, tmp_path / "w", partitions=PARTITIONS) as log:
            log.append([make_event(k, f"q{k}") for k in range(10)])
        (tmp_path / "d" / "history").mkdir(parents=True)
        assert read_cluster_events(tmp_path / "d", cfg).events.num_rows == 10
        leader = int(c.stream_leader(cfg.stream).removeprefix("n"))
        c.kill(leader)
        c.kill(next(i for i in range(3) if i != leader))
        with pytest.raises(JetStreamError, match="reading every acknowledged event needs a quorum"):
            read_cluster_events(tmp_path / "d", msgspec.structs.replace(cfg, ack_timeout_s=2.0))


def test_a_nodes_analytics_workers_read_the_streams_tail_themselves(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The analytics lane of a node on a replicated log: each worker reads the stream's unexported events
    itself (the server's own `tail_arrow` is never called: reading them back is Python work that held the
    server's requests up), from the export mark to what the node knew acknowledged at dispatch, and the
    export worker writes the history from the stream likewise; with every server down the query gets 503
    `unavailable`, not a 500."""
    with LocalCluster.on_free_ports(tmp_path / "nats") as c:
        c.start()
        with JetStreamLog(cfg := log_config(c), tmp_path / "w", partitions=PARTITIONS):
            pass  # the stream made with the default timeout (a new cluster may take seconds); 2 s from here on
        cfg = msgspec.structs.replace(cfg, ack_timeout_s=2.0)
        with insession.open(tmp_path / "node", maintenance_interval_s=None, partitions=PARTITIONS,
                            log_config=cfg) as db:
            db.insert("events", [{"user_id": f"u{k % 5}", "item_id": f"i{k}", "action": "view",
                                  "ts": 1_763_800_000_000 + k} for k in range(40)])
            assert db.export() == 39
            db.insert("events", [{"user_id": "u1", "item_id": "i1", "action": "view", "ts": 1_763_800_001_000 + k}
                                 for k in range(25)])

            def not_here(_: int) -> None:
                raise AssertionError("the server read the tail itself")

            monkeypatch.setattr(db.log, "tail_arrow", not_here)
            rows = db.select('SELECT count(*), count(DISTINCT "offset"), max("offset") FROM events').rows
            assert rows == [[65, 65, 64]]
            # the background export's writer is a worker too: it reads the stream, the node reads nothing
            monkeypatch.setattr(db.log, "read", not_here)
            assert db.log.export(db.history_dir, write=db.query.analytics.export_writer()) == 64
            db.insert("events", [{"user_id": "u2", "item_id": "i2", "action": "view", "ts": 1_763_800_002_000}])
            rows = db.select('SELECT count(*), count(DISTINCT "offset"), max("offset") FROM events').rows
            assert rows == [[66, 66, 65]]  # 65 from the history the worker wrote, 1 from the stream's tail
            for n in range(3):
                c.kill(n)
            with pytest.raises(QueryError) as refused:
                db.select("SELECT count(*) FROM events")
            assert (refused.value.status, refused.value.code) == (503, "unavailable")
            for n in range(3):
                c.restart(n, wait_leader=n == 2)
