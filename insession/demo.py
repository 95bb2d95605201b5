"""The main job (`insession demo`): the whole story on the embedded default, through the real HTTP API."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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


def run_demo(data_dir: Path | None, *, users: int, items: int, days: int, seed: int) -> None:
    """Generate a shop, serve it, ingest it through the API, and read features back."""
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
        for name, value in client.select("SELECT * FROM features WHERE user_id = :user", user=user).items():
            print(f"  {name}: {value}")
