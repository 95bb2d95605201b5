"""The dataset directory layout (items.jsonl, events.parquet, sessions.parquet, and trends.parquet for a
realistic shop): write it, read it back.

Events are kept columnar: one column per `EventIn` field (`ts` in epoch ms) plus extra columns (e.g.
`intent`), which become the event's `properties` when rows are turned into wire-form dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

ITEMS_FILE = "items.jsonl"
EVENTS_FILE = "events.parquet"
SESSIONS_FILE = "sessions.parquet"
TRENDS_FILE = "trends.parquet"  # realistic shops: every trend (kind, id, start, peak, boost)
LOAD_BATCH = 1000
SHARED_SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data"  # the real samples beside the checkout

# The EventIn fields that are columns; every other column is a property.
EVENT_FIELDS: tuple[str, ...] = ("event_id", "user_id", "session_id", "item_id", "action", "ts", "surface")
EVENT_CORE_SCHEMA = pa.schema(
    [(name, pa.int64() if name == "ts" else pa.string()) for name in EVENT_FIELDS]
)

_encoder = msgspec.json.Encoder()


def events_from_table(table: pa.Table | pa.RecordBatch) -> list[dict]:
    """Columnar events to `EventIn` wire-form dicts: null fields left out, extra columns as properties."""
    names = table.schema.names
    core = [n for n in names if n in EVENT_FIELDS]
    extra = [n for n in names if n not in EVENT_FIELDS]
    core_cols = [table.column(n).to_pylist() for n in core]
    extra_cols = [table.column(n).to_pylist() for n in extra]
    out: list[dict] = []
    for i in range(table.num_rows):
        ev = {n: col[i] for n, col in zip(core, core_cols, strict=True) if col[i] is not None}
        props = {n: col[i] for n, col in zip(extra, extra_cols, strict=True) if col[i] is not None}
        if props:
            ev["properties"] = props
        out.append(ev)
    return out


def item_from_row(row: dict) -> dict:
    """A catalogue row to `ItemIn` wire form: null fields are left out (the schema's defaults apply)."""
    return {k: v for k, v in row.items() if v is not None}


def write_dataset(
    out: Path,
    items: Iterable[dict],
    event_tables: Iterable[pa.Table | pa.RecordBatch],
    sessions: pa.Table | None = None,
    total_events: int | None = None,
) -> int:
    """Write `out/items.jsonl`, `out/events.parquet` (and `out/sessions.parquet`); return the event count.

    `event_tables` must come in time order and share one schema (the first table's).
    """
    out.mkdir(parents=True, exist_ok=True)
    with (out / ITEMS_FILE).open("wb") as f:
        for item in tqdm(items, desc="items", unit=" items", leave=False):
            f.write(_encoder.encode(item))
            f.write(b"\n")
    written = 0
    writer: pq.ParquetWriter | None = None
    with tqdm(total=total_events, desc="events", unit=" ev", unit_scale=True) as bar:
        for table in event_tables:
            if writer is None:
                writer = pq.ParquetWriter(out / EVENTS_FILE, table.schema, compression="zstd")
            writer.write(table if isinstance(table, pa.Table) else pa.Table.from_batches([table]))
            written += table.num_rows
            bar.update(table.num_rows)
    if writer is None:
        pq.write_table(EVENT_CORE_SCHEMA.empty_table(), out / EVENTS_FILE)
    else:
        writer.close()
    if sessions is not None:
        pq.write_table(sessions, out / SESSIONS_FILE, compression="zstd")
    return written


def load_dir(d: Path) -> tuple[list[dict], Iterator[list[dict]]]:
    """A dataset directory's catalogue (wire-form dicts) and its events in time order, in batches <= 1000."""
    with (d / ITEMS_FILE).open("rb") as f:
        items = [msgspec.json.decode(line) for line in f if line.strip()]

    def batches() -> Iterator[list[dict]]:
        for batch in pq.ParquetFile(d / EVENTS_FILE).iter_batches(batch_size=LOAD_BATCH):
            if batch.num_rows:
                yield events_from_table(batch)

    return items, batches()
