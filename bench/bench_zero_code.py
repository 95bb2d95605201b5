"""Benchmark of zero-code features: a backfill over the whole history while serving, and batch reads.

One `insession serve` holds a shop (full size: 500,000 shoppers x 20 events = 10 million events over
50,000 items, loaded as bench_mixed loads it and cached the same way). A client process keeps a steady
load open loop: ingest (2,000 events/s in batches of 20) and `GET /v1/features/user/{id}` (300/s).

1. Baseline: the load alone for a while.
2. Backfill: `CREATE FEATURE` of a new shopper feature (distinct top-5 subcategories viewed in 7 days, in
   hourly tiles) through POST /v1/query; the same load goes on until DESCRIBE says it serves. Backfill
   throughput = history events / seconds until served; serving-lane latency is compared with the
   baseline's (the issue's target: p99 within 1.5x).
3. Batch reads, load stopped: closed loop, the server's CPU time (/proc/<pid>/stat) per key for reads of
   1 key (GET /v1/features/user/{id}, the baseline), and of 10 and 100 keys (POST /v1/features), with
   every shopper feature and with one.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from bench.bench_mixed import cached_shop
from bench.common import Sample, http_request, open_loop, percentiles_ms, table
from insession.serve.process import ServerProcess

INGEST_RATE, BATCH, READ_RATE = 100, 20, 300
FEATURE_SQL = ("CREATE FEATURE subcats_7d AS SELECT user_id, distinct_topk(subcategory, 5) FROM events "
               "WHERE action = 'view' AND ts > now() - INTERVAL '7' DAY "
               "GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)")
TARGET_RATIO = 1.5
CHUNK_S = 10.0


def _load(port: int, n_users: int, start_ts: int, seconds: float, seed: int, out: Connection) -> None:
    """Client process: ingest and feature reads, open loop, for `seconds`; sends back both sample lists."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, int(seconds * (READ_RATE + INGEST_RATE * BATCH)) + 1)

    def ingest(i: int) -> bytes:
        ts = start_ts + int(i * 1000 / INGEST_RATE)
        body = json.dumps([{"user_id": f"u{users[i * BATCH + k]}", "item_id": f"i{(i * BATCH + k) % 50_000}",
                            "action": "view", "ts": ts + k} for k in range(BATCH)]).encode()
        return http_request("POST", "/v1/events", body)

    def read(i: int) -> bytes:
        return http_request("GET", f"/v1/features/user/u{users[-1 - i]}")

    async def both() -> list[tuple[list[Sample], int]]:
        return list(await asyncio.gather(open_loop(port, ingest, INGEST_RATE, seconds, "ingest"),
                                          open_loop(port, read, READ_RATE, seconds, "features")))

    (ing, _), (reads, _) = asyncio.run(both())
    out.send({"ingest": ing, "features": reads})
    out.close()


def _run_load(port: int, n_users: int, start_ts: int, seconds: float, seed: int) -> dict[str, list[Sample]]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load, args=(port, n_users, start_ts, seconds, seed, send))
    proc.start()
    send.close()
    got: dict[str, list[Sample]] = recv.recv()
    proc.join()
    return got


def _control(port: int, method: str, path: str, body: object | None = None) -> dict:
    """One control request on its own connection (an idle keep-alive one is closed by the server)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        return _call(conn, method, path, body)
    finally:
        conn.close()


def _call(conn: http.client.HTTPConnection, method: str, path: str, body: object | None = None) -> dict:
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{method} {path}: {resp.status} {data[:300]!r}")
    return json.loads(data)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_reads(port: int, pid: int, n_users: int, quick: bool) -> list[list[object]]:
    """(read, keys per request, requests, server CPU µs per key, per request, p50/p99 ms) rows."""
    rng = np.random.default_rng(11)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    rows = []
    total_keys = 2_000 if quick else 20_000
    for label, per, names in (("GET /v1/features/user/{id}", 1, None),
                              ("POST /v1/features, every user feature", 10, None),
                              ("POST /v1/features, every user feature", 100, None),
                              ("POST /v1/features, top_categories_15d", 10, ["top_categories_15d"]),
                              ("POST /v1/features, top_categories_15d", 100, ["top_categories_15d"])):
        n = total_keys // per
        keys = [[f"u{u}" for u in rng.integers(0, n_users, per)] for _ in range(n)]
        lat = []
        cpu0 = _cpu_s(pid)
        for ks in keys:
            t = time.perf_counter()
            if per == 1:
                _call(conn, "GET", f"/v1/features/user/{ks[0]}")
            else:
                _call(conn, "POST", "/v1/features", {"entity": "user", "keys": ks, "features": names})
            lat.append(time.perf_counter() - t)
        cpu = _cpu_s(pid) - cpu0
        p = percentiles_ms(lat)
        rows.append([label, per, n, 1e6 * cpu / (n * per), 1e6 * cpu / n, p["p50"], p["p99"]])
    conn.close()
    return rows


def run(quick: bool) -> str:
    n_users, per_user, base_s = (20_000, 20, 15.0) if quick else (500_000, 20, 60.0)
    cache = cached_shop(n_users, per_user)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        shutil.copytree(cache, data_dir)
        server = ServerProcess(data_dir, ready_timeout_s=3600).start()
        assert server.proc is not None
        try:
            ready = _control(server.port, "GET", "/readyz")
            history = int(ready["watermark"])  # event time of the newest loaded event
            start_ts, n_history = history + 60_000, n_users * per_user
            print(f"bench_zero_code: baseline load for {base_s:.0f} s", flush=True)
            baseline = _run_load(server.port, n_users, start_ts, base_s, seed=1)
            start_ts += int(base_s * 1000) + 1000
            t0 = time.perf_counter()
            _control(server.port, "POST", "/v1/query", {"sql": FEATURE_SQL, "params": {}})
            during: dict[str, list[Sample]] = {"ingest": [], "features": []}
            progress = []
            chunk = 0
            while True:
                got = _run_load(server.port, n_users, start_ts, CHUNK_S, seed=2 + chunk)
                for kind, samples in got.items():
                    during[kind] += [Sample(s.due + chunk * CHUNK_S, s.latency, s.status) for s in samples]
                start_ts += int(CHUNK_S * 1000)
                chunk += 1
                desc = dict(_control(server.port, "POST", "/v1/query",
                                     {"sql": "DESCRIBE FEATURE subcats_7d", "params": {}})["rows"])
                progress.append((round(time.perf_counter() - t0), desc.get("status"), desc.get("progress")))
                print(f"bench_zero_code: {progress[-1]}", flush=True)
                if desc["status"] != "backfilling":
                    break
            served_s = time.perf_counter() - t0
            status = desc["status"]
            batch = _batch_reads(server.port, server.proc.pid, n_users, quick)
        finally:
            server.stop()
    return _report(baseline, during, served_s, status, n_history, batch, n_users, per_user, progress)


def _stats(samples: list[Sample]) -> dict[str, float]:
    p = percentiles_ms([s.latency for s in samples])
    return {**p, "max": 1000 * max(s.latency for s in samples), "errors": sum(s.status >= 400 for s in samples)}


def _report(baseline: dict[str, list[Sample]], during: dict[str, list[Sample]], served_s: float, status: str,
            n_history: int, batch: list[list[object]], n_users: int, per_user: int,
            progress: list[tuple[int, str, str]]) -> str:
    rows, ratio = [], {}
    for kind in ("features", "ingest"):
        b, d = _stats(baseline[kind]), _stats(during[kind])
        ratio[kind] = d["p99"] / b["p99"]
        for label, s in (("baseline", b), ("during backfill", d)):
            rows.append([kind, label, s["n"], s["p50"], s["p99"], s["p99.9"], s["max"], s["errors"]])
    verdict = "met" if ratio["features"] <= TARGET_RATIO else "NOT met"
    lines = [
        "## Zero-code features: backfill while serving, batch reads",
        "",
        f"{n_users:,} shoppers x {per_user} events = {n_history:,} history events. Load during both phases: "
        f"ingest {INGEST_RATE * BATCH:,} events/s and {READ_RATE} feature reads/s, open loop from a second "
        f"process. The backfill (`{FEATURE_SQL}`) ran in a child process of the server and was served "
        f"(status `{status}`) after **{served_s:.0f} s: {n_history / served_s:,.0f} history events/s** (plus "
        "the log tail written meanwhile).",
        "",
        table(["stream", "phase", "requests", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"], rows),
        "",
        f"Feature-read p99 during the backfill / baseline: **{ratio['features']:.2f}x** (target <= {TARGET_RATIO}x: "
        f"{verdict}); ingest {ratio['ingest']:.2f}x.",
        "",
        "Backfill progress as DESCRIBE FEATURE showed it (seconds after CREATE, status, progress): "
        + "; ".join(f"{t} s {s} {p or ''}".strip() for t, s, p in progress),
        "",
        "Batch reads, load stopped, one client connection, closed loop (server CPU from /proc, HTTP included):",
        "",
        table(["read", "keys/request", "requests", "server CPU µs/key", "server CPU µs/request", "p50 ms",
               "p99 ms"], batch),
    ]
    return "\n".join(lines)
