"""Ingest benchmark: durable throughput and ack latency of the event log, in-process and over HTTP.

In one run: the group-committed log (WAL, synchronous=FULL) for batch sizes 1, 100, 1000 and for many
concurrent single-event callers; the same events with fsync off (synchronous=OFF: the ceiling); SQLite
with one transaction per event and a plain row insert (the naive way, also WAL + FULL); and the real
server (`insession serve`, a child process) driven by separate client processes over keep-alive HTTP.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import queue
import random
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
from tqdm import tqdm

from bench.common import percentiles_ms, table
from insession.log.eventlog import EventLog
from insession.schema import Event
from insession.serve.process import ServerProcess

ACTIONS = ("view", "view", "view", "view", "add_to_cart", "purchase", "search", "favorite")
N_ITEMS = 2_000


def make_events(n: int, prefix: str, seed: int = 7, ids: str = "ordered") -> list[Event]:
    """Seeded, realistic-sized events with unique event ids, so de-duplication is always exercised.

    ids="ordered": time-ordered ids (like UUIDv7/ULID: a run prefix and a zero-padded counter), which
    land at the right edge of the idempotency index; "random": random UUIDs (like UUIDv4), anywhere in it.
    """
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        item = rng.randrange(N_ITEMS)
        eid = f"{prefix}-{i:012d}" if ids == "ordered" else str(uuid.UUID(int=rng.getrandbits(128)))
        out.append(Event(
            user_id=f"u{rng.randrange(5_000)}", item_id=f"i{item}", action=rng.choice(ACTIONS),
            ts=now - rng.randrange(86_400_000), event_id=eid, session_id=f"s{rng.randrange(20_000)}",
            surface=rng.choice(("home", "search", "pdp", "cart")),
            properties={"position": rng.randrange(60)} if i % 4 == 0 else None,
            category=f"c{item % 20}", subcategory=f"sc{item % 150}", ingest_ts=now,
        ))
    return out


def _result(name: str, batch: int, callers: int, n: int, wall_s: float, lat: list[float]) -> dict[str, Any]:
    return {"name": name, "batch": batch, "callers": callers, "events": n, "eps": n / wall_s,
            **percentiles_ms(lat)}


def bench_log(name: str, events: list[Event], batch: int, callers: int = 1,
              synchronous: str = "FULL") -> dict:
    """Append `events` in batches from `callers` threads to a fresh log; per-append ack latency."""
    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "log.sqlite", synchronous=synchronous)
        batches = [events[i : i + batch] for i in range(0, len(events), batch)]
        lat: list[list[float]] = [[] for _ in range(callers)]

        def caller(c: int) -> None:
            for b in batches[c::callers]:
                t = time.perf_counter()
                log.append(b)
                lat[c].append(time.perf_counter() - t)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        assert log.count() == len(events)
        log.close()
    return _result(name, batch, callers, len(events), wall, [x for c in lat for x in c])


def bench_naive(events: list[Event]) -> dict:
    """One SQLite transaction per event, a plain row per event (WAL, synchronous=FULL)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "naive.sqlite", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, event_id TEXT UNIQUE, user_id TEXT, "
                     "item_id TEXT, action TEXT, ts INTEGER, session_id TEXT, surface TEXT, properties TEXT, "
                     "category TEXT, subcategory TEXT, ingest_ts INTEGER)")
        sql = "INSERT INTO events VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        lat = []
        t0 = time.perf_counter()
        for e in events:
            t = time.perf_counter()
            conn.execute("BEGIN")
            props = msgspec.json.encode(e.properties).decode()
            conn.execute(sql, (e.event_id, e.user_id, e.item_id, e.action, e.ts, e.session_id, e.surface,
                               props, e.category, e.subcategory, e.ingest_ts))
            conn.execute("COMMIT")
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        conn.close()
    return _result("naive: SQLite, 1 transaction/event", 1, 1, len(events), wall, lat)


# -- HTTP --------------------------------------------------------------------------------------


def _wire(events: list[Event]) -> list[dict[str, Any]]:
    keep = ("user_id", "item_id", "action", "ts", "event_id", "session_id", "surface", "properties")
    return [{k: getattr(e, k) for k in keep if getattr(e, k) is not None} for e in events]


def _http_client(port: int, bodies: list[bytes], batch: int, warmup: int, ready: Any, out: Any) -> None:
    """One client process, one keep-alive connection (stdlib http.client: the least client overhead),
    sequential requests; sends back (start, end, latencies)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}

    def post(body: bytes) -> None:
        conn.request("POST", "/v1/events", body=body, headers=headers)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        if resp.status != 200 or doc["stored"] + doc["duplicates"] != batch:
            raise RuntimeError(f"HTTP {resp.status}: {doc}")

    for body in bodies[:warmup]:
        post(body)
    ready.wait()  # all clients start the timed part together
    lat = []
    start = time.time()
    for body in bodies[warmup:]:
        t = time.perf_counter()
        post(body)
        lat.append(time.perf_counter() - t)
    out.put((start, time.time(), lat))
    conn.close()


def bench_http(port: int, batch: int, clients: int, requests_per_client: int, prefix: str) -> dict:
    warmup = max(2, requests_per_client // 20)
    per = requests_per_client + warmup
    events = make_events(per * clients * batch, prefix)
    enc = msgspec.json.Encoder()
    bodies = [enc.encode(_wire(events[i : i + batch])) for i in range(0, len(events), batch)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shares = [bodies[c * per : (c + 1) * per] for c in range(clients)]
    ready = ctx.Barrier(clients)
    procs = [ctx.Process(target=_http_client, args=(port, share, batch, warmup, ready, out))
             for share in shares]
    for p in procs:
        p.start()
    parts: list[tuple[float, float, list[float]]] = []
    while len(parts) < clients:
        try:
            parts.append(out.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                ready.abort()
                raise RuntimeError("an HTTP client process failed (see its traceback above)") from None
    for p in procs:
        p.join()
    wall = max(e for _, e, _ in parts) - min(s for s, _, _ in parts)
    lat = [x for _, _, ls in parts for x in ls]
    return _result("HTTP POST /v1/events", batch, clients, len(lat) * batch, wall, lat)


# -- report ------------------------------------------------------------------------------------


def _rows(results: list[dict], baseline: dict) -> list[list[object]]:
    return [[r["name"], r["batch"], r["callers"], r["events"], r["eps"], r["p50"], r["p99"], r["p99.9"],
             f"{r['eps'] / baseline['eps']:.1f}x"] for r in results]


HEADERS = ["setup", "batch", "callers", "events", "events/s", "ack p50 ms", "ack p99 ms", "ack p99.9 ms",
           "vs naive"]


def run(quick: bool) -> str:
    # events per scenario (batch size -> events); quick keeps every scenario to a second or two
    sizes = {1: 1_000, 100: 20_000, 1000: 100_000} if quick else {1: 10_000, 100: 200_000, 1000: 1_000_000}
    # (label, batch, concurrent callers, synchronous, event ids); the same events for durable and fsync off
    plan = [(f"{label}, batch {b}", b, 1, sync, "ordered") for b in sizes
            for label, sync in (("durable", "FULL"), ("fsync off (ceiling)", "OFF"))]
    plan += [("durable, batch 1, 16 concurrent callers", 1, 16, "FULL", "ordered"),
             ("durable, batch 1000, random UUID ids", 1000, 1, "FULL", "random")]
    http_plan = [(1, 1, 1_000 if quick else 10_000), (1, 4, 500 if quick else 5_000),
                 (100, 1, 100 if quick else 1_000), (100, 4, 50 if quick else 500),
                 (1000, 1, 20 if quick else 200), (1000, 2, 10 if quick else 100)]
    progress = tqdm(total=1 + len(plan) + len(http_plan), desc="bench_ingest", unit="scenario")

    naive = bench_naive(make_events(sizes[1], "run"))
    progress.update()
    inproc = []
    for name, b, callers, sync, ids in plan:
        n = sizes[b] * (4 if callers > 1 else 1)
        inproc.append(bench_log(name, make_events(n, "run", ids=ids), b, callers, sync))
        progress.update()

    http = []
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "data") as srv:
        items = [{"item_id": f"i{i}", "category": f"c{i % 20}", "subcategory": f"sc{i % 150}",
                  "price": 1.0 + i} for i in range(N_ITEMS)]
        httpx.put(srv.url + "/v1/items", json=items, timeout=60).raise_for_status()
        for b, clients, reqs in http_plan:
            http.append(bench_http(srv.port, b, clients, reqs, uuid.uuid4().hex))
            progress.update()
    progress.close()

    def best(rs: list[dict], batch: int) -> float:
        return max(r["eps"] for r in rs if r["batch"] == batch)

    durable_1000 = next(r for r in inproc if r["name"] == "durable, batch 1000")
    single_http = next(r for r in http if r["batch"] == 1 and r["callers"] == 1)
    return "\n".join([
        "## Ingest: the durable event log" + (" (quick run)" if quick else ""),
        "",
        "Acknowledged means fsynced: SQLite WAL with synchronous=FULL; group commit puts every batch waiting "
        "at that moment into one transaction (one fsync). Ack latency is per append call (per HTTP request "
        "below). Reference points in the same run: the same log with fsync off (the ceiling) and SQLite with "
        "one transaction per event (the naive way).",
        "",
        "### In-process (`EventLog.append`)",
        "",
        table(HEADERS, _rows([naive, *inproc], naive)),
        "",
        "### Over HTTP (`insession serve`; separate client processes, one keep-alive connection each)",
        "",
        table(HEADERS, _rows(http, naive)),
        "",
        f"Targets: durable in-process, batch 1000: {durable_1000['eps']:,.0f} events/s (target >= 100,000); "
        f"HTTP: {max(best(http, 100), best(http, 1000)):,.0f} events/s at best (target >= 20,000); "
        f"single events over HTTP, one client: p99 {single_http['p99']:.2f} ms (target < 2 ms).",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI and smoke tests)")
    print(run(ap.parse_args().quick))


if __name__ == "__main__":
    main()
