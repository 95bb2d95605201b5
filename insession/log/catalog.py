"""The item catalogue (`items` table): durable in SQLite, cached in a dict for enrichment on the hot path.

The hierarchy is category > subcategory > item. Enrichment copies an item's category, subcategory, brand,
price and price band onto each event at ingest time (all bounded; a copy, not a reference, so the log and
history say what the catalogue said then and a feature over them is point-in-time correct offline too).
Decision: an event for an unknown item is accepted and stored with category=None (`enrich` returns how
many there were, the caller counts them); a later upsert of that item does not rewrite history, so the
log always says what the catalogue knew when the event arrived.

On a replicated log every node keeps its own catalogue file, fed with every node's upserts in the one
order of the log's items stream (`JetStreamLog.keep_catalog`); `replicated_seq` is the newest message of
that stream this catalogue holds, stored in the same transaction as the items, so a restart resumes there.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pyarrow as pa

from insession.log.base import LogUnavailable
from insession.log.eventlog import connect_read_only
from insession.schema import ITEM_ARROW_SCHEMA, Event, Item, price_band

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    subcategory TEXT NOT NULL,
    price REAL,
    available INTEGER NOT NULL,
    brand TEXT,
    name TEXT,
    updated_ts INTEGER NOT NULL
)
"""
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
_UPSERT = """
INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(item_id) DO UPDATE SET category = excluded.category, subcategory = excluded.subcategory,
    price = excluded.price, available = excluded.available, brand = excluded.brand, name = excluded.name,
    updated_ts = excluded.updated_ts
"""


class Catalog:
    """The items table; thread-safe. `path` is its SQLite file (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        self._conn.execute(_META)
        self._lock = threading.Lock()
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'replicated_seq'").fetchone()
        self.replicated_seq = int(row[0]) if row else 0  # the items stream's newest message held (0: none)
        self._items = _load_items(self._conn)

    def upsert(self, items: list[Item], seq: int | None = None) -> int:
        """Insert or replace items (all-or-nothing, durable before return); returns how many. `seq`: the
        items stream message they came from, recorded with them (a message at or below `replicated_seq` is
        already held: nothing is written).

        On a full disk nothing of the batch is stored, neither in SQLite nor in the dict events are
        enriched from, and `LogUnavailable` with status 507 says so (as the event log does); the next
        upsert once space is freed goes through on the same connection, no restart needed. SQLite may
        have rolled the transaction back itself (a full disk at COMMIT): then there is nothing to roll
        back (ROLLBACK would fail and hide the cause; it made this a bare 500 before).
        """
        rows = [(it.item_id, it.category, it.subcategory, it.price, int(it.available), it.brand, it.name,
                 it.updated_ts) for it in items]
        with self._lock:
            if seq is not None and seq <= self.replicated_seq:
                return 0
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(_UPSERT, rows)
                if seq is not None:
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('replicated_seq', ?)", (seq,))
                self._conn.execute("COMMIT")
            except BaseException as e:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    log.error("the catalogue's disk is full: an upsert of %d items was refused", len(items))
                    raise LogUnavailable("the catalogue's disk is full: nothing of this batch was stored; retry "
                                         "once space is freed", 507) from None
                raise
            self._items.update((it.item_id, it) for it in items)
            if seq is not None:
                self.replicated_seq = seq
        return len(items)

    def get(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def enrich(self, events: list[Event]) -> int:
        """Set the item's catalogue attributes (category, subcategory, brand, price, price band) on each
        event in place; returns how many events had an unknown item."""
        items = self._items
        unknown = 0
        for ev in events:
            item = items.get(ev.item_id)
            if item is None:
                unknown += 1
            else:
                ev.category = item.category
                ev.subcategory = item.subcategory
                ev.brand = item.brand
                ev.price = item.price
                ev.price_band = price_band(item.price)
        return unknown

    def to_arrow(self) -> pa.Table:
        """The whole catalogue as `ITEM_ARROW_SCHEMA`."""
        return _items_table(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _items_table(items: dict[str, Item]) -> pa.Table:
    rows = list(items.values())
    columns = {name: [getattr(it, name) for it in rows] for name in ITEM_ARROW_SCHEMA.names}
    return pa.table(columns, schema=ITEM_ARROW_SCHEMA)


def _load_items(conn: sqlite3.Connection) -> dict[str, Item]:
    return {row[0]: Item(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6], row[7])
            for row in conn.execute("SELECT * FROM items")}


class CatalogView:
    """The catalogue as another process sees it (`get`, `refresh`): a read-only connection of the server's
    `catalog.sqlite`, loaded whole and loaded again by `refresh` once the file changed (SQLite's
    `data_version`). A feature reader's hygiene rules read it (`insession.serve.reader`), so an item made
    unavailable leaves its lists as on the server, within one refresh. Decision: a whole reload per change,
    off the request path (a reader's follower thread), since upserts are rare beside events; a shop
    upserting its catalogue continuously would want a change counter in the table instead."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn = connect_read_only(self.path, handed_over=True)  # loaded here, refreshed by a follower thread
        self._version = -1
        self._items: dict[str, Item] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Load the items again if another connection committed since the last load; whether it did."""
        version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return False
        self._items = _load_items(self._conn)  # one assignment: a reader sees the old dict or the new one
        self._version = version
        return True

    def get(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def to_arrow(self) -> pa.Table:
        """The whole catalogue as `ITEM_ARROW_SCHEMA` (what the ranker's popular lists read)."""
        return _items_table(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self._conn.close()
