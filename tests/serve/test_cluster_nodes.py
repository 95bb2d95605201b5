"""Nodes holding a subset of partitions, forwarding the rest: three insession nodes (real HTTP servers, in
this process) on one replicated log (three real nats-server processes on loopback), 16 partitions held
twice each, and a reference node holding every partition on the same stream.

What it shows: through any node, every shopper's features, a batch read across all partitions, a ranking
and a serving-lane query equal the reference's (partitioned = single, over HTTP); a write read back
through the same node is seen at once, whichever node holds the shopper; a holder that is down is
skipped for the partition's other holder, and a partition with no holder up is a clear 503; a request
forwarded to a node that does not hold its shopper is refused (421), never forwarded again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn

from insession.embedded import Insession
from insession.log.cluster import LocalCluster, free_ports
from insession.schema import partition_of
from insession.serve.app import create_app
from insession.serve.config import Config, config_from
from insession.serve.console import routes as console_routes
from insession.serve.forward import FORWARDED_BY, MIN_OFFSET, SERVED_BY

P = 16
USERS = [f"shopper-{n}" for n in range(40)]
ITEMS = [f"item-{n}" for n in range(30)]
T0 = 1_763_800_000_000


class Node:
    """One insession server (uvicorn in a thread) on its own data directory."""

    def __init__(self, data_dir: Path, config: Config, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.app = create_app(data_dir, config=config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, f"node {self.url} did not start"
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def db(self) -> Insession:
        return self.app.state.insession  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _config(log: dict[str, Any], nodes: list[str] | None = None, me: str = "") -> Config:
    doc: dict[str, Any] = {"log": log, "features": {"partitions": P},
                           "server": {"maintenance_interval_s": 3600}}
    if nodes:
        doc["cluster"] = {"nodes": nodes, "node": me, "copies": 2, "forward_timeout_s": 2.0}
    return config_from(doc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Node], Insession, LocalCluster]]:
    base = tmp_path_factory.mktemp("cluster-nodes")
    nats = LocalCluster.on_free_ports(base / "nats")
    nats.start()
    log = {"url": ",".join(nats.urls), "monitor": ",".join(nats.monitor_urls), "stream": "NODES"}
    ports = free_ports(3)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    nodes = [Node(base / f"node{i}", _config(log, urls, urls[i]), ports[i]) for i in range(3)]
    reference = Insession(base / "reference", maintenance_interval_s=None, partitions=P,
                          log_config=_config(log).log)
    rng = random.Random(7)
    events = [{"user_id": rng.choice(USERS), "item_id": rng.choice(ITEMS),
               "action": rng.choice(["view", "view", "add_to_cart", "purchase"]), "ts": T0 + n * 20_000}
              for n in range(600)]
    items = [{"item_id": item, "category": f"c{n % 4}"} for n, item in enumerate(ITEMS)]
    assert nodes[1].http.put("/v1/items", json=items).status_code == 200  # through one node: the items stream
    for db in [reference, *(n.db for n in nodes)]:  # ... brings it to every node's catalogue
        deadline = time.monotonic() + 30
        while len(db.catalog) < len(ITEMS):
            assert time.monotonic() < deadline, "a node's catalogue did not get the items upserted elsewhere"
            time.sleep(0.02)
    for n, start in enumerate(range(0, len(events), 50)):  # batches through every node
        r = nodes[n % 3].http.post("/v1/events", json=events[start : start + 50])
        assert r.status_code == 200, r.text
    try:
        yield nodes, reference, nats
    finally:
        for node in nodes:
            node.stop()
        reference.close()
        nats.stop()


def _last(reference: Insession, nodes: list[Node]) -> dict[str, str]:
    """Every read below waits until its node has applied every acknowledged write (the header a client may
    send): each node applied its own inserts before it acknowledged them."""
    last = max(n.db.features.applied_offset for n in nodes if n.thread.is_alive())
    deadline = time.monotonic() + 30
    while reference.features.applied_offset < last:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return {MIN_OFFSET: str(last)}


def _holders(nodes: list[Node], user: str) -> list[str]:
    p = partition_of(user, P)
    return [n.url for n in nodes if p in n.db.features.held]


def test_each_node_holds_two_thirds_and_each_partition_two_nodes(cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, _, _ = cluster
    held = [n.db.features.held for n in nodes]
    assert [len(h) for h in held] == [11, 11, 10]
    assert all(sum(p in h for h in held) == 2 for p in range(P))
    for node, h in zip(nodes, held, strict=True):
        assert node.http.get("/readyz").json()["held_partitions"] == sorted(h)
        page = node.http.get("/console/api/cluster").json()
        assert [p["held"] for p in page["partitions"]] == [p in h for p in range(P)]
        assert all((node.url in p["holders"]) == p["held"] and len(p["holders"]) == 2 for p in page["partitions"])


def test_every_shopper_reads_the_same_through_every_node(cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, reference, _ = cluster
    wait = _last(reference, nodes)
    forwarded = 0
    for user in USERS:
        values, fallbacks = reference.query.read_features("user", user)
        expected = msgspec.json.decode(msgspec.json.encode({"features": values, "fallbacks": fallbacks}))
        for node in nodes:
            r = node.http.get(f"/v1/features/user/{user}", headers=wait)
            assert r.status_code == 200, r.text
            assert {k: r.json()[k] for k in ("features", "fallbacks")} == expected, (user, node.url)
            served = r.headers.get(SERVED_BY)
            if served is None:
                assert node.url in _holders(nodes, user)
            else:
                forwarded += 1
                assert node.url not in _holders(nodes, user) and served in _holders(nodes, user)
        assert reference.query.read_features("user_item", (user, ITEMS[0]))[0] == nodes[0].http.get(
            f"/v1/features/user_item/{user}", params={"item_id": ITEMS[0]}, headers=wait).json()["features"]
    assert forwarded >= len(USERS) * 3 // 4  # a third of the nodes hold each shopper: most reads were forwarded


def test_a_batch_read_across_all_partitions_gathers_from_the_holders(
        cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, reference, _ = cluster
    wait = _last(reference, nodes)
    keys = [*USERS, "nobody-yet"]
    expected = [{"key": k, "features": v, "fallbacks": fb}
                for k, (v, fb) in zip(keys, reference.query.read_features_many("user", keys), strict=True)]
    for node in nodes:
        r = node.http.post("/v1/features", json={"entity": "user", "keys": keys}, headers=wait)
        assert r.status_code == 200, r.text
        assert r.json()["rows"] == msgspec.json.decode(msgspec.json.encode(expected))
        others = [n.url for n in nodes if n is not node]
        metrics = node.http.get("/metrics").text
        assert any(f'insession_forwarded_requests_total{{node="{o}",outcome="answered"}}' in metrics for o in others)
    pairs = [[u, ITEMS[3]] for u in USERS[:10]]
    wanted = ["user_item_count_28d"]
    r = nodes[1].http.post("/v1/features", json={"entity": "user_item", "keys": pairs, "features": wanted},
                           headers=wait)
    assert r.status_code == 200, r.text
    assert [row["features"] for row in r.json()["rows"]] == [
        v for v, _ in reference.query.read_features_many("user_item", [tuple(k) for k in pairs], wanted)]


def test_a_ranking_and_a_serving_query_are_answered_by_a_holder(cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, reference, _ = cluster
    wait = _last(reference, nodes)
    user = next(u for u in USERS if nodes[0].url not in _holders(nodes, u))
    ranked = nodes[0].http.post("/v1/rank", json={"user_id": user, "k": 5}, headers=wait)
    assert ranked.status_code == 200, ranked.text
    assert ranked.headers[SERVED_BY] in _holders(nodes, user)
    holder = next(n for n in nodes if n.url == ranked.headers[SERVED_BY])
    direct = holder.http.post("/v1/rank", json={"user_id": user, "k": 5}, headers=wait)
    assert [i["item_id"] for i in ranked.json()["items"]] == [i["item_id"] for i in direct.json()["items"]]

    sql = {"sql": "SELECT history_seq FROM features WHERE user_id = :u", "params": {"u": user}}
    answer = nodes[0].http.post("/v1/query", json=sql, headers=wait)
    assert answer.status_code == 200, answer.text
    assert answer.headers[SERVED_BY] in _holders(nodes, user)
    assert answer.json()["rows"] == reference.query.execute(sql["sql"], sql["params"]).rows  # type: ignore[arg-type]


def test_the_console_shows_a_shopper_another_node_holds(cluster: tuple[list[Node], Insession, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The shopper page's data and its live stream come from a holder, relayed as it flows, and a stream
    quiet for longer than the forwarding timeout (2 s here) runs to its end instead of being cut."""
    monkeypatch.setattr(console_routes, "STREAM_S", 3.0)
    nodes, reference, _ = cluster
    wait = _last(reference, nodes)
    user = next(u for u in USERS if nodes[1].url not in _holders(nodes, u))
    r = nodes[1].http.get(f"/console/api/shopper/{user}", headers=wait)
    assert r.status_code == 200 and r.headers[SERVED_BY] in _holders(nodes, user), r.text
    assert r.json()["user_id"] == user and r.json()["session_events"] > 0
    with nodes[1].http.stream("GET", f"/console/api/shopper/{user}/stream", headers=wait) as stream:
        assert stream.status_code == 200 and stream.headers[SERVED_BY] in _holders(nodes, user)
        events = [line for line in stream.iter_lines() if line.startswith("data:")]  # to the stream's end
    assert msgspec.json.decode(events[0].removeprefix("data:").strip())["user_id"] == user


def test_a_write_is_read_back_through_the_same_node_whoever_holds_it(
        cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, reference, _ = cluster
    for n, user in enumerate(USERS[:12]):
        node, ts = nodes[n % 3], T0 + 13_000_000 + n
        r = node.http.post("/v1/events", json={"user_id": user, "item_id": ITEMS[n], "action": "add_to_cart", "ts": ts})
        assert r.status_code == 200, r.text
        session = node.http.get(f"/v1/features/user/{user}").json()["features"]["session_seq"]
        assert (ITEMS[n], ts) in [(e["item_id"], e["ts"]) for e in session], (user, node.url, _holders(nodes, user))
    _last(reference, nodes)


def test_a_read_waits_for_the_offset_it_names_or_says_the_node_is_behind(
        cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, reference, _ = cluster
    ahead = {MIN_OFFSET: str(reference.features.applied_offset + 1_000)}
    r = nodes[0].http.get(f"/v1/features/user/{USERS[0]}", headers=ahead)
    assert r.status_code == 503 and r.json()["code"] in ("behind", "partition_unavailable"), r.text
    r = nodes[0].http.get(f"/v1/features/item/{ITEMS[0]}", headers={MIN_OFFSET: "soon"})
    assert r.status_code == 400 and r.json()["code"] == "bad_header"


def test_a_request_forwarded_to_a_node_without_its_shopper_is_refused_not_forwarded_again(
        cluster: tuple[list[Node], Insession, Any]) -> None:
    nodes, _, _ = cluster
    user = next(u for u in USERS if nodes[2].url not in _holders(nodes, u))
    r = nodes[2].http.get(f"/v1/features/user/{user}", headers={FORWARDED_BY: nodes[0].url})
    assert r.status_code == 421 and r.json()["code"] == "misdirected", r.text
    by_holders: dict[tuple[str, ...], str] = {}
    for u in USERS:
        by_holders.setdefault(tuple(_holders(nodes, u)), u)
    assert len(by_holders) == 3  # {0,1}, {1,2}, {0,2}: no node holds a shopper of each
    sql = {"sql": "SELECT history_seq FROM features WHERE user_id IN (:a, :b, :c)",
           "params": dict(zip("abc", by_holders.values(), strict=True))}
    r = nodes[0].http.post("/v1/query", json=sql)
    assert r.status_code == 422 and r.json()["code"] == "spans_nodes", r.text
    two = {"sql": sql["sql"].replace(", :c", ""), "params": dict(list(sql["params"].items())[:2])}  # type: ignore[union-attr]
    r = nodes[0].http.post("/v1/query", json=two)
    assert r.status_code == 200 and len(r.json()["rows"]) == 2, r.text


def test_a_holder_down_is_skipped_and_a_partition_without_one_is_a_clear_503(
        cluster: tuple[list[Node], Insession, Any]) -> None:
    """Last in the module: it stops a node."""
    nodes, reference, _ = cluster
    wait = _last(reference, nodes)
    down = nodes[1]
    down.server.should_exit = True
    down.thread.join(timeout=60)
    for user in USERS:  # node 0 holds it, or nodes 1 and 2 do: node 1 is skipped for node 2
        r = nodes[0].http.get(f"/v1/features/user/{user}", headers=wait)
        assert r.status_code == 200, (user, _holders(nodes, user), r.text)
        assert r.headers.get(SERVED_BY) in (None, nodes[2].url)
    nodes[2].server.should_exit = True
    nodes[2].thread.join(timeout=60)
    lost = next(u for u in USERS if nodes[0].url not in _holders(nodes, u))
    r = nodes[0].http.get(f"/v1/features/user/{lost}", headers=wait)
    assert r.status_code == 503 and r.json()["code"] == "partition_unavailable", r.text
    assert down.url in r.json()["error"] and nodes[2].url in r.json()["error"]
