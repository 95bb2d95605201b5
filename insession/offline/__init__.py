"""One offline feature interface, one module per engine: DuckDB (the default and the reference) and Spark.

An `OfflineEngine` answers two questions about an event history (the stored log from offset 0, as an Arrow
table in `EVENT_ARROW_SCHEMA` or a Parquet path/URL the engine reads itself):

- `compute_chunks(features, events, spine)`: point-in-time feature values for a spine of (entity keys, ts,
  offset) rows, as Arrow tables of `chunk_rows` spine rows, in spine order: each row sees what the online
  engine served after applying the log up to `offset` and read at `ts` (the lateness rule replayed from
  offsets). Every column has the type `value_type` gives, whichever engine answered.
- `accepted(registry, events)`: the events the lateness rule accepts, in offset order, with their session
  number per user (`ACCEPTED_COLUMNS`): the relation the training-data build reads for requests, the
  vocabulary and item2vec sessions. It is returned as Arrow, never left behind as an engine's table.
- `session_candidates(registry, events, requests, ...)`: each add-to-cart's item and its in-session hard
  negatives, joined where the events are (`CANDIDATE_SCHEMA`): at most k + 1 rows per request come back,
  not the sessions they are read from (issue 15: the first of the build's joins moved off the driver).

`open_engine("duckdb" | "spark", master=...)` picks the engine (Feast's offline-store pattern: callers hold
the interface, the engine is a parameter). Parity online = DuckDB = Spark is property-tested in
tests/features/test_spark_parity.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from insession.features.declare import Feature, FeatureRegistry
from insession.schema import ACTIONS, EVENT_ARROW_SCHEMA

ENGINES = ("duckdb", "spark")
EventsLike = pa.Table | str | Path
SEQUENCE_TYPE = pa.list_(
    pa.struct([("item_id", pa.string()), ("action", pa.string()), ("ts", pa.int64()), ("category", pa.string())])
)
ACCEPTED_COLUMNS = (
    "offset", "user_id", "item_id", "action", "ts", "session_id", "surface", "properties", "category",
    "subcategory", "brand", "price", "price_band", "sess",
)  # fmt: skip
ACCEPTED_SCHEMA = pa.schema(
    [EVENT_ARROW_SCHEMA.field(c) for c in ACCEPTED_COLUMNS if c != "sess"] + [pa.field("sess", pa.int64())]
)

CANDIDATE_SCHEMA = pa.schema(
    [("g", pa.int64()), ("item_id", pa.string()), ("category", pa.string()), ("subcategory", pa.string()),
     ("label", pa.float32()), ("dist", pa.int64())]
)  # fmt: skip


def value_type(f: Feature) -> pa.DataType:
    """The Arrow type of a feature's values offline (the online engine's values, as Arrow)."""
    if f.agg in ("count", "age"):
        return pa.int64()
    if f.agg == "sum":
        return pa.float64()
    if f.agg == "last":
        return pa.string()
    if f.agg == "last_n":
        return SEQUENCE_TYPE
    if f.agg == "distinct_topk":
        return pa.list_(pa.string())
    if f.agg == "counts_by_action":
        return pa.struct([(a, pa.int64()) for a in ACTIONS])
    return pa.list_(pa.struct([(f.field or "item_id", pa.string()), ("count", pa.int64())]))


def session_candidates_sql(accepted: str, requests: str, window_ms: int, k: int) -> str:
    """`OfflineEngine.session_candidates` in the SQL both engines speak: `accepted` a relation of the accepted
    events with `off` and `sess`, `requests` one of (g, atc_offset). A range join on (user, session) and the
    ts window around each add-to-cart: the work per request is bounded by its session window, never by the
    user's whole history. The latest known category: DuckDB's max_by skips a NULL value, Spark's does not,
    so a view without one gives a NULL position, which both skip."""
    return f"""
        WITH req AS (
            SELECT r.g, e.user_id, e.sess, e.ts, e.item_id, e.category, e.subcategory
            FROM {requests} r JOIN {accepted} e ON e.off = r.atc_offset),
        carted AS (SELECT DISTINCT user_id, sess, item_id FROM {accepted} WHERE action = 'add_to_cart'),
        near AS (
            SELECT r.g, v.item_id, max_by(v.category, IF(v.category IS NULL, NULL, v.off)) AS category,
                   max_by(v.subcategory, IF(v.subcategory IS NULL, NULL, v.off)) AS subcategory,
                   min(abs(v.ts - r.ts)) AS dist
            FROM req r JOIN {accepted} v
              ON v.user_id = r.user_id AND v.sess = r.sess AND v.action = 'view'
             AND v.ts BETWEEN r.ts - {window_ms} AND r.ts + {window_ms}
            WHERE NOT EXISTS (SELECT 1 FROM carted c
                              WHERE c.user_id = v.user_id AND c.sess = v.sess AND c.item_id = v.item_id)
            GROUP BY r.g, v.item_id)
        SELECT g, item_id, category, subcategory, CAST(1.0 AS FLOAT) AS label, CAST(-1 AS BIGINT) AS dist FROM req
        UNION ALL
        SELECT g, item_id, category, subcategory, CAST(0.0 AS FLOAT), dist
        FROM (SELECT *, row_number() OVER (PARTITION BY g ORDER BY dist, item_id) AS n FROM near) WHERE n <= {k}
        ORDER BY g, dist, item_id"""


def as_registry(features: FeatureRegistry | Iterable[Feature]) -> FeatureRegistry:
    return features if isinstance(features, FeatureRegistry) else FeatureRegistry.of(features)


def check_spine(reg: FeatureRegistry, spine: pa.Table) -> None:
    missing = {k for f in reg for k in f.keys} - set(spine.column_names)
    if "ts" not in spine.column_names or missing:
        raise ValueError(f"the spine needs columns ts and {sorted(missing)}; it has {spine.column_names}")


class OfflineEngine(ABC):
    """Point-in-time feature values and the accepted events of a history (see the module docstring)."""

    name: str

    @abstractmethod
    def compute_chunks(
        self,
        features: FeatureRegistry | Iterable[Feature],
        events: EventsLike,
        spine: pa.Table,
        *,
        chunk_rows: int = 1_000_000,
    ) -> Iterator[pa.Table]:
        """The spine's columns plus one column per feature, one table per `chunk_rows` spine rows, in order."""

    @abstractmethod
    def accepted(self, registry: FeatureRegistry, events: EventsLike) -> pa.Table:
        """The accepted events with session numbers, `ACCEPTED_SCHEMA`, in offset order."""

    @abstractmethod
    def session_candidates(
        self, registry: FeatureRegistry, events: EventsLike, requests: pa.Table, *, window_ms: int, k: int
    ) -> pa.Table:
        """`CANDIDATE_SCHEMA` rows for `requests` (g, atc_offset: a group id and its add-to-cart's offset), by
        (g, dist, item_id): the add-to-cart's item (label 1, dist -1), then at most `k` hard negatives, the
        items its shopper viewed in the same session within `window_ms` of it and never carted in that
        session, nearest first (dist: the least ms between a view and the add-to-cart), ties by item_id, each
        with the category (and subcategory) of its latest such view that has one. A request whose add-to-cart
        the lateness rule dropped has no row."""

    def compute(self, features: FeatureRegistry | Iterable[Feature], events: EventsLike, spine: pa.Table) -> pa.Table:
        """`compute_chunks` as one table."""
        return pa.concat_tables(list(self.compute_chunks(features, events, spine)))

    def describe(self) -> str:
        """One line for progress output (Spark: its master and UI address)."""
        return self.name

    @abstractmethod
    def close(self) -> None:
        """Release what the engine holds (Spark: stops its session when the engine started it)."""


def open_engine(name: str = "duckdb", *, master: str | None = None) -> OfflineEngine:
    """The offline engine `name`; `master` is Spark's master URL (default `local[*]`)."""
    if name == "duckdb":
        if master is not None:
            raise ValueError("--master is Spark's; the duckdb engine runs in this process")
        from insession.offline.duckdb_engine import DuckDBEngine

        return DuckDBEngine()
    if name == "spark":
        from insession.offline.spark_engine import SparkEngine

        return SparkEngine(master=master or "local[*]")
    raise ValueError(f"unknown offline engine {name!r}; choose one of {', '.join(ENGINES)}")
