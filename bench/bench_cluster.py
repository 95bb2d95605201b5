"""Cluster benchmark: the replicated JetStream log next to the embedded SQLite log, in the same run.

Both behind the real server (`insession serve`, a child process), driven over keep-alive HTTP by separate
client processes (bench_ingest's clients): events/s and ack p50/p99/p99.9 for batches of 1, 100 and
1,000. Then, on the cluster: the write pause when the stream's leader is SIGKILLed (the longest gap
between two acknowledged single-event writes of one sequential client), and the catch-up rate (a node's
replay: reading the whole stream from offset 0, as a restarted node does). Last, two nodes that each
hold half the partitions (`[cluster] copies = 1`): `GET /v1/features/user/{id}` through one node for
shoppers it holds (read locally) and for shoppers the other holds (forwarded), open loop in the same
seconds, while ingest runs through both nodes. The three NATS servers, the insession servers and the
clients all share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
from tqdm import tqdm

from bench.bench_ingest import N_ITEMS, _wire, bench_http, make_events
from bench.common import Sample, http_request, open_loop, percentiles_ms, table
from insession.embedded import Insession
from insession.log import LogConfig
from insession.log.cluster import LocalCluster
from insession.log.jetstream import JetStreamLog
from insession.schema import partition_of
from insession.serve.config import config_from
from insession.serve.process import ServerProcess, free_port

STREAM = "INSESSION"


def _load_items(url: str) -> None:
    items = [{"item_id": f"i{i}", "category": f"c{i % 20}", "subcategory": f"sc{i % 150}", "price": 1.0 + i}
             for i in range(N_ITEMS)]
    httpx.put(url + "/v1/items", json=items, timeout=60).raise_for_status()


def _http_runs(port: int, plan: list[tuple[int, int, int]], label: str, progress: tqdm) -> list[dict]:
    out = []
    for batch, clients, reqs in plan:
        r = bench_http(port, batch, clients, reqs, uuid.uuid4().hex)
        r["name"] = label
        out.append(r)
        progress.update()
    return out


def leader_pause(port: int, cluster: LocalCluster, seconds: float) -> dict:
    """SIGKILL the stream leader while one client writes single events; the longest gap between acks."""
    acks: list[float] = []
    refused = 0
    stop = threading.Event()
    events = make_events(50_000, uuid.uuid4().hex)  # more than a sequential writer sends in the window
    enc = msgspec.json.Encoder()

    def writer() -> None:
        nonlocal refused
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for ev in events:
            if stop.is_set():
                break
            conn.request("POST", "/v1/events", body=enc.encode(_wire([ev])),
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                acks.append(time.monotonic())
            else:
                refused += 1
        conn.close()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(1.0)
    leader = cluster.stream_leader(STREAM)
    down = int(leader.removeprefix("n"))
    killed_at = time.monotonic()
    cluster.kill(down)
    time.sleep(seconds)
    stop.set()
    t.join()
    ended = time.monotonic()  # writes that never resumed count as paused until the window's end
    cluster.restart(down)
    after = [a for a in acks if a >= killed_at - 1.0] + [ended]
    gaps = [b - a for a, b in zip(after, after[1:], strict=False)]
    return {"leader": leader, "pause_s": max(gaps, default=float("nan")), "refused": refused,
            "acked_after": sum(a > killed_at for a in acks)}


def catch_up(cluster: LocalCluster, directory: Path) -> dict:
    """A restarted node's catch-up, twice: reading the whole stream from offset 0 through a fresh log handle
    (the log alone), and a node opened on an empty data directory, which replays the stream into its
    feature state before it is ready (what a node that lost its snapshot does; imports done beforehand)."""
    cfg = LogConfig(url=",".join(cluster.urls), monitor=",".join(cluster.monitor_urls))
    with JetStreamLog(cfg, directory / "reader") as log:
        t0 = time.perf_counter()
        n = sum(1 for _ in log.read(0))
        wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    node = Insession(directory / "node", log_config=cfg, maintenance_interval_s=None)
    node_wall = time.perf_counter() - t0
    applied = node.features.applied_offset + 1
    node.close()
    return {"events": n, "eps": n / wall, "node_events": applied, "node_eps": applied / node_wall}


FORWARD_USERS = 4_000
READ_RATE = 200  # reads/s of each kind (local, forwarded) through node a
INGEST_BATCHES = 10  # batches of 100 per second through each node: 2,000 events/s in all


def _node_config(path: Path, cluster: LocalCluster, nodes: list[str], me: str) -> Path:
    """A node's server config: the cluster's log (its own stream) with one history shared by the nodes (one
    exports it at a time, as docs/cluster.md advises for a cluster), and [cluster] with one copy per partition."""
    log = {"url": ",".join(cluster.urls), "monitor": ",".join(cluster.monitor_urls), "stream": "FORWARD",
           "history": str(path.parent / "history")}
    doc = {"log": log, "cluster": {"nodes": nodes, "node": me, "copies": 1}}
    config_from(doc)  # the same checks as the server's, before it starts
    path.write_text(msgspec.json.encode(doc).decode())
    return path


def forwarding(root: Path, seconds: float) -> dict[str, dict[str, float]]:
    """Reads through node a of shoppers it holds (local) and of shoppers node b holds (forwarded), at the same
    rate in the same seconds, while ingest (batches of 100) runs through both nodes. On a fresh cluster of
    its own: the one the other scenarios used is still catching a restarted server up."""
    root.mkdir(parents=True, exist_ok=True)
    with LocalCluster.on_free_ports(root / "nats") as cluster:
        return _forwarding(cluster, root, seconds)


def _forwarding(cluster: LocalCluster, root: Path, seconds: float) -> dict[str, dict[str, float]]:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = [ServerProcess(root / f"node-{n}", port=ports[n], extra_args=[
        "--config", str(_node_config(root / f"node-{n}.json", cluster, urls, urls[n]))]) for n in range(2)]
    held_a = config_from({"log": {"url": "nats://x:1"}, "cluster": {"nodes": urls, "node": urls[0], "copies": 1}}
                         ).cluster.held(16) or frozenset()
    users = [f"s{n}" for n in range(FORWARD_USERS)]
    local = [u for u in users if partition_of(u, 16) in held_a]
    remote = [u for u in users if partition_of(u, 16) not in held_a]
    events = make_events(20_000 + int(seconds * 2 * INGEST_BATCHES * 100), uuid.uuid4().hex)
    wire = [{**_wire([e])[0], "user_id": users[n % FORWARD_USERS]} for n, e in enumerate(events)]
    enc = msgspec.json.Encoder()
    with servers[0], servers[1]:
        for srv in servers:
            _load_items(srv.url)
        for start in range(0, 20_000, 1_000):  # every shopper has a history before the reads
            httpx.post(urls[start // 1_000 % 2] + "/v1/events", content=enc.encode(wire[start : start + 1_000]),
                       headers={"content-type": "application/json"}, timeout=60).raise_for_status()
        tail = wire[20_000:]

        def read(users: list[str]) -> Callable[[int], bytes]:
            return lambda i: http_request("GET", f"/v1/features/user/{users[i * 7919 % len(users)]}")

        def ingest(offset: int) -> Callable[[int], bytes]:
            return lambda i: http_request("POST", "/v1/events", enc.encode(tail[(2 * i + offset) * 100:][:100]))

        async def together() -> list[tuple[list[Sample], int]]:
            return list(await asyncio.gather(
                open_loop(ports[0], read(local), READ_RATE, seconds, "local reads"),
                open_loop(ports[0], read(remote), READ_RATE, seconds, "forwarded reads"),
                open_loop(ports[0], ingest(0), INGEST_BATCHES, seconds, "ingest via a"),
                open_loop(ports[1], ingest(1), INGEST_BATCHES, seconds, "ingest via b"),
            ))

        runs = asyncio.run(together())
    out = {}
    names = ("a: reads of its own shoppers", "a: reads forwarded to b", "a: ingest (batch 100)",
             "b: ingest (batch 100)")
    for name, (samples, late) in zip(names, runs, strict=True):
        latencies = [s.latency for s in samples]
        out[name] = {**percentiles_ms(latencies), "max": max(latencies) * 1000, "n": len(samples),
                     "failed": sum(s.status != 200 for s in samples), "late": late}
    return out


HEADERS = ["log", "batch", "clients", "events", "events/s", "ack p50 ms", "ack p99 ms", "ack p99.9 ms"]


def run(quick: bool) -> str:
    plan = [(1, 1, 500 if quick else 5_000), (1, 4, 250 if quick else 2_500), (100, 1, 50 if quick else 500),
            (100, 4, 25 if quick else 250), (1000, 1, 10 if quick else 100), (1000, 2, 5 if quick else 50),
            (1000, 4, 3 if quick else 40)]
    progress = tqdm(total=2 * len(plan) + 3, desc="bench_cluster", unit="scenario")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with ServerProcess(root / "embedded") as srv:
            _load_items(srv.url)
            rows += _http_runs(srv.port, plan, "embedded (SQLite, 1 machine)", progress)
        cluster = LocalCluster.on_free_ports(root / "nats")
        cluster.start()
        try:
            config = root / "server.toml"
            urls, monitors = ",".join(cluster.urls), ",".join(cluster.monitor_urls)
            config.write_text(f'[log]\nurl = "{urls}"\nmonitor = "{monitors}"\n')
            with ServerProcess(root / "clustered", extra_args=["--config", str(config)]) as srv:
                _load_items(srv.url)
                rows += _http_runs(srv.port, plan, "JetStream, 3 servers, R3", progress)
                pause = leader_pause(srv.port, cluster, 4.0 if quick else 10.0)
                progress.update()
            rate = catch_up(cluster, root / "catch-up")
            progress.update()
        finally:
            cluster.stop()
        forwarded = forwarding(root / "forwarding", 5.0 if quick else 30.0)
        progress.update()
    progress.close()

    def cell(r: dict) -> list[object]:
        return [r["name"], r["batch"], r["callers"], r["events"], r["eps"], r["p50"], r["p99"], r["p99.9"]]

    js = [r for r in rows if r["name"].startswith("JetStream")]
    best_1000 = max(r["eps"] for r in js if r["batch"] == 1000)
    single = next(r for r in js if r["batch"] == 1 and r["callers"] == 1)
    return "\n".join([
        "## Cluster: the replicated log (NATS JetStream, 3 servers) next to the embedded log"
        + (" (quick run)" if quick else ""),
        "",
        "`insession serve` over HTTP, separate client processes with one keep-alive connection each; the cluster "
        "is three `nats-server` processes on this machine with `sync_interval: always` (an ack means on 2 of 3, "
        "fsynced). Batches of 2..1,000 are one atomic batch publish.",
        "",
        table(HEADERS, [cell(r) for r in rows]),
        "",
        f"Stream leader ({pause['leader']}) SIGKILLed under a single-event writer: longest write pause "
        f"{pause['pause_s']:.2f} s, {pause['refused']} writes refused, {pause['acked_after']} acknowledged after the "
        f"kill. Catch-up from offset 0: reading the stream {rate['eps']:,.0f} events/s over {rate['events']:,} events; "
        f"a node opened on an empty data directory, replaying it into its feature state until ready, "
        f"{rate['node_eps']:,.0f} events/s over {rate['node_events']:,} events.",
        "",
        f"Targets: batch 1,000 into the replicated stream {best_1000:,.0f} events/s (target >= 50,000); single "
        f"events p99 {single['p99']:.2f} ms (target < 5 ms); leader-loss pause {pause['pause_s']:.2f} s "
        "(target < 5 s); "
        f"catch-up {rate['eps']:,.0f} events/s read, {rate['node_eps']:,.0f} events/s into a node's state "
        "(target >= 100,000).",
        "",
        f"Two nodes holding half the partitions each (`[cluster] copies = 1`), {FORWARD_USERS:,} shoppers: "
        f"`GET /v1/features/user/{{id}}` through node a at {READ_RATE}/s for shoppers it holds and {READ_RATE}/s for "
        f"shoppers node b holds (forwarded to b over HTTP, with the offset a had applied), open loop in the same "
        f"seconds, while {2 * INGEST_BATCHES * 100:,} events/s are ingested (batches of 100, half through each node) "
        "and one of the nodes exports the shared history every 50,000 events:",
        "",
        table(["requests through", "n", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "failed"],
              [[name, r["n"], r["p50"], r["p99"], r["p99.9"], r["max"], r["failed"]]
               for name, r in forwarded.items()]),
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds, for smoke runs)")
    print(run(ap.parse_args().quick))


if __name__ == "__main__":
    main()
