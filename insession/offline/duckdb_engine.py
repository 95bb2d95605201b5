"""The DuckDB offline engine behind `OfflineEngine`: `insession.features.offline`, in this process."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from insession.features import offline
from insession.features.declare import Feature, FeatureRegistry
from insession.offline import ACCEPTED_COLUMNS, ACCEPTED_SCHEMA, EventsLike, OfflineEngine


class DuckDBEngine(OfflineEngine):
    """One machine, spilling to disk beyond `offline.MEMORY_LIMIT`; a fresh connection per call."""

    name = "duckdb"

    def compute_chunks(
        self,
        features: FeatureRegistry | Iterable[Feature],
        events: EventsLike,
        spine: pa.Table,
        *,
        chunk_rows: int = 1_000_000,
    ) -> Iterator[pa.Table]:
        con = offline.connect()
        try:
            yield from offline.compute_chunks(features, events, spine, con=con, chunk_rows=chunk_rows)
        finally:
            con.close()

    def close(self) -> None:
        """Nothing to release: each call opens and closes its own connection."""

    def accepted(self, registry: FeatureRegistry, events: EventsLike) -> pa.Table:
        con = offline.connect()
        try:
            table = offline.sessions(registry, events, con=con).to_arrow_table()
        finally:
            con.close()
        return table.select(list(ACCEPTED_COLUMNS)).cast(ACCEPTED_SCHEMA)
