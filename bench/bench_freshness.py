"""Event-to-visible freshness through the HTTP API: from sending an event to reading a feature that shows it."""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.common import percentiles_ms, table
from insession.serve.process import ServerProcess

START_MS = 1_790_000_000_000


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> dict:
    conn.request(method, path, body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data[:200]!r}")
    return json.loads(data)


def measure(url: str, n: int) -> tuple[list[float], list[float], int]:
    """For each of n events: (send -> ack) and (send -> first read showing it); count of reads needed > 1."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    _request(conn, "PUT", "/v1/items", json.dumps(
        [{"item_id": f"f{i}", "category": f"c{i % 40}"} for i in range(1000)]).encode())
    acks, visible, extra_reads = [], [], 0
    for i in tqdm(range(n), desc="freshness", unit=" ev", leave=False):
        user, item = f"u{i % 200}", f"f{i % 1000}"
        body = json.dumps({"user_id": user, "item_id": item, "action": "view", "ts": START_MS + i * 1000}).encode()
        t0 = time.perf_counter()
        _request(conn, "POST", "/v1/events", body)
        acks.append(time.perf_counter() - t0)
        while True:
            seq = _request(conn, "GET", f"/v1/features/user/{user}")["features"]["session_seq"]
            if seq and seq[-1]["item_id"] == item and seq[-1]["ts"] == START_MS + i * 1000:
                break
            extra_reads += 1
        visible.append(time.perf_counter() - t0)
    conn.close()
    return acks, visible, extra_reads


def run(quick: bool) -> str:
    n = 500 if quick else 5_000
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "data") as server:
        measure(server.url, 100)  # warm-up
        acks, visible, extra = measure(server.url, n)
    a, v = percentiles_ms(acks), percentiles_ms(visible)
    rows = [["ingest ack (POST /v1/events, 1 event)", a["p50"], a["p99"], a["p99.9"]],
            ["event -> visible in session_seq (POST + GET /v1/features)", v["p50"], v["p99"], v["p99.9"]]]
    return "\n".join([
        "## Freshness: event to visible feature, through the HTTP API",
        "",
        f"{n:,} single events from one client over one keep-alive connection on loopback; after each ack the "
        "client reads `GET /v1/features/user/{user}` until `session_seq` ends with that event.",
        "",
        table(["measure", "p50 ms", "p99 ms", "p99.9 ms"], rows),
        "",
        f"Reads that did not yet show the event: {extra} of {n:,} (features are updated after the fsync and "
        "before the ack, so the first read after an ack must show it). Target: freshness p99 < 100 ms.",
    ])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    print(run(ap.parse_args().quick))
