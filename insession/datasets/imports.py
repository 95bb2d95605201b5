"""Importers for public datasets in their published raw formats: Taobao UserBehavior, RetailRocket, and
the normalised samples (Taobao, REES46) of /work/shared/data, mapped onto insession's actions and items.

Raw files are read in chunks (pyarrow's streaming CSV/Parquet readers, with a tqdm bar over the bytes
or rows) into a DuckDB staging database in a temporary directory, which sorts events by time out of
core and picks each item's latest catalogue facts. Both come back streamed, in the wire forms.

Malformed input never aborts an import: a line with the wrong number of fields, an unparsable or
pre-1973 timestamp, an empty user or item id, or an action that has no counterpart in ours is skipped
and counted in `Imported.skipped`. Items without a known category (RetailRocket items that have no
`categoryid` property) are left out of the catalogue; their events are kept (ingest enriches them as
unknown items).

Mappings:
- taobao (`UserBehavior.csv`, no header: user_id,item_id,category_id,behavior_type,timestamp[s]):
  pv -> view, cart -> add_to_cart, fav -> favorite, buy -> purchase; category = subcategory =
  category_id (one flat level). No session ids (the features cut sessions at 30 minutes).
- retailrocket (a directory with `events.csv`: timestamp[ms],visitorid,event,itemid,transactionid;
  `category_tree.csv`: categoryid,parentid; `item_properties_part1.csv`/`part2.csv`:
  timestamp,itemid,property,value): view -> view, addtocart -> add_to_cart, transaction -> purchase;
  subcategory = the item's latest `categoryid` (a leaf), category = its top-level ancestor;
  available = the latest `available` property.
- normalised (parquet or csv[.gz] with user_id, session_id, item_id, category_id, category_path,
  action, ts_seconds; optional category_l1, brand, price): category = category_l1, else the first
  level of category_path, else category_id; subcategory = category_path, else category_id.
"""

from __future__ import annotations

import gzip
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from insession.datasets.files import EVENT_CORE_SCHEMA, events_from_table, item_from_row
from insession.schema import ACTIONS, MIN_EPOCH_MS

SOURCES: tuple[str, ...] = ("taobao", "retailrocket", "normalised")
CHUNK_BYTES = 8 << 20
PARQUET_BATCH = 65_536
EVENT_BATCH = 65_536

TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
RR_EVENT_COLUMNS = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
RR_TREE_COLUMNS = ["categoryid", "parentid"]
RR_PROPERTY_COLUMNS = ["timestamp", "itemid", "property", "value"]
RR_PROPERTY_FILES = ("item_properties_part1.csv", "item_properties_part2.csv")
NORMALISED_COLUMNS = ["user_id", "session_id", "item_id", "category_id", "category_path", "action",
                      "ts_seconds"]
NORMALISED_OPTIONAL = ["category_l1", "brand", "price"]

_ACTIONS_SQL = ", ".join(f"'{a}'" for a in ACTIONS)
_STAGING_DDL = """
CREATE TABLE ev (seq BIGINT, user_id VARCHAR, item_id VARCHAR, action VARCHAR, ts BIGINT, session_id VARCHAR,
                 category VARCHAR, subcategory VARCHAR, price DOUBLE, available BOOLEAN, brand VARCHAR);
CREATE TABLE obs (item_id VARCHAR, ts BIGINT, seq BIGINT, category VARCHAR, subcategory VARCHAR, price DOUBLE,
                  available BOOLEAN, brand VARCHAR);
CREATE TABLE tree (categoryid VARCHAR, parentid VARCHAR);
"""
# A chunk's rows mapped onto `ev`'s columns; the WHERE clause drops (and so counts) the bad ones.
_TAOBAO_SQL = """
SELECT seq, NULLIF(trim(user_id), '') AS user_id, NULLIF(trim(item_id), '') AS item_id,
       CASE trim(behavior_type) WHEN 'pv' THEN 'view' WHEN 'cart' THEN 'add_to_cart'
            WHEN 'fav' THEN 'favorite' WHEN 'buy' THEN 'purchase' END AS action,
       TRY_CAST(timestamp AS BIGINT) * 1000 AS ts, NULL AS session_id,
       NULLIF(trim(category_id), '') AS category, NULLIF(trim(category_id), '') AS subcategory,
       NULL AS price, NULL AS available, NULL AS brand
FROM chunk
"""
_RR_EVENTS_SQL = """
SELECT seq, NULLIF(trim(visitorid), '') AS user_id, NULLIF(trim(itemid), '') AS item_id,
       CASE trim(event) WHEN 'view' THEN 'view' WHEN 'addtocart' THEN 'add_to_cart'
            WHEN 'transaction' THEN 'purchase' END AS action,
       TRY_CAST(timestamp AS BIGINT) AS ts, NULL AS session_id,
       NULL AS category, NULL AS subcategory, NULL AS price, NULL AS available, NULL AS brand
FROM chunk
"""
_RR_PROPERTIES_SQL = """
INSERT INTO obs
SELECT item_id, ts, seq, NULL, CASE WHEN property = 'categoryid' THEN value END, NULL,
       CASE WHEN property = 'available' THEN value = '1' END, NULL
FROM (SELECT NULLIF(trim(itemid), '') AS item_id, TRY_CAST(timestamp AS BIGINT) AS ts, seq,
             trim(property) AS property, NULLIF(trim(value), '') AS value FROM chunk)
WHERE property IN ('categoryid', 'available') AND item_id IS NOT NULL AND ts IS NOT NULL AND value IS NOT NULL
"""
_VALID = f"""
WHERE user_id IS NOT NULL AND item_id IS NOT NULL AND action IS NOT NULL AND ts >= {MIN_EPOCH_MS}
"""
_ITEMS_SQL = """
WITH RECURSIVE up(categoryid, node, depth) AS (
    SELECT categoryid, categoryid, 0 FROM tree
    UNION ALL
    SELECT up.categoryid, t.parentid, up.depth + 1
    FROM up JOIN tree t ON t.categoryid = up.node
    WHERE t.parentid IS NOT NULL AND up.depth < 64
),
roots AS (SELECT categoryid, arg_max(node, depth) AS root FROM up GROUP BY categoryid),
facts AS (
    SELECT item_id, ts, seq, category, subcategory, price, available, brand FROM ev
    WHERE category IS NOT NULL OR subcategory IS NOT NULL OR price IS NOT NULL OR brand IS NOT NULL
    UNION ALL SELECT * FROM obs
),
latest AS (
    SELECT item_id,
           arg_max(category, [ts, seq]) FILTER (WHERE category IS NOT NULL) AS category,
           arg_max(subcategory, [ts, seq]) FILTER (WHERE subcategory IS NOT NULL) AS subcategory,
           arg_max(price, [ts, seq]) FILTER (WHERE price IS NOT NULL) AS price,
           arg_max(available, [ts, seq]) FILTER (WHERE available IS NOT NULL) AS available,
           arg_max(brand, [ts, seq]) FILTER (WHERE brand IS NOT NULL) AS brand
    FROM facts GROUP BY item_id
)
SELECT l.item_id, coalesce(l.category, r.root, l.subcategory) AS category, l.subcategory, l.price,
       l.available, l.brand
FROM latest l LEFT JOIN roots r ON r.categoryid = l.subcategory
WHERE coalesce(l.category, l.subcategory) IS NOT NULL
ORDER BY l.item_id
"""


def _normalised_sql(columns: list[str]) -> str:
    """The normalised format's mapping; optional columns absent from the file read as NULL."""
    has = set(columns)

    def text(name: str) -> str:
        return f"NULLIF(trim(CAST({name} AS VARCHAR)), '')" if name in has else "NULL"

    return f"""
SELECT seq, {text('user_id')} AS user_id, {text('item_id')} AS item_id,
       CASE WHEN trim(action) IN ({_ACTIONS_SQL}) THEN trim(action) END AS action,
       TRY_CAST(ts_seconds AS BIGINT) * 1000 AS ts, {text('session_id')} AS session_id,
       coalesce({text('category_l1')}, NULLIF(split_part({text('category_path')}, '.', 1), ''),
                {text('category_id')}) AS category,
       coalesce({text('category_path')}, {text('category_id')}) AS subcategory,
       {'TRY_CAST(price AS DOUBLE)' if 'price' in has else 'NULL'} AS price, NULL AS available,
       {text('brand')} AS brand
FROM chunk
"""


def _csv_batches(path: Path, columns: list[str], header: bool) -> Iterator[tuple[pa.RecordBatch, int]]:
    """A CSV file (optionally .gz) as (batch of string columns, count of lines with the wrong field count)."""
    bad = [0]

    def skip(_row: pacsv.InvalidRow) -> str:
        bad[0] += 1
        return "skip"

    read = pacsv.ReadOptions(block_size=CHUNK_BYTES, column_names=None if header else columns)
    parse = pacsv.ParseOptions(invalid_row_handler=skip)
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()), include_columns=columns,
                                   strings_can_be_null=False)
    size = path.stat().st_size
    with (path.open("rb") as raw, tqdm.wrapattr(raw, "read", total=size, desc=path.name) as wrapped,
          gzip.open(wrapped) if path.name.endswith(".gz") else nullcontext(wrapped) as stream):
        try:
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
        except (pa.ArrowInvalid, KeyError) as e:  # an empty file, or a header without our columns
            raise ValueError(f"{path}: missing columns or unreadable ({e}); expected {columns}") from None
        for batch in reader:
            yield batch, bad[0]
            bad[0] = 0


def _parquet_batches(path: Path, required: list[str],
                     optional: list[str]) -> Iterator[tuple[pa.RecordBatch, int]]:
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    with tqdm(total=f.metadata.num_rows, desc=path.name, unit=" rows", unit_scale=True) as bar:
        columns = required + [c for c in optional if c in names]
        for batch in f.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            bar.update(batch.num_rows)
            yield batch, 0


class Imported:
    """A raw dataset staged in DuckDB: its catalogue and its events in time order, both streamed."""

    def __init__(self, source: str, path: Path, limit: int | None = None) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
        self.source = source
        self.skipped = 0  # malformed or unmappable rows left out
        self.n_events = 0
        self._seq = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="insession-import-")
        self._con = duckdb.connect(str(Path(self._tmp.name) / "stage.duckdb"))
        weakref.finalize(self, self._con.close)
        self._con.execute(_STAGING_DDL)
        self._prefix = f"{source}-" if source != "normalised" else f"{path.name.split('.')[0]}-"
        {"taobao": self._stage_taobao, "retailrocket": self._stage_retailrocket,
         "normalised": self._stage_normalised}[source](path, limit)

    # -- staging --------------------------------------------------------------------------------------

    def _insert(self, sql: str, batches: Iterator[tuple[pa.RecordBatch, int]], *,
                events: bool, limit: int | None = None) -> None:
        """Run `sql` (reading the view `chunk`) on every batch, with a `seq` column of global row numbers."""
        for batch, bad in batches:
            self.skipped += bad
            chunk = batch.append_column("seq", pa.array(np.arange(self._seq, self._seq + batch.num_rows)))
            self._seq += batch.num_rows
            self._con.register("chunk", chunk)
            if not events:
                self._con.execute(sql)
                continue
            left = None if limit is None else limit - self.n_events
            cap = "" if left is None else f" ORDER BY seq LIMIT {left}"
            inserted = self._con.execute(f"INSERT INTO ev SELECT * FROM ({sql}) {_VALID}{cap}").fetchone()[0]
            self.n_events += inserted
            if left is not None and inserted == left:
                return
            self.skipped += batch.num_rows - inserted

    def _stage_taobao(self, path: Path, limit: int | None) -> None:
        path = path / "UserBehavior.csv" if path.is_dir() else path
        self._insert(_TAOBAO_SQL, _csv_batches(path, TAOBAO_COLUMNS, header=False), events=True, limit=limit)

    def _stage_retailrocket(self, path: Path, limit: int | None) -> None:
        d = path if path.is_dir() else path.parent
        self._insert(_RR_EVENTS_SQL, _csv_batches(d / "events.csv", RR_EVENT_COLUMNS, header=True),
                     events=True, limit=limit)
        if (d / "category_tree.csv").exists():
            self._insert("INSERT INTO tree SELECT NULLIF(trim(categoryid), ''), NULLIF(trim(parentid), '') "
                         "FROM chunk WHERE NULLIF(trim(categoryid), '') IS NOT NULL",
                         _csv_batches(d / "category_tree.csv", RR_TREE_COLUMNS, header=True), events=False)
        for name in RR_PROPERTY_FILES:
            if (d / name).exists():
                self._insert(_RR_PROPERTIES_SQL, _csv_batches(d / name, RR_PROPERTY_COLUMNS, header=True),
                             events=False)

    def _stage_normalised(self, path: Path, limit: int | None) -> None:
        if path.suffix == ".parquet":
            names = pq.read_schema(path).names
            batches = _parquet_batches(path, NORMALISED_COLUMNS, NORMALISED_OPTIONAL)
        else:
            with gzip.open(path, "rt") if path.name.endswith(".gz") else path.open() as f:
                names = f.readline().strip().split(",")
            batches = _csv_batches(path, NORMALISED_COLUMNS + [c for c in NORMALISED_OPTIONAL if c in names],
                                   header=True)
        self._insert(_normalised_sql(names), batches, events=True, limit=limit)

    # -- reading back ---------------------------------------------------------------------------------

    def item_rows(self) -> Iterator[dict]:
        """Catalogue rows in `ItemIn` wire form, one per item with a known category, by item_id."""
        reader = self._con.cursor().sql(_ITEMS_SQL).to_arrow_reader(EVENT_BATCH)
        for batch in reader:
            for row in batch.to_pylist():
                yield item_from_row(row)

    def event_batches(self, batch_size: int = EVENT_BATCH) -> Iterator[pa.RecordBatch]:
        """Events as Arrow batches (the `EventIn` columns, ts in epoch ms), in time order."""
        sql = (f"SELECT '{self._prefix}' || seq AS event_id, user_id, session_id, item_id, action, ts, "
               "NULL::VARCHAR AS surface FROM ev ORDER BY ts, seq")
        for batch in self._con.cursor().sql(sql).to_arrow_reader(batch_size):
            yield batch.cast(EVENT_CORE_SCHEMA)

    def events(self) -> Iterator[dict]:
        """Events in `EventIn` wire form, in time order."""
        for batch in self.event_batches():
            yield from events_from_table(batch)

    def close(self) -> None:
        self._con.close()
        self._tmp.cleanup()

    def __enter__(self) -> Imported:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read(source: str, path: Path, limit: int | None = None) -> tuple[Iterator[dict], Iterator[dict]]:
    """(items, events) of a raw dataset in wire form; events in time order. `limit`: first N valid rows."""
    imported = Imported(source, path, limit)
    return imported.item_rows(), imported.events()

