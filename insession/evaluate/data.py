"""Evaluation inputs: a dataset (real import or synthetic shop) as stored events plus its catalogue."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from insession.datasets import generate_shop
from insession.datasets.imports import Imported
from insession.schema import EVENT_ARROW_SCHEMA

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("subcategory", pa.string()),
        ("available", pa.bool_()),
    ]
)


@dataclass
class Dataset:
    """Events in `EVENT_ARROW_SCHEMA` (offset = time order, enriched with category) and the catalogue."""

    name: str
    events: pa.Table
    items: pa.Table  # ITEM_SCHEMA


def _items_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    return pa.table(
        {
            "item_id": pa.array([str(r["item_id"]) for r in rows], pa.string()),
            "category": pa.array([r["category"] for r in rows], pa.string()),
            "subcategory": pa.array([r.get("subcategory") or r["category"] for r in rows], pa.string()),
            "available": pa.array([bool(r.get("available", True)) for r in rows], pa.bool_()),
        },
        schema=ITEM_SCHEMA,
    )


def stored_events(core: pa.Table, items: pa.Table) -> pa.Table:
    """`EventIn` columns (ts in ms, time order) -> stored events: offsets in time order, catalogue facts."""
    con = duckdb.connect()
    con.register("core", core.select(["user_id", "item_id", "action", "ts", "session_id", "surface"]))
    con.register("items", items)
    table = con.sql("""
        SELECT (row_number() OVER (ORDER BY e.ts, e.rn) - 1)::BIGINT AS "offset", e.user_id, e.item_id,
               e.action,
               e.ts, NULL::VARCHAR AS event_id, e.session_id, e.surface, NULL::VARCHAR AS properties,
               i.category, i.subcategory, e.ts AS ingest_ts, NULL::VARCHAR AS brand, NULL::DOUBLE AS price,
               NULL::VARCHAR AS price_band
        FROM (SELECT *, row_number() OVER () AS rn FROM core) e LEFT JOIN items i USING (item_id)
        ORDER BY "offset" """).to_arrow_table()
    return table.cast(EVENT_ARROW_SCHEMA)


def load_real(path: Path, name: str | None = None) -> Dataset:
    """A normalised sample (e.g. /work/shared/data/taobao_userbehavior_head84k.parquet) via the importer."""
    with Imported("normalised", Path(path)) as imported:
        items = _items_table(imported.item_rows())
        core = pa.Table.from_batches(list(imported.event_batches()))
    return Dataset(name or Path(path).name.split(".")[0], stored_events(core, items), items)


def load_synthetic(users: int, items: int, days: int, seed: int) -> Dataset:
    """A seeded synthetic shop from the dataset generator."""
    shop = generate_shop(users, items, days, seed)
    core = pa.concat_tables(
        t.select(["user_id", "item_id", "action", "ts", "session_id", "surface"]) for t in shop.iter_event_tables()
    )
    catalogue = _items_table(shop.items)
    return Dataset(f"synthetic_u{users}_i{items}_d{days}_s{seed}", stored_events(core, catalogue), catalogue)
