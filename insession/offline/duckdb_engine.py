"""The DuckDB offline engine behind `OfflineEngine`: `insession.features.offline`, in this process."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa

from insession.features import offline
from insession.features.declare import Feature, FeatureRegistry
from insession.offline import (
    ACCEPTED_COLUMNS,
    ACCEPTED_SCHEMA,
    CANDIDATE_SCHEMA,
    EventsLike,
    OfflineEngine,
    session_candidates_sql,
)


class DuckDBEngine(OfflineEngine):
    """One machine, spilling to disk beyond `offline.MEMORY_LIMIT`; a fresh connection per call."""

    name = "duckdb"

    def __init__(self) -> None:
        # the last `accepted` answer, kept for the same Arrow table and rules: the build asks for the accepted
        # events and then for the session candidates, which read them again
        self._last: tuple[tuple, EventsLike, pa.Table] | None = None

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
        """Each call opens and closes its own connection; the last accepted events are let go."""
        self._last = None

    def accepted(self, registry: FeatureRegistry, events: EventsLike) -> pa.Table:
        key = (id(events), registry.lateness_ms, registry.session_gap_ms)
        if isinstance(events, pa.Table) and self._last is not None and self._last[:2] == (key, events):
            return self._last[2]
        con = offline.connect()
        try:
            table = offline.sessions(registry, events, con=con).to_arrow_table()
        finally:
            con.close()
        table = table.select(list(ACCEPTED_COLUMNS)).cast(ACCEPTED_SCHEMA)
        if isinstance(events, pa.Table):  # immutable and held here: its identity names its content
            self._last = (key, events, table)
        return table

    def session_candidates(
        self, registry: FeatureRegistry, events: EventsLike, requests: pa.Table, *, window_ms: int, k: int
    ) -> pa.Table:
        accepted = self.accepted(registry, events)
        con = offline.connect()
        try:
            con.register("accepted_in", accepted)
            con.register("requests_in", requests.select(["g", "atc_offset"]))
            con.execute('CREATE TEMP VIEW acc AS SELECT "offset" AS off, * FROM accepted_in')
            table = con.sql(session_candidates_sql("acc", "requests_in", window_ms, k)).to_arrow_table()
        finally:
            con.close()
        return table.cast(CANDIDATE_SCHEMA)
