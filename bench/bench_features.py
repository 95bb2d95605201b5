"""Benchmark of the feature engine: online throughput, memory per user, online read vs DuckDB on demand."""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Iterator

import duckdb
import numpy as np
from tqdm import tqdm

from bench.common import percentiles_ms, table
from insession.features import FeatureEngine, FeatureRegistry, default_registry
from insession.log.export import events_to_arrow
from insession.schema import ACTIONS, Event

T0 = 1_500_000_000_000  # 2017: the engine runs on event time
N_ITEMS = 50_000
N_CATEGORIES = 200
_ACTION_P = np.array([0.80, 0.10, 0.02, 0.03, 0.03, 0.02])


def synthetic_events(n_users: int, per_user: int, seed: int = 7, chunk: int = 50_000) -> Iterator[list[Event]]:
    """Chunks of events in offset order: users in sessions of ~8 events a minute apart, sessions hours
    apart, Zipf item popularity, 80% views, 2% of events up to 4 minutes late (within the lateness)."""
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    users = np.repeat(np.arange(n_users), per_user)
    rank = np.tile(np.arange(per_user), n_users)  # each user's k-th event: session k // 8, position k % 8
    user_start = rng.integers(0, 30 * 86_400_000, n_users)
    ts = user_start[users] + (rank // 8) * rng.integers(3_600_000, 72_000_000, n) + (rank % 8) * 60_000
    order = np.argsort(ts, kind="stable")  # the stream arrives roughly in event time ...
    ts = ts[order] + T0
    users = users[order]
    late = rng.random(n) < 0.02  # ... with a few events late by up to 4 minutes
    ts[late] -= rng.integers(0, 240_000, int(late.sum()))
    items = np.minimum(rng.zipf(1.3, n), N_ITEMS) - 1
    cats = items % N_CATEGORIES
    actions = rng.choice(len(ACTIONS), n, p=_ACTION_P)
    for start in range(0, n, chunk):
        yield [
            Event(f"u{u}", f"i{i}", ACTIONS[a], int(t), category=f"c{c}", offset=start + k)
            for k, (u, i, a, t, c) in enumerate(
                zip(
                    *(col[start : start + chunk].tolist() for col in (users, items, actions, ts, cats)),
                    strict=True,
                )
            )
        ]


def _throughput(n_users: int, per_user: int) -> tuple[float, float, int, FeatureEngine]:
    """Events/s through update_many in batches of 1,000: by wall clock and by this thread's CPU time."""
    engine = FeatureEngine(default_registry())
    total, wall, cpu = 0, 0.0, 0.0
    with tqdm(total=n_users * per_user, desc="online engine", unit="ev", leave=False) as bar:
        for chunk in synthetic_events(n_users, per_user):
            for start in range(0, len(chunk), 1000):
                batch = chunk[start : start + 1000]
                t, c = time.perf_counter(), time.thread_time()
                engine.update_many(batch)
                wall += time.perf_counter() - t
                cpu += time.thread_time() - c
            total += len(chunk)
            bar.update(len(chunk))
    return total / wall, total / cpu, total, engine


def _traced_bytes(registry: FeatureRegistry, n_users: int, per_user: int) -> tuple[int, int]:
    """(bytes the engine holds after the stream, bytes of covisit's per-user part when declared)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    engine = FeatureEngine(registry)
    for chunk in synthetic_events(n_users, per_user, seed=11):
        engine.update_many(chunk)
        del chunk
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    recent: dict[int, bytearray] = getattr(engine._stream.aggs.get("covisit"), "recent", {})
    recent_bytes = sys.getsizeof(recent) + sum(sys.getsizeof(b) for b in recent.values()) if recent else 0
    return used, recent_bytes


def _memory(n_users: int, per_user: int) -> tuple[float, int]:
    """(bytes per user, bytes of shared state): an engine with every feature minus one with only the
    item and global features, whose state is bounded by the catalogue and the tiles, not by the users;
    covisit's per-user part (each user's last few events) is added back to the per-user figure."""
    reg = default_registry()
    total, _ = _traced_bytes(reg, n_users, per_user)
    shared, recent = _traced_bytes(
        FeatureRegistry.of(f for f in reg if f.entity in ("item", "global")), n_users, per_user
    )
    return (total - shared + recent) / n_users, shared - recent


def _top_categories_latency(n_events: int, reads: int) -> tuple[dict[str, float], dict[str, float]]:
    per_user = 50
    n_users = max(n_events // per_user, 1)
    engine = FeatureEngine(default_registry())
    con = duckdb.connect()
    first = True
    for chunk in tqdm(
        synthetic_events(n_users, per_user, seed=3),
        desc="history",
        leave=False,
        total=-(-n_users * per_user // 50_000),
    ):
        engine.update_many(chunk)
        con.register("chunk", events_to_arrow(chunk))
        con.execute(
            "CREATE OR REPLACE TABLE events AS SELECT * FROM chunk"
            if first
            else "INSERT INTO events SELECT * FROM chunk"
        )
        first = False
    rng = np.random.default_rng(5)
    users = [f"u{u}" for u in rng.integers(0, n_users, reads)]
    wm = engine.watermark
    window_start = (wm // 3_600_000 - 15 * 24 + 1) * 3_600_000
    sql = """SELECT category FROM events
             WHERE user_id = $u AND action = 'view' AND category IS NOT NULL AND ts >= $lo AND ts <= $hi
             GROUP BY category ORDER BY max(ts) DESC, category LIMIT 5"""
    online, ondemand = [], []
    for u in tqdm(users, desc="reads", leave=False):
        t = time.perf_counter()
        a = engine.read("top_categories_15d", u)
        online.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = [r[0] for r in con.execute(sql, {"u": u, "lo": window_start, "hi": wm}).fetchall()]
        ondemand.append(time.perf_counter() - t)
        if a != b:
            raise AssertionError(f"online {a} != DuckDB {b} for {u}")
    return percentiles_ms(online), percentiles_ms(ondemand)


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    tp_users, tp_per_user = (10_000, 10) if quick else (200_000, 20)
    mem_users, mem_per_user = (10_000, 20) if quick else (1_000_000, 20)
    hist_events, reads = (200_000, 300) if quick else (10_000_000, 2_000)

    print(f"throughput: {tp_users * tp_per_user:,} events through the default feature set ...")
    rate_wall, rate_cpu, total, engine = _throughput(tp_users, tp_per_user)
    too_late = engine.too_late
    del engine
    print(f"  {rate_cpu:,.0f} events per CPU-second ({rate_wall:,.0f} per wall-clock second)")
    print(f"memory: {mem_users:,} users x {mem_per_user} events ...")
    per_user, shared = _memory(mem_users, mem_per_user)
    print(f"  {per_user:,.0f} bytes per user, {shared / 2**20:,.1f} MiB shared item/global state")
    print(f"top_categories_15d: online state vs DuckDB over {hist_events:,} raw events ...")
    on, dd = _top_categories_latency(hist_events, reads)
    print(f"  p50 {on['p50']:.4f} ms vs {dd['p50']:.3f} ms")

    scale = " Quick run: measured at the sizes shown; per-user state does not depend on the number of users."
    rows = [
        ["events/s through the online engine, per CPU-second of its one thread", f"{rate_cpu:,.0f}", ">= 50,000"],
        ["events/s by the wall clock (machine shared with other work)", f"{rate_wall:,.0f}", ""],
        ["events applied / too late (dropped)", f"{total:,} / {too_late:,}", ""],
        [
            f"memory per active user ({mem_users:,} users x {mem_per_user} events, tracemalloc)",
            f"{per_user:,.0f} B",
            "< 2,048 B at 1,000,000 users",
        ],
        [
            "shared item/global state (50,000-item catalogue; grows with items x tiles, not users)",
            f"{shared / 2**20:,.1f} MiB",
            "",
        ],
    ]
    ratio = ["ratio baseline / online", *(dd[p] / on[p] for p in ("p50", "p99", "p99.9", "mean"))]
    lines = [
        "## Feature engine",
        "",
        f"Default feature set ({len(default_registry().features)} features), one writer thread, synthetic Zipf"
        f" traffic in 2017 event time, 2% of events up to 4 min late.{scale if quick else ''}",
        "",
        table(["measure", "value", "target"], rows),
        "",
        f"`top_categories_15d` for one user ({reads:,} random users): the online state vs the same answer"
        f" computed on demand by DuckDB (in-memory table) over {hist_events:,} raw events; answers checked equal.",
        "",
        table(
            ["path", "p50 ms", "p99 ms", "p99.9 ms", "mean ms"],
            [
                ["online state (FeatureEngine.read)", on["p50"], on["p99"], on["p99.9"], on["mean"]],
                ["DuckDB on demand (baseline)", dd["p50"], dd["p99"], dd["p99.9"], dd["mean"]],
                ratio,
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds instead of many minutes)")
    print(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
