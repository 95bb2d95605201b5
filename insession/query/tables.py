"""The tables SQL can name (`events`, `items`) as DuckDB views, and the locked-down DuckDB they live in.

SQL sees event and item times as `TIMESTAMP` (UTC), so `ts > now() - INTERVAL 15 DAY` works; they are
stored as epoch milliseconds (`insession.schema`) and converted in the views. `events` is the Parquet
history (events with offset below the tail's first offset) UNION ALL the not-yet-exported tail, so a
query sees every acknowledged event exactly once even while an export runs.

Every connection is defensive whatever the SQL says: no extension install or autoload, file access
only to the history directory (`allowed_directories`), `enable_external_access=false`, and the
configuration locked before any user SQL runs.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from insession.log.export import history_files
from insession.schema import EVENT_ARROW_SCHEMA, ITEM_ARROW_SCHEMA, event_columns_sql

TIME_COLUMNS = frozenset({"ts", "ingest_ts", "updated_ts"})  # epoch ms in storage, TIMESTAMP in SQL

_SQL_TYPES = {pa.int64(): "BIGINT", pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}


def _columns(schema: pa.Schema) -> dict[str, str]:
    return {f.name: "TIMESTAMP" if f.name in TIME_COLUMNS else _SQL_TYPES[f.type] for f in schema}


# What SQL sees: table -> column -> DuckDB type.
TABLE_COLUMNS: dict[str, dict[str, str]] = {
    "events": _columns(EVENT_ARROW_SCHEMA),
    "items": _columns(ITEM_ARROW_SCHEMA),
}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _view_sql(table: str, schema: pa.Schema, sources: list[str]) -> str:
    cols = ", ".join(_quote(f.name) for f in schema)
    union = " UNION ALL ".join(f"SELECT {cols} FROM {src}" for src in sources)
    times = ", ".join(f"epoch_ms({_quote(c)}) AS {_quote(c)}" for c in schema.names if c in TIME_COLUMNS)
    return f"CREATE VIEW {table} AS SELECT * REPLACE ({times}) FROM ({union})"


def connect(
    *, history_dir: Path | None, tail: pa.Table, items: pa.Table, threads: int = 1, memory_limit: str = "1GB"
) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the views `events` and `items`, locked down before returning.

    `tail` holds the events not yet in the history (EVENT_ARROW_SCHEMA); history rows with an offset
    at or beyond the tail's first offset are hidden, so nothing is counted twice.
    """
    con = duckdb.connect(
        ":memory:",
        config={
            "threads": threads,
            "memory_limit": memory_limit,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
        },
    )
    try:
        con.execute("SET TimeZone = 'UTC'")
        root = Path(history_dir).resolve() if history_dir is not None else None
        files = history_files(root) if root is not None else []
        if files:
            con.execute("SET allowed_directories = $dirs", {"dirs": [f"{root}/"]})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.register("_tail", tail)
        con.register("_items", items)
        sources = ["_tail"]
        if files:
            hist = con.read_parquet(files, hive_partitioning=False, union_by_name=True)
            hist = hist.project(event_columns_sql(hist.columns))  # parts older than a column: NULL
            if tail.num_rows:
                first = int(pc.min(tail.column("offset")).as_py())
                hist = hist.filter(f'"offset" < {first}')
            hist.create_view("_history")
            sources.insert(0, "_history")
        con.execute(_view_sql("events", EVENT_ARROW_SCHEMA, sources))
        con.execute(_view_sql("items", ITEM_ARROW_SCHEMA, ["_items"]))
    except BaseException:
        con.close()
        raise
    return con

