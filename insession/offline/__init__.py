"""One offline feature interface, one module per engine: DuckDB (the default and the reference) and Spark.

An `OfflineEngine` answers two questions about an event history (the stored log from offset 0, as an Arrow
table in `EVENT_ARROW_SCHEMA` or a Parquet path/URL the engine reads itself):

- `compute_chunks(features, events, spine)`: point-in-time feature values for a spine of (entity keys, ts,
  offset) rows, as Arrow tables of `chunk_rows` spine rows, in spine order: each row sees what the online
  engine served after applying the log up to `offset` and read at `ts` (the lateness rule replayed from
  offsets). Every column has the type `value_type` gives, whichever engine answered.
- `accepted(registry, events)`: the events the lateness rule accepts, in offset order, with their session
  number per user (`ACCEPTED_COLUMNS`): the relation the training-data build reads for requests, hard
  negatives and item2vec sessions. It is returned as Arrow, never left behind as an engine's table.

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
