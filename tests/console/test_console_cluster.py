"""The console's cluster page against a real `insession serve --log` on three real NATS servers: its data
(the same `cluster_status` as /readyz) and, in headless Chromium, the page following the cluster live
through the loss and return of two servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from insession.log.cluster import LocalCluster
from insession.serve.process import ServerProcess

from .conftest import Console

expect = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: run scripts/setup_browser.sh").expect

PARTITIONS = 16  # the server's default [features] partitions


@dataclass
class Node:
    url: str
    cluster: LocalCluster


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A server on a three-server JetStream cluster (no API keys), with a few events written."""
    root = tmp_path_factory.mktemp("cluster-console")
    cluster = LocalCluster.on_free_ports(root / "nats")
    cluster.start()
    try:
        config = root / "server.toml"
        config.write_text(f'[log]\nurl = "{",".join(cluster.urls)}"\nmonitor = "{",".join(cluster.monitor_urls)}"\n')
        with ServerProcess(root / "db", extra_args=["--config", str(config)]) as srv:
            events = [{"user_id": f"u{n}", "item_id": "sku1", "action": "view", "ts": "2026-11-22T10:00:00Z"}
                      for n in range(40)]
            assert httpx.post(srv.url + "/v1/events", json=events, timeout=30).status_code == 200
            yield Node(srv.url, cluster)
    finally:
        cluster.stop()


def view(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/console/api/cluster", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_cluster_data_is_the_readyz_detail(node: Node) -> None:
    """The page's data is this node's cluster status, the very figures /readyz reports."""
    def settled(d: dict[str, Any]) -> bool:  # a check after the writes, with a quorum and three servers up
        return d["quorum"] and sum(bool(s["up"]) for s in d["servers"]) == 3 and max(
            p["last_offset"] for p in d["partitions"]) == 39

    deadline = time.monotonic() + 45
    while not settled(data := view(node.url)):
        assert time.monotonic() < deadline, f"no settled cluster check within 45 s; last: {data}"
        time.sleep(0.2)
    assert data["replicated"] is True and data["stale"] is False
    assert sorted(s["name"] for s in data["servers"]) == ["n0", "n1", "n2"]
    assert data["leader"] in {"n0", "n1", "n2"}
    assert len(data["partitions"]) == PARTITIONS
    assert data["stream_last_offset"] == 39 and data["applied_offset"] == 39 and data["consumer_lag"] == 0
    assert sum(p["last_offset"] >= 0 for p in data["partitions"]) > 1 and all(p["lag"] == 0 for p in data["partitions"])
    ready = httpx.get(node.url + "/readyz", timeout=10).json()["cluster"]
    skip = {"checked_s_ago", "servers"}  # a check may fall between the two requests (servers: seen_s_ago)
    assert data["node"] == "" and all(p.pop("holders") == [] and p["held"] for p in data["partitions"])  # no [cluster]
    assert {k: v for k, v in ready.items() if k not in skip} == {
        k: v for k, v in data.items() if k not in skip | {"replicated", "node"}}


def test_embedded_server_has_no_cluster(console: Console) -> None:
    """The embedded log has no cluster to report: the page's data says so, /readyz and /metrics have none."""
    r = httpx.get(console.url + "/console/api/cluster", headers={"X-API-Key": console.keys["viewer"]}, timeout=10)
    assert r.status_code == 200 and r.json() == {"replicated": False}
    assert httpx.get(console.url + "/console/api/cluster", timeout=10).status_code == 401  # keys are checked
    assert "cluster" not in httpx.get(console.url + "/readyz", timeout=10).json()
    metrics = httpx.get(console.url + "/metrics", headers={"X-API-Key": console.keys["admin"]}, timeout=10)
    assert metrics.status_code == 200 and "insession_log_offset" in metrics.text
    assert "insession_log_quorum" not in metrics.text


def test_cluster_metrics_on_a_replicated_log(node: Node) -> None:
    """The node's /metrics carries the insession_log_* gauges, one partition-lag series per partition."""
    text = httpx.get(node.url + "/metrics", timeout=10).text
    for name in ("insession_log_quorum", "insession_log_stale", "insession_log_consumer_lag",
                 "insession_log_stream_last_offset", "insession_log_server_up"):
        assert f"\n{name}" in text, name
    assert sum(line.startswith("insession_log_partition_lag{") for line in text.splitlines()) == PARTITIONS
    assert "\ninsession_log_exporting 1.0" in text  # its own history: it always exports


def test_cluster_page_follows_two_servers_down_and_back(node: Node, page: Any, screenshots: Path) -> None:
    """Servers, leader, quorum, partitions and lag on the page; two servers killed: quorum lost, reads
    stale, the two shown down, live without a reload; restarted: held and current again."""
    page.goto(node.url + "/console/cluster")
    expect(page.locator("#t-quorum")).to_have_text("held", timeout=45_000)
    expect(page.locator("#t-stale")).to_have_text("current")
    expect(page.locator("#servers tbody tr")).to_have_count(3)
    expect(page.locator("#partitions tbody tr")).to_have_count(PARTITIONS)
    served, held_by = page.locator('#partitions tr[data-partition="0"] td').nth(2), page.locator(
        '#partitions tr[data-partition="0"] td').nth(3)
    expect(served).to_have_text("yes")  # no [cluster]: this node holds every partition
    expect(held_by).to_have_text("every node")
    leader = view(node.url)["leader"]
    expect(page.locator("#t-leader")).to_have_text(f"leader {leader}")
    expect(page.locator(f'#servers tr[data-server="{leader}"] td').nth(1)).to_have_text("leader")
    expect(page.locator("#t-lag")).to_have_text("0")
    page.screenshot(path=str(screenshots / "console_cluster_jetstream.png"), full_page=True)

    down = [i for i in range(3) if f"n{i}" != leader][:1] + [int(leader.removeprefix("n"))]
    for i in down:
        node.cluster.kill(i)
    try:
        expect(page.locator("#t-quorum")).to_have_text("lost", timeout=45_000)
        expect(page.locator("#t-stale")).to_have_text("stale")
        expect(page.locator("#cluster-reason")).to_contain_text("writes")
        for i in down:
            expect(page.locator(f'#servers tr[data-server="n{i}"] td').first).to_have_text("no", timeout=15_000)
        expect(page.locator("#t-up")).to_have_text("1")
        page.screenshot(path=str(screenshots / "console_cluster_quorum_lost.png"), full_page=True)
        assert httpx.get(node.url + "/v1/features/user/u1", timeout=10).status_code == 200  # reads serve on
    finally:
        for i in down:
            node.cluster.restart(i, wait_leader=False)
    expect(page.locator("#t-quorum")).to_have_text("held", timeout=60_000)
    expect(page.locator("#t-stale")).to_have_text("current")
    expect(page.locator("#t-up")).to_have_text("3", timeout=15_000)
    expect(page.locator("#cluster-reason")).to_be_hidden()
    assert page.errors == []
