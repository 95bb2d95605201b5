"""Benchmark of the feature engine: online throughput, memory per user, online read vs DuckDB on demand,
offline training-data counters (tiled) vs a direct window join."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from bench.common import percentiles_ms, table
from insession.features import FeatureEngine, default_registry, offline
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


def _deep_size(obj: object, seen: set[int]) -> int:
    """Bytes of `obj` and everything it holds (dicts, lists, tuples, sets), each object counted once
    across calls sharing `seen` (an int shared by two structures belongs to the first one measured)."""
    total, stack = 0, [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            stack.extend(o)
    return total


def _memory(n_users: int, per_user: int) -> tuple[float, int, list[list[object]]]:
    """(bytes per user, bytes of shared state, per-part rows) after streaming n_users x per_user events:
    every object the engine holds, measured with sys.getsizeof and counted once. Per user: the state of
    the user and (user, item) features, covisit's last few events per user and the session rule's state
    (shopper ids are hashed, not kept); shared: item and global features and the names of values."""
    engine = FeatureEngine(default_registry())
    with tqdm(total=n_users * per_user, desc="memory run", unit="ev", leave=False) as bar:
        for chunk in synthetic_events(n_users, per_user, seed=11):
            engine.update_many(chunk)
            bar.update(len(chunk))
            del chunk
    gc.collect()
    names, seen = engine._names, set()
    parts: dict[str, int] = {}
    for f in engine.registry:  # user-keyed first, so the ints they share with shared state count as theirs
        if f.entity in ("user", "user_item"):
            parts[f.name] = sum(_deep_size(getattr(a, "inner", a).state, seen)
                                for p in engine._parts for a in [p.aggs[f.name]])
    parts["covisit: each user's last events"] = sum(_deep_size(p.aggs["covisit"].state, seen) for p in engine._parts)
    parts["session rule"] = sum(_deep_size(p.sessions.state, seen) for p in engine._parts)
    per_user_bytes = sum(parts.values())
    shared = sum(_deep_size(a.state, seen) + _deep_size(getattr(a, "totals", None), seen)
                 for unit in engine._items.values() for a in unit.aggs.values())
    shared += _deep_size(names.names, seen) + _deep_size(names.ids, seen)
    rows: list[list[object]] = [[part, f"{b / n_users:,.0f}"] for part, b in parts.items()]
    return per_user_bytes / n_users, shared, rows


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


COUNTERS = ("user_item_count_28d", "item_count_28d", "item_trending_2h")  # what the trainer reads per candidate


def _training_spine(events: pa.Table, requests: int, candidates: int) -> pa.Table:
    """The trainer's shape: per add-to-cart request (user, ts, offset), `candidates` items, 5 of them the
    request's own item, the rest drawn by Zipf popularity (the hot items are the expensive ones)."""
    rng = np.random.default_rng(9)
    atc = events.filter(pc.equal(events["action"], "add_to_cart"))
    req = atc.take(np.sort(rng.choice(atc.num_rows, min(requests, atc.num_rows), replace=False)))
    g = np.repeat(np.arange(req.num_rows), candidates)
    items = np.char.add("i", (np.minimum(rng.zipf(1.3, len(g)), N_ITEMS) - 1).astype(str)).astype(object)
    own = np.arange(len(g)) % candidates < 5
    items[own] = np.asarray(req["item_id"].to_pylist(), dtype=object)[g[own]]
    return pa.table(
        {
            "user_id": req["user_id"].take(g),
            "item_id": pa.array(items, pa.string()),
            "ts": req["ts"].take(g),
            "offset": req["offset"].take(g),
        }
    )


def _window_join(events: pa.Table, spine: pa.Table) -> pa.Table:
    """The counters by their definition: every accepted event of the key inside the window, joined per row."""
    reg = default_registry()
    con = duckdb.connect()
    offline.sessions(reg, events, con=con)
    con.register("spine", spine.append_column("rid", pa.array(np.arange(spine.num_rows), pa.int64())))
    by_action = ", ".join(f"{a} := count(x.ts) FILTER (WHERE x.action = '{a}')" for a in ACTIONS)
    selects = []
    for name in COUNTERS:
        f = reg[name]
        keys = " AND ".join(f"x.{k} = s.{k}" for k in f.keys)
        start = f"(s.ts // {f.window.tile_ms} - {f.window.tiles - 1}) * {f.window.tile_ms}"
        v = "count(x.ts)" if f.agg == "count" else f"struct_pack({by_action})"
        selects.append(f"""(SELECT s.rid, {v} AS {name} FROM spine s LEFT JOIN accepted_sessions x
                             ON {keys} AND x."offset" <= s."offset" AND x.ts <= s.ts AND x.ts >= {start}
                             GROUP BY s.rid)""")
    joined = " JOIN ".join(f"{sel} r{n}" + (" USING (rid)" if n else "") for n, sel in enumerate(selects))
    cols = ", ".join(f"r{n}.{name}" for n, name in enumerate(COUNTERS))
    return con.sql(f"SELECT {cols} FROM {joined} ORDER BY rid").to_arrow_table()


def _offline_counters(n_users: int, per_user: int, requests: int, baseline_requests: int) -> list[list[object]]:
    """Seconds and spine rows per second for the trainer's counters: offline.compute (running per-tile
    counts) on the full spine, the direct window join on its first `baseline_requests` requests; the
    answers on that part are checked equal."""
    events = pa.concat_tables(events_to_arrow(c) for c in synthetic_events(n_users, per_user, seed=13))
    spine = _training_spine(events, requests, 60)
    feats = [default_registry()[n] for n in COUNTERS]
    t = time.perf_counter()
    tiled = offline.compute(feats, events, spine).select(list(COUNTERS))
    tiled_s = time.perf_counter() - t
    part = spine.slice(0, baseline_requests * 60)
    t = time.perf_counter()
    joined = _window_join(events, part)
    join_s = time.perf_counter() - t
    if joined.to_pylist() != tiled.slice(0, part.num_rows).to_pylist():
        raise AssertionError("offline.compute differs from the direct window join")
    tiled_rate, join_rate = spine.num_rows / tiled_s, part.num_rows / join_s
    return [
        [
            "offline.compute (running per-tile counts)",
            f"{events.num_rows:,}",
            f"{spine.num_rows:,}",
            tiled_s,
            tiled_rate,
        ],
        ["direct window join (baseline)", f"{events.num_rows:,}", f"{part.num_rows:,}", join_s, join_rate],
        ["ratio (rows/s)", "", "", "", f"{tiled_rate / join_rate:,.0f}x"],
    ]


def run(quick: bool) -> str:
    """The markdown section for docs/benchmarks.md."""
    tp_users, tp_per_user = (10_000, 10) if quick else (200_000, 20)
    # The reference is 1,000,000 users (about 5 min here); BENCH_MEM_USERS can
    # lower it (per-user state does not depend on how many other users there are; the table says what ran).
    mem_users, mem_per_user = (10_000, 20) if quick else (int(os.environ.get("BENCH_MEM_USERS", 1_000_000)), 20)
    hist_events, reads = (200_000, 300) if quick else (10_000_000, 2_000)
    off_users, off_requests, off_baseline = (5_000, 1_000, 100) if quick else (25_000, 20_000, 500)

    print(f"throughput: {tp_users * tp_per_user:,} events through the default feature set ...")
    rate_wall, rate_cpu, total, engine = _throughput(tp_users, tp_per_user)
    too_late = engine.too_late
    del engine
    print(f"  {rate_cpu:,.0f} events per CPU-second ({rate_wall:,.0f} per wall-clock second)")
    print(f"memory: {mem_users:,} users x {mem_per_user} events ...")
    per_user, shared, mem_rows = _memory(mem_users, mem_per_user)
    print(f"  {per_user:,.0f} bytes per user, {shared / 2**20:,.1f} MiB shared item/global state")
    print(f"top_categories_15d: online state vs DuckDB over {hist_events:,} raw events ...")
    on, dd = _top_categories_latency(hist_events, reads)
    print(f"  p50 {on['p50']:.4f} ms vs {dd['p50']:.3f} ms")

    print(f"offline counters: {off_users * 20:,} events, {off_requests:,} requests x 60 candidates ...")
    off_rows = _offline_counters(off_users, 20, off_requests, off_baseline)
    print(f"  {off_rows[0][3]:.1f} s for {off_rows[0][2]} rows; baseline {off_rows[1][3]:.1f} s for {off_rows[1][2]}")

    scale = " Quick run: measured at the sizes shown; per-user state does not depend on the number of users."
    rows = [
        ["events/s through the online engine, per CPU-second of its one thread", f"{rate_cpu:,.0f}", ">= 50,000"],
        ["events/s by the wall clock (machine shared with other work)", f"{rate_wall:,.0f}", ""],
        ["events applied / too late (dropped)", f"{total:,} / {too_late:,}", ""],
        [
            f"memory per active user ({mem_users:,} users x {mem_per_user} events; every object the engine "
            "holds, by sys.getsizeof, counted once)",
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
        f"Per-user memory by part ({mem_users:,} users x {mem_per_user} events):",
        "",
        table(["part", "bytes per user"], mem_rows),
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
        f"Training-data counters ({', '.join(f'`{c}`' for c in COUNTERS)}) for (add-to-cart request, candidate)"
        " rows, 60 candidates per request drawn by Zipf popularity: `offline.compute` versus the same"
        " counts by a direct window join (every event of the key in the window, per row; run on the first"
        f" {off_baseline:,} requests only); answers checked equal.",
        "",
        table(["path", "events", "spine rows", "seconds", "rows/s"], off_rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds instead of many minutes)")
    print(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
