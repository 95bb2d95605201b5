"""The main job (`insession demo`): the whole story on the embedded default, through the real HTTP API."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from tqdm import tqdm

from insession.client import Client
from insession.datasets import Shop, events_from_table, generate_shop
from insession.serve.process import ServerProcess

BATCH = 1000


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def ingest_shop(client: Client, shop: Shop) -> tuple[int, float]:
    """Push the catalogue and every event through the API in batches; returns (events stored, seconds)."""
    client.insert("items", shop.items)
    stored, t0 = 0, time.perf_counter()
    with tqdm(desc="ingest", unit=" ev", unit_scale=True) as bar:
        for table in shop.iter_event_tables():
            for start in range(0, table.num_rows, BATCH):
                rows = events_from_table(table.slice(start, BATCH))
                stored += client.insert("events", rows).stored
                bar.update(len(rows))
    return stored, time.perf_counter() - t0


def _shifting_session(shop: Shop, clicks_per_intent: int) -> list[dict]:
    """A new session whose intent moves from one category to another: the items to click, in order."""
    by_cat: dict[str, list[dict]] = {}
    for item in shop.items:
        by_cat.setdefault(item["category"], []).append(item)
    first, second = sorted(by_cat, key=lambda c: -len(by_cat[c]))[:2]
    return by_cat[first][:clicks_per_intent] + by_cat[second][:clicks_per_intent]


def replay_session(client: Client, shop: Shop, user: str, start_ms: int, clicks_per_intent: int = 4) -> None:
    """Click through a session whose intent shifts; after each click, ask for recommendations."""
    category = {item["item_id"]: item["category"] for item in shop.items}
    latencies = []
    for i, item in enumerate(_shifting_session(shop, clicks_per_intent)):
        client.insert("events", [{"user_id": user, "item_id": item["item_id"], "action": "view",
                                  "ts": start_ms + i * 40_000, "surface": "pdp"}])
        t0 = time.perf_counter()
        ranked = client.rank(user, k=5)
        latencies.append((time.perf_counter() - t0) * 1000)
        cats = Counter(category.get(r.item_id, "?") for r in ranked.items)
        top = ", ".join(f"{c}×{n}" for c, n in cats.most_common())
        flag = f" fallback={ranked.fallback}" if ranked.fallback else ""
        print(f"  click {i + 1:2d}: viewed {item['item_id']} ({item['category']:>12}) -> top-5 by category: {top}"
              f"  [{latencies[-1]:.1f} ms{flag}]")
    latencies.sort()
    print(f"  /v1/rank round trips: median {latencies[len(latencies) // 2]:.1f} ms, max {latencies[-1]:.1f} ms")


BRANDS_SQL = ("CREATE FEATURE brands_7d AS SELECT user_id, distinct_topk(brand, 3) FROM events "
              "WHERE action = 'view' AND ts > now() - INTERVAL '7' DAY "
              "GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)")
BRANDS_QUERY = ("SELECT DISTINCT brand FROM events WHERE user_id = :user AND action = 'view' "
                "AND ts > now() - INTERVAL 7 DAY ORDER BY ts DESC LIMIT 3")


def declare_a_feature(client: Client, user: str, timeout_s: float = 120.0) -> None:
    """Zero code: declare a feature in SQL while the server runs, watch it backfill, query it."""
    _say("declaring a feature in SQL while the server runs (no code, no restart)")
    before = client.select(BRANDS_QUERY, user=user)
    print(f"  {BRANDS_QUERY}\n    -> before: lane {before.lane} (DuckDB over the history; there now() is the wall "
          f"clock, and this shop's events may be older), {before.rows}")
    print(f"  {BRANDS_SQL}")
    client.execute(BRANDS_SQL)
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        info = dict(client.execute("DESCRIBE FEATURE brands_7d").rows)
        seen = (info["status"], info.get("progress"))
        if seen != last:
            print(f"    DESCRIBE FEATURE brands_7d: {info['status']} {info.get('progress') or ''}".rstrip())
            last = seen
        if info["status"] != "backfilling":
            break
        time.sleep(0.2)
    after = client.select(BRANDS_QUERY, user=user)
    print(f"    -> after: lane {after.lane} (feature {after.feature}; now() is the newest event time), {after.rows}")


def _wait_for_onnx(url: str, timeout_s: float = 120.0) -> dict:
    """The server exports a new model to ONNX in the background (eager PyTorch serves meanwhile); wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = httpx.get(url + "/v1/admin/model").json()
        if info["backend"] == "onnx" or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def run_demo(data_dir: Path | None, *, users: int, items: int, days: int, seed: int, epochs: int,
             keep_open: bool) -> None:
    """Generate a shop, serve it, ingest it through the API, train the ReRanker, and replay a session;
    `keep_open`: then leave the server (and its console) running until Ctrl-C."""
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="insession-demo-"))
    _say(f"generating a synthetic shop: {users} users, {items} items, {days} days (seed {seed})")
    shop = generate_shop(users, items, days, seed)
    _say(f"starting `insession serve --data-dir {data_dir}` on a free loopback port")
    with ServerProcess(data_dir) as server, Client(server.url) as client:
        print(f"server ready at {server.url}")
        stored, secs = ingest_shop(client, shop)
        print(f"stored {stored:,} events durably in {secs:.1f}s ({stored / secs:,.0f} events/s over HTTP)")
        user = str(shop.sessions.column("user_id")[0])
        _say(f"features of user {user}, read back through the API")
        result = client.select("SELECT * FROM features WHERE user_id = :user", user=user)
        for row in result.rows:
            print("  " + ", ".join(f"{c}={str(v)[:90]}" for c, v in zip(result.columns, row, strict=True)))
        sql = ("SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
               "ORDER BY ts DESC LIMIT 5")
        print(f"  {sql}\n    -> lane {client.select('EXPLAIN ' + sql, user=user).rows}")
        top = client.select("SELECT category, count(*) AS n FROM events GROUP BY category ORDER BY n DESC LIMIT 3")
        print(f"  analytics lane, busiest categories: {top.rows}")
        declare_a_feature(client, user)
    # The server exported the history on its graceful stop; train on exactly what the features saw.
    _say(f"training the Dual Sequence ReRanker on {data_dir / 'history'} ({epochs} epochs)")
    subprocess.run([sys.executable, "-m", "insession.cli", "train", str(data_dir), "--out", str(data_dir / "models"),
                    "--epochs", str(epochs), "--dim", "64"], check=True)
    _say("restarting the server: it loads the newest model; replaying a session whose intent shifts")
    with ServerProcess(data_dir) as server, Client(server.url) as client:
        model = _wait_for_onnx(server.url)
        print(f"  model {model['version']} serving on {model['backend']} "
              f"(validation NDCG@10 {model['metrics'].get('val_ndcg10', float('nan')):.3f})")
        start = int(httpx.get(server.url + "/readyz").json()["watermark"]) + 3_600_000  # an hour later
        replay_session(client, shop, user, start)
        print(f"\nconsole: {server.url}/console/shopper?user={user}\n"
              f"metrics: {server.url}/metrics   OpenAPI: {server.url}/docs   data: {data_dir}")
        if keep_open and server.proc is not None:
            print("the server stays up for the console; Ctrl-C stops it", flush=True)
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                print()