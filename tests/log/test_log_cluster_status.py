"""A node's view of the replicated log, with real servers: quorum, servers and leader, per-partition and
consumer lag, and the stale flag, in /metrics and the /readyz detail (one definition: `cluster_status`).
Two of three servers down: quorum lost and stale while feature reads answer 200; restarted: healthy."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_event
from fastapi.testclient import TestClient
from nats_helpers import log_config, start_cluster, wait_for
from prometheus_client.parser import text_string_to_metric_families

import insession
from insession.log.cluster import LocalCluster
from insession.log.jetstream import JetStreamLog
from insession.schema import Event, partition_of
from insession.serve.app import create_app

PARTITIONS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("nats"))
    yield c
    c.stop()


def gauges(api: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, labels)."""
    text = api.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cluster_detail(api: TestClient) -> dict[str, Any]:
    r = api.get("/readyz")
    assert r.status_code == 200, r.text  # a node without a quorum stays ready: its reads serve on
    return r.json()["cluster"]


def user_in(partition: int, start: int = 0) -> str:
    return next(f"u{n}" for n in range(start, start + 10_000) if partition_of(f"u{n}", PARTITIONS) == partition)


def event(user: str, event_id: str) -> dict[str, Any]:
    return {"user_id": user, "item_id": "sku1", "action": "view", "ts": "2026-11-22T10:00:00Z", "event_id": event_id}


def _ev(user: str, event_id: str) -> Event:
    e = make_event(0, event_id)
    e.user_id = user
    return e


def test_healthy_cluster_servers_leader_and_lag_per_partition(cluster: LocalCluster, tmp_path: Path) -> None:
    """Three servers up, one leader, quorum; a node whose state trails the stream shows the lag of exactly
    the partitions written since, and the same figures in /readyz and /metrics."""
    cfg = log_config(cluster)
    db = insession.open(tmp_path / "data", log_config=cfg, partitions=PARTITIONS, maintenance_interval_s=None)
    with TestClient(create_app(handle=db)) as api:
        detail = wait_for("a quorum with three servers up", lambda: (
            d if (d := cluster_detail(api))["quorum"] and sum(bool(s["up"]) for s in d["servers"]) == 3 else None))
        assert detail["stale"] is False and detail["reason"] == ""
        assert detail["leader"] in {"n0", "n1", "n2"}
        assert sorted(s["name"] for s in detail["servers"]) == ["n0", "n1", "n2"]
        assert [s["role"] for s in detail["servers"] if s["name"] == detail["leader"]] == ["leader"]
        assert detail["leader"] == cluster.stream_leader(cfg.stream)

        p, q = 1, 3
        a, b = user_in(p), user_in(q)
        offsets = api.post("/v1/events", json=[event(a, "a1"), event(b, "b1")]).json()["offsets"]
        detail = wait_for("the partitions' newest offsets", lambda: (
            d if (d := cluster_detail(api))["partitions"][q]["last_offset"] == offsets[1] else None))
        assert [x["last_offset"] for x in detail["partitions"]] == [-1, offsets[0], -1, offsets[1]]
        assert detail["consumer_lag"] == 0 and all(x["lag"] == 0 for x in detail["partitions"])

        # Another node writes while this node's state is held after applying one event (a slow consumer).
        hold, held = threading.Event(), threading.Event()

        def slow(events: list[Event]) -> None:
            if any(e.event_id == "a2" for e in events):
                held.set()
                hold.wait(60)

        db.applied_listeners.append(slow)
        try:
            with JetStreamLog(cfg, tmp_path / "other", partitions=PARTITIONS) as other:
                other.append([_ev(a, "a2")])
                assert held.wait(20), "this node never applied the other node's event"
                res = other.append([_ev(b, "b2"), _ev(b, "b3")])
            newest = res[-1].offset
            applied = db.features.applied_offset
            detail = wait_for("the partition lag of a trailing node", lambda: (
                d if (d := cluster_detail(api))["partitions"][q]["lag"] > 0 else None))
            assert detail["applied_offset"] == applied
            assert detail["stream_last_offset"] == newest
            assert detail["consumer_lag"] == newest - applied == 2
            assert detail["partitions"][q] == {"partition": q, "last_offset": newest, "lag": 2, "held": True}
            assert detail["partitions"][p]["lag"] == 0  # p's newest event (a2) is applied
            metrics = gauges(api)
            assert metrics[("insession_log_consumer_lag", ())] == 2
            assert metrics[("insession_log_partition_lag", (("partition", str(q)),))] == 2
            assert metrics[("insession_log_partition_lag", (("partition", str(p)),))] == 0
        finally:
            hold.set()
        wait_for("the node caught up", lambda: cluster_detail(api)["consumer_lag"] == 0)
        assert gauges(api)[("insession_log_partition_lag", (("partition", str(q)),))] == 0
    db.close()


@pytest.mark.parametrize("leader_survives", [True, False], ids=["leader-survives", "leader-killed"])
def test_two_of_three_down_quorum_lost_and_stale_while_reads_serve(
    cluster: LocalCluster, tmp_path: Path, leader_survives: bool
) -> None:
    """Whichever two servers go down (the stream's leader may stay leader of nothing), the node reports the
    quorum lost and its reads stale, in /readyz and /metrics, while feature reads answer 200 from state;
    with the servers back it reports a quorum again and nothing stale."""
    cluster.wait_ready(60)  # the meta leader, after an earlier test's restarts: the node creates its stream
    cfg = log_config(cluster)
    db = insession.open(tmp_path / "data", log_config=cfg, partitions=PARTITIONS, maintenance_interval_s=None)
    with TestClient(create_app(handle=db)) as api:
        assert api.post("/v1/events", json=event("u1", "e1")).status_code == 200
        before = api.get("/v1/features/user/u1")
        assert before.status_code == 200
        wait_for("a quorum", lambda: cluster_detail(api)["quorum"])
        leader = int(cluster.stream_leader(cfg.stream).removeprefix("n"))
        others = [i for i in range(3) if i != leader]
        down = others if leader_survives else [leader, others[0]]
        for i in down:
            cluster.kill(i)
        try:
            detail = wait_for("quorum lost", lambda: (d if not (d := cluster_detail(api))["quorum"] else None))
            assert detail["stale"] is True
            assert "writes" in detail["reason"], detail["reason"]
            ups = {s["name"]: s["up"] for s in detail["servers"]}
            assert [ups[f"n{i}"] for i in range(3)] == [i not in down for i in range(3)], ups
            metrics = gauges(api)
            assert metrics[("insession_log_quorum", ())] == 0
            assert metrics[("insession_log_stale", ())] == 1
            for i in down:
                assert metrics[("insession_log_server_up", (("server", f"n{i}"),))] == 0
            r = api.get("/v1/features/user/u1")  # reads keep serving from the node's state
            assert r.status_code == 200 and r.json() == before.json()
        finally:
            for i in down:
                cluster.restart(i, wait_leader=False)
        detail = wait_for("the quorum back", lambda: (
            d if (d := cluster_detail(api))["quorum"] and not d["stale"] else None), timeout_s=60)
        assert all(s["up"] for s in detail["servers"]) and detail["reason"] == ""
        metrics = gauges(api)
        assert metrics[("insession_log_quorum", ())] == 1 and metrics[("insession_log_stale", ())] == 0
        assert api.post("/v1/events", json=event("u1", "e2")).status_code == 200
    db.close()
