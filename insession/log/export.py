"""Columnar history: stored events to Arrow and to day-partitioned Parquet files, written atomically.

Layout: `history_dir/day=YYYY-MM-DD/part-<first offset>-<last offset>.parquet` (day of the event time,
UTC), schema `EVENT_ARROW_SCHEMA`, properties as JSON text. A file is written to a temporary name,
fsynced and renamed into place, so a reader never sees half a file. A crash between the rename and
the durable record of the exported offset leaves files whose first offset lies beyond the recorded
exported offset: `remove_orphans` deletes them before the range is exported again, so no event is
ever in the history twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from insession.durable import replace_durably
from insession.schema import EVENT_ARROW_SCHEMA, Event

DAY_MS = 86_400_000
_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_json = msgspec.json.Encoder()


def events_to_arrow(events: Sequence[Event]) -> pa.Table:
    """Stored events (offsets assigned) as one Arrow table with `EVENT_ARROW_SCHEMA`."""
    columns: dict[str, list[object]] = {name: [] for name in EVENT_ARROW_SCHEMA.names}
    for ev in events:
        columns["offset"].append(ev.offset)
        columns["user_id"].append(ev.user_id)
        columns["item_id"].append(ev.item_id)
        columns["action"].append(ev.action)
        columns["ts"].append(ev.ts)
        columns["event_id"].append(ev.event_id)
        columns["session_id"].append(ev.session_id)
        columns["surface"].append(ev.surface)
        columns["properties"].append(None if ev.properties is None else _json.encode(ev.properties).decode())
        columns["category"].append(ev.category)
        columns["subcategory"].append(ev.subcategory)
        columns["ingest_ts"].append(ev.ingest_ts)
    return pa.table(columns, schema=EVENT_ARROW_SCHEMA)


def day_of(ts_ms: int) -> str:
    """The UTC calendar day of an epoch-ms timestamp, as YYYY-MM-DD."""
    return datetime.fromtimestamp(ts_ms // DAY_MS * 86_400, UTC).strftime("%Y-%m-%d")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so that the file is either absent or complete and on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    replace_durably(tmp, path)


def write_day_partitions(events: Sequence[Event], history_dir: Path) -> list[Path]:
    """Write events (in offset order) as one Parquet file per event day; returns the files written."""
    by_day: dict[int, list[Event]] = {}
    for ev in events:
        by_day.setdefault(ev.ts // DAY_MS, []).append(ev)
    written = []
    for day_index, day_events in sorted(by_day.items()):
        path = (history_dir / f"day={day_of(day_index * DAY_MS)}"
                / f"part-{day_events[0].offset}-{day_events[-1].offset}.parquet")
        write_parquet_atomic(events_to_arrow(day_events), path)
        written.append(path)
    return written


def remove_orphans(history_dir: Path, exported_offset: int) -> int:
    """Delete part files (and temporaries) left by an export that crashed before it was recorded."""
    removed = 0
    for path in history_dir.glob("day=*/*"):
        m = _PART.match(path.name)
        if (m is None and path.name.endswith(".parquet.tmp")) or (m and int(m.group(1)) > exported_offset):
            path.unlink()
            removed += 1
    return removed
