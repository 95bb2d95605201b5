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
    """`EventIn` columns (ts in ms, time order; a `query` column, where the data has one, becomes the
    search events' `properties.query`) -> stored events: offsets in time order, catalogue facts."""
    con = duckdb.connect()
    query = core["query"] if "query" in core.column_names else pa.nulls(core.num_rows, pa.string())
    con.register("core", core.select(["user_id", "item_id", "action", "ts", "session_id", "surface"])
                 .append_column("query", query))
    con.register("items", items)
    table = con.sql("""
        SELECT (row_number() OVER (ORDER BY e.ts, e.rn) - 1)::BIGINT AS "offset", e.user_id, e.item_id,
               e.action,
               e.ts, NULL::VARCHAR AS event_id, e.session_id, e.surface,
               CASE WHEN e.query IS NOT NULL THEN json_object('query', e.query)::VARCHAR END AS properties,
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


def load_synthetic(users: int, items: int, days: int, seed: int, realistic: bool = False) -> Dataset:
    """A seeded synthetic shop from the dataset generator (`realistic`: the shop calibrated on Taobao, with
    surfaces, search queries and trends; docs/synthetic.md)."""
    shop = generate_shop(users, items, days, seed, realistic=realistic)
    core = pa.concat_tables(
        t.select(["user_id", "item_id", "action", "ts", "session_id", "surface", "query"])
        for t in shop.iter_event_tables()
    )
    catalogue = _items_table(shop.items)
    kind = "realistic" if realistic else "synthetic"
    return Dataset(f"{kind}_u{users}_i{items}_d{days}_s{seed}", stored_events(core, catalogue), catalogue)
