"""Benchmark of the query lanes: serving-lane feature selects over HTTP, alone and beside heavy analytics.

A data directory is loaded through the embedded API (catalogue, events, Parquet history), the server is
started as a user would (`python -m insession.cli serve`), and a client in a second process sends
`top_categories_15d` selects at a fixed rate (open loop, over a pool of keep-alive connections, so a
slow answer never delays the next request; sends the client itself could not make on time are
counted). The
same run is then repeated while two threads of the benchmark process keep two full-scan analytics
queries running against the server the whole time.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.bench_features import N_CATEGORIES, N_ITEMS, synthetic_events
from bench.common import CONNECTIONS, latency_histogram, paced, percentiles_ms, table
from insession.serve.process import ServerProcess

SERVING_SQL = (
    "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
    "ORDER BY ts DESC LIMIT 5"
)
ANALYTICS_SQL = (
    "SELECT user_id, count(*) AS n, count(DISTINCT item_id) AS items, max(ts) AS last FROM events "
    "GROUP BY user_id ORDER BY n DESC LIMIT 10",
    "SELECT category, action, count(*) AS n, avg(epoch_ms(ts)) AS mean_ts FROM events GROUP BY ALL "
    "ORDER BY n DESC LIMIT 20",
)
RATE = 500  # requests per second


def load(data_dir: Path, n_users: int, per_user: int) -> None:
    """Catalogue, events (through the embedded API: log, features) and the Parquet history into data_dir."""
    import insession

    db = insession.open(data_dir, maintenance_interval_s=None)
    try:
        items = [{"item_id": f"i{i}", "category": f"c{i % N_CATEGORIES}"} for i in range(N_ITEMS)]
        for start in range(0, len(items), 10_000):
            db.insert("items", items[start : start + 10_000])
        with tqdm(total=n_users * per_user, desc="load events", unit="ev", leave=False) as bar:
            for chunk in synthetic_events(n_users, per_user):
                db.insert_events(chunk)
                bar.update(len(chunk))
        db.export()
    finally:
        db.close()


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    conn.request("POST", "/v1/query", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read(), dict(resp.getheaders())


def _serving_client(port: int, users: list[str], rate: float, seconds: float, out: Connection) -> None:
    """Second process: paced feature selects; sends back what `paced` measured."""
    bodies = [json.dumps({"sql": SERVING_SQL, "params": {"user": u}}).encode() for u in users]
    out.send(asyncio.run(paced(port, "/v1/query", bodies, rate, seconds)))
    out.close()


def _serve_phase(port: int, users: list[str], seconds: float) -> tuple[list[float], int, int, float]:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_serving_client, args=(port, users, RATE, seconds, send))
    proc.start()
    send.close()  # the child's end only: recv() raises EOFError if the client dies
    latencies, errors, late, elapsed = recv.recv()
    proc.join()
    return latencies, errors, late, len(latencies) / elapsed


class _Analytics(threading.Thread):
    """Keeps one heavy analytics query running against the server until stopped."""

    def __init__(self, port: int, sql: str) -> None:
        super().__init__(daemon=True)
        self.port, self.body = port, json.dumps({"sql": sql}).encode()
        self.stop = threading.Event()
        self.done: list[float] = []
        self.refused = self.failed = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        while not self.stop.is_set():
            t0 = time.perf_counter()
            status, _, headers = _post(conn, self.body)
            if status == 200:
                self.done.append(time.perf_counter() - t0)
            elif status == 429:
                self.refused += 1
                time.sleep(float(headers.get("Retry-After", headers.get("retry-after", "1"))))
            else:
                self.failed += 1


def run(quick: bool) -> str:
    n_users, per_user, seconds = (4_000, 50, 5.0) if quick else (100_000, 100, 60.0)
    n_events = n_users * per_user
    print(f"bench_query: loading {n_events:,} events")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        load(data_dir, n_users, per_user)
        server = ServerProcess(data_dir, ready_timeout_s=300).start()
        port = server.port
        try:
            users = [f"u{i}" for i in range(0, n_users, max(1, n_users // 1000))]
            print("bench_query: warm-up")
            _serve_phase(port, users, 1.0 if quick else 5.0)
            print(f"bench_query: serving alone, {RATE} req/s for {seconds:g} s")
            lat_alone, err_alone, late_alone, rate_alone = _serve_phase(port, users, seconds)
            scans = [_Analytics(port, sql) for sql in ANALYTICS_SQL]
            for s in scans:
                s.start()
            time.sleep(1.0)  # both scans admitted (one runs, one waits, with the default limits)
            print(f"bench_query: serving beside {len(scans)} continuous analytics scans")
            lat_busy, err_busy, late_busy, rate_busy = _serve_phase(port, users, seconds)
            for s in scans:
                s.stop.set()
            for s in scans:
                s.join(600)
        finally:
            server.stop()
    scans_done = [t for s in scans for t in s.done]
    alone, busy = percentiles_ms(lat_alone), percentiles_ms(lat_busy)
    ratio = busy["p99"] / alone["p99"]
    rows: list[list[Any]] = [
        [phase, f"{rate:.0f}", p["p50"], p["p99"], p["p99.9"], p["mean"], errors, late]
        for phase, rate, p, errors, late in (
            ("serving alone", rate_alone, alone, err_alone, late_alone),
            ("serving + 2 analytics scans", rate_busy, busy, err_busy, late_busy),
        )
    ]
    scan_ms = percentiles_ms(scans_done) if scans_done else None
    return "\n".join(
        [
            "## Query lanes: serving-lane selects beside analytics (HTTP, loopback)",
            "",
            f"`top_categories_15d` selects (`{SERVING_SQL}`) from a second process at {RATE} req/s for "
            f"{seconds:g} s per phase over {CONNECTIONS} keep-alive connections (open loop: a slow answer never "
            f"delays the next send; latency from when the request was due to its full answer; late sends are "
            f"counted); {n_events:,} events "
            f"({n_users:,} users) in the Parquet history. Analytics: two full scans kept running continuously "
            "(per-user and per-category aggregates over every event) on the analytics lane's default limits. "
            "No ingest and no snapshot run during the measurement (an idle server but for the analytics scans): "
            "`bench_mixed` measures reads while ingest, snapshots and analytics run together.",
            "",
            table(
                ["phase", "achieved req/s", "p50 ms", "p99 ms", "p99.9 ms", "mean ms", "errors", "sends > 1 ms late"],
                rows,
            ),
            "",
            f"p99 with analytics / p99 alone: **{ratio:.2f}x** (target <= 1.5x); targets alone: p99 < 2.5 ms, "
            "p99.9 < 10 ms.",
            "",
            f"Analytics scans completed during the busy phase: {len(scans_done)}"
            + (f" (p50 {scan_ms['p50'] / 1000:.2f} s each)" if scan_ms else "")
            + f"; refused with 429: {sum(s.refused for s in scans)}; failed: {sum(s.failed for s in scans)}.",
            "",
            latency_histogram("bench_query_serving", "Serving-lane selects, alone and beside analytics",
                              {"serving alone": lat_alone, "serving + 2 analytics scans": lat_busy}),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200k events, 5 s per phase")
    args = parser.parse_args()
    print(run(args.quick))


if __name__ == "__main__":
    main()
