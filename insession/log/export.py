"""Columnar history: stored events to Arrow and to day-partitioned Parquet files, written atomically.

Layout: `history_dir/day=YYYY-MM-DD/part-<first offset>-<last offset>.parquet` (day of the event time,
UTC), schema `EVENT_ARROW_SCHEMA`, properties as JSON text. A file is written to a temporary name,
fsynced and renamed into place, so a reader never sees half a file. A crash between the rename and
the durable record of the exported offset leaves files whose first offset lies beyond the recorded
exported offset: `remove_orphans` deletes them before the range is exported again, so no event is
ever in the history twice.

The history knows its own contents: `history_dir/_manifest.json` (written atomically after each part)
lists every part with its offset range, row count, size and crc32. `verify_history` (at every start)
moves a file the manifest does not list into `_quarantine/` (a stray copy would count its events
twice), and rebuilds from the log a part that is missing, truncated or altered (size or crc32), so the
analytics lane and training never read a history that differs from the log without a loud log line.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from insession.durable import replace_durably, write_atomic
from insession.schema import EVENT_ARROW_SCHEMA, Event

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine"
_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_json = msgspec.json.Encoder()


class Part(msgspec.Struct, frozen=True):
    """One history file as the manifest records it (`path` relative to the history directory)."""

    path: str
    first: int
    last: int
    rows: int
    size: int
    crc32: int


class HistoryCheck(msgspec.Struct):
    """What `verify_history` found and did."""

    parts: int = 0
    rebuilt: int = 0
    quarantined: int = 0


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def load_manifest(history_dir: Path) -> dict[str, Part]:
    path = history_dir / MANIFEST
    if not path.exists():
        return {}
    return {p.path: p for p in msgspec.json.decode(path.read_bytes(), type=list[Part])}


def _save_manifest(history_dir: Path, parts: dict[str, Part]) -> None:
    write_atomic(history_dir / MANIFEST, msgspec.json.encode(sorted(parts.values(), key=lambda p: p.path)))


def _record(history_dir: Path, path: Path, events: Sequence[Event]) -> Part:
    return Part(str(path.relative_to(history_dir)), events[0].offset, events[-1].offset, len(events),
                path.stat().st_size, _crc32(path))


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
        columns["brand"].append(ev.brand)
        columns["price"].append(ev.price)
        columns["price_band"].append(ev.price_band)
    return pa.table(columns, schema=EVENT_ARROW_SCHEMA)


def events_from_arrow(table: pa.Table | pa.RecordBatch) -> list[Event]:
    """The inverse of `events_to_arrow` (columns a part written before they existed read as None)."""
    decode = msgspec.json.decode
    out = []
    for r in table.to_pylist():
        props = r.get("properties")
        out.append(Event(r["user_id"], r["item_id"], r["action"], r["ts"], r.get("event_id"), r.get("session_id"),
                         r.get("surface"), None if props is None else decode(props), r.get("category"),
                         r.get("subcategory"), r.get("ingest_ts") or 0, r["offset"], r.get("brand"), r.get("price"),
                         r.get("price_band")))
    return out


HISTORY_GLOB = "day=*/part-*.parquet"  # a history's part files: not temporaries, not `_quarantine/`


def history_files(history_dir: Path) -> list[str]:
    """The complete Parquet part files of the history: what analytics and training read (temporaries of a
    running export and files set aside in `_quarantine/` are not matched)."""
    return sorted(str(p) for p in Path(history_dir).glob(HISTORY_GLOB))


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
    manifest = load_manifest(history_dir)
    for day_index, day_events in sorted(by_day.items()):
        path = (history_dir / f"day={day_of(day_index * DAY_MS)}"
                / f"part-{day_events[0].offset}-{day_events[-1].offset}.parquet")
        write_parquet_atomic(events_to_arrow(day_events), path)
        part = _record(history_dir, path, day_events)
        manifest[part.path] = part
        written.append(path)
    if written:
        _save_manifest(history_dir, manifest)
    return written


def history_end(history_dir: Path) -> int:
    """The last offset the Parquet history holds, by its manifest and its part files' names; -1: none."""
    try:
        ends = [part.last for part in load_manifest(history_dir).values()]
    except ValueError:  # an unreadable manifest: verify_history refuses it with its own message
        ends = []
    ends += [int(m.group(2)) for path in history_dir.glob(HISTORY_GLOB) if (m := _PART.match(path.name))]
    return max(ends, default=-1)


def remove_orphans(history_dir: Path, exported_offset: int) -> int:
    """Delete part files (and temporaries) left by an export that crashed before it was recorded, and
    their manifest entries."""
    removed = 0
    for path in history_dir.glob("day=*/*"):
        m = _PART.match(path.name)
        if (m is None and path.name.endswith(".parquet.tmp")) or (m and int(m.group(1)) > exported_offset):
            path.unlink()
            removed += 1
    manifest = load_manifest(history_dir)
    kept = {name: p for name, p in manifest.items() if p.first <= exported_offset}
    if len(kept) != len(manifest):
        _save_manifest(history_dir, kept)
    return removed


def verify_history(history_dir: Path, exported_offset: int,
                   read: Callable[[int, int], Iterable[Event]]) -> HistoryCheck:
    """Make the Parquet history what the manifest says (see the module doc). `read(first, last)` gives the
    log's events in [first, last]. A directory from before the manifest is adopted as it is (once).
    Raises ValueError when a part cannot be rebuilt to its recorded rows from the log."""
    check = HistoryCheck()
    if not history_dir.exists():
        return check
    remove_orphans(history_dir, exported_offset)
    manifest = load_manifest(history_dir)
    on_disk = {str(p.relative_to(history_dir)): p for p in history_dir.glob("day=*/*") if p.is_file()}
    if not manifest and on_disk:  # written before the manifest existed: adopt what is there
        for name, path in on_disk.items():
            m = _PART.match(path.name)
            if m:
                rows = pq.read_metadata(path).num_rows
                manifest[name] = Part(name, int(m.group(1)), int(m.group(2)), rows, path.stat().st_size, _crc32(path))
        _save_manifest(history_dir, manifest)
        log.warning("history %s had no manifest: adopted %d parts as they are", history_dir.name, len(manifest))
    for name, path in on_disk.items():
        if name not in manifest:
            _quarantine(history_dir, path, "not in the manifest (a stray copy would count its events twice)")
            check.quarantined += 1
    for name, part in manifest.items():
        path = history_dir / name
        if path.exists() and path.stat().st_size == part.size and _crc32(path) == part.crc32:
            continue
        if path.exists():
            _quarantine(history_dir, path, "its size or crc32 differs from the manifest's")
            check.quarantined += 1
        day = path.parent.name.removeprefix("day=")
        events = [e for e in read(part.first, part.last) if day_of(e.ts) == day]
        if len(events) != part.rows:
            raise ValueError(f"history part {name} cannot be rebuilt from the log: {len(events)} of its "
                             f"{part.rows} events are in the log")
        write_parquet_atomic(events_to_arrow(events), path)
        manifest[name] = _record(history_dir, path, events)
        log.warning("history part %s was missing or damaged: rebuilt from the log (%d events)", name, part.rows)
        check.rebuilt += 1
    if check.rebuilt:
        _save_manifest(history_dir, manifest)
    check.parts = len(manifest)
    return check


def _quarantine(history_dir: Path, path: Path, why: str) -> None:
    target = history_dir / QUARANTINE / path.relative_to(history_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    path.replace(target)
    log.warning("history file %s moved to %s/: %s", path.relative_to(history_dir), QUARANTINE, why)
