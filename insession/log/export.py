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

Object stores (decision): a history location with a URI scheme other than `file://` (`s3://bucket/prefix`,
`gs://...`, anything `pyarrow.fs.FileSystem.from_uri` opens) is written and read through `pyarrow.fs`
(`HistoryStore`), the same layout under the prefix. There is no rename: a part is serialised in memory
and written with one PUT of the whole object, which the store makes visible whole or not at all (a
writer that dies mid-upload leaves nothing, so there are no temporaries to clean); the manifest is
likewise one PUT after the parts, replacing the previous one whole. Orphan removal deletes parts beyond
the mark as on a disk; quarantine is a copy and a delete. `verify_history` checks each listed part's
size from the listing but does not read every part back for its crc32 (that would download the whole
history at every start or takeover; a PUT is checksummed by the store on upload). Local paths (and
`file://` URIs) keep the fsync-then-rename writes above.
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
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from insession.durable import replace_durably, write_atomic
from insession.schema import EVENT_ARROW_SCHEMA, Event

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine"
ARROW_CHUNK = 4_096  # events converted to Arrow per C call (each holds the GIL throughout)
_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_PART_PATH = re.compile(r"^day=[^/]+/part-(\d+)-(\d+)\.parquet$")  # a part, relative to the history
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


def is_object_store(location: str | Path) -> bool:
    """Whether a history location is an object-store URI (a scheme other than `file://`), written through
    pyarrow.fs without renames; a plain path or a `file://` URI is a local directory."""
    text = str(location)
    return not isinstance(location, Path) and "://" in text and not text.startswith("file://")


def history_location(text: str | Path) -> str | Path:
    """`[log] history` as the history functions take it: a Path for a local directory (also `file://`), the
    URI itself for an object store (a Path would fold `s3://` into `s3:/`)."""
    if is_object_store(text):
        return str(text)
    return Path(str(text).removeprefix("file://"))


def redacted(location: str | Path) -> str:
    """A history location fit for messages and logs: credentials in a URI's user part
    (`s3://KEY:SECRET@bucket/...`) replaced by `***` (prefer the environment's credentials anyway)."""
    text = str(location)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


class HistoryStore:
    """A history's files, on a local disk (`local` set: fsync-then-rename writes, `pathlib`) or in an object
    store through pyarrow.fs (one PUT per object; see the module doc). Paths given to and returned by the
    methods are relative to the history (`day=YYYY-MM-DD/part-A-B.parquet`, `_manifest.json`)."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        if is_object_store(location):
            try:
                fs, root = pafs.FileSystem.from_uri(self.location)
            except (pa.ArrowException, ValueError) as e:
                raise ValueError(f"history {redacted(self.location)!r} is not a filesystem URI pyarrow can open "
                                 f"({redacted(str(e))}); write "
                                 "s3://bucket/prefix (credentials from the environment) or a local path") from e
            self.local: Path | None = None
            self.fs: pafs.FileSystem = fs
            self.root = root.rstrip("/")
        else:
            self.local = Path(self.location.removeprefix("file://"))
            self.fs = pafs.LocalFileSystem()
            self.root = str(self.local)

    @classmethod
    def of(cls, history: str | Path | HistoryStore) -> HistoryStore:
        return history if isinstance(history, HistoryStore) else cls(history)

    def __str__(self) -> str:
        return redacted(self.location)

    def full(self, rel: str) -> str:
        """The path of `rel` as `self.fs` names it."""
        return f"{self.root}/{rel}"

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists()
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound or bool(self.files())

    def files(self) -> dict[str, int]:
        """Every file one level below a `day=` directory (parts, and locally also temporaries): relative path
        -> size in bytes."""
        if self.local is not None:
            return {str(p.relative_to(self.local)): p.stat().st_size
                    for p in self.local.glob("day=*/*") if p.is_file()}
        out = {}
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        for info in infos:
            rel = info.path[len(self.root) + 1:]
            if info.type == pafs.FileType.File and rel.startswith("day=") and rel.count("/") == 1:
                out[rel] = int(info.size or 0)
        return out

    def parts(self) -> list[str]:
        """The complete part files (`day=*/part-A-B.parquet`), sorted: what analytics and training read."""
        if self.local is not None:
            return sorted(str(p.relative_to(self.local)) for p in self.local.glob(HISTORY_GLOB))
        return sorted(rel for rel in self.files() if _PART_PATH.match(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        """A whole file's bytes; None when it does not exist."""
        if self.local is not None:
            path = self.local / rel
            return path.read_bytes() if path.exists() else None
        try:
            with self.fs.open_input_stream(self.full(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` with `data`, whole: fsync-then-rename on a disk, one PUT to an object store."""
        if self.local is not None:
            write_atomic(self.local / rel, data)
            return
        with self.fs.open_output_stream(self.full(rel)) as f:
            f.write(data)

    def write_part(self, rel: str, events: Sequence[Event]) -> Part:
        """Write events as the Parquet part `rel`, whole or not at all; its manifest record."""
        table = events_to_arrow(events)
        if self.local is not None:
            path = self.local / rel
            write_parquet_atomic(table, path)
            return Part(rel, events[0].offset, events[-1].offset, len(events), path.stat().st_size, _crc32(path))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(rel, data)
        return Part(rel, events[0].offset, events[-1].offset, len(events), len(data), zlib.crc32(data))

    def intact(self, part: Part, size: int | None) -> bool:
        """Whether the file of `part` (listed with `size`; None: absent) is what the manifest records: size and
        crc32 on a disk, size in an object store (module doc)."""
        if size is None or size != part.size:
            return False
        return self.local is None or _crc32(self.local / part.path) == part.crc32

    def delete(self, rel: str) -> None:
        if self.local is not None:
            (self.local / rel).unlink()
        else:
            self.fs.delete_file(self.full(rel))

    def move(self, rel: str, to: str) -> None:
        """Move a file within the history (a rename on a disk; a copy and a delete in an object store)."""
        if self.local is not None:
            target = self.local / to
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.local / rel).replace(target)
        else:
            self.fs.move(self.full(rel), self.full(to))

    def rows(self, rel: str) -> int:
        """A part's row count from its Parquet footer."""
        if self.local is not None:
            return pq.read_metadata(self.local / rel).num_rows
        with self.fs.open_input_file(self.full(rel)) as f:
            return pq.read_metadata(f).num_rows

    def dataset(self, rels: Sequence[str]) -> pads.Dataset:
        """The given parts as one Arrow dataset with `EVENT_ARROW_SCHEMA` (a part older than a column reads it
        as null), scanned lazily through this store's filesystem."""
        return pads.dataset([self.full(r) for r in rels], schema=EVENT_ARROW_SCHEMA, format="parquet",
                            filesystem=self.fs)


def check_history(location: str | Path) -> None:
    """Refuse an object-store history that cannot be used, before a node starts on it: a URI pyarrow cannot
    open, or a bucket that does not exist or cannot be reached (ValueError saying which; nothing is created).
    A local directory is created by the first export and is not checked here."""
    if not is_object_store(location):
        return
    store = HistoryStore(location)
    bucket = store.root.split("/", 1)[0]
    try:
        found = store.fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        raise ValueError(f"history {store}: bucket {bucket!r} cannot be reached ({redacted(str(e))}); check the URI's "
                         "endpoint and the credentials in the environment") from e
    if not found:
        raise ValueError(f"history {store}: bucket {bucket!r} does not exist; create it (insession creates none)")


def _first(rel: str) -> int:
    """A part's first offset by its name; 0 for a file the glob matched without offsets in its name (a stray
    copy: read, and filtered by its rows' offsets, as the analytics lane reads it)."""
    m = _PART.match(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def _last(rel: str) -> int:
    m = _PART.match(rel.rsplit("/", 1)[-1])
    return int(m.group(2)) if m else 2**62


def load_manifest(history_dir: str | Path | HistoryStore) -> dict[str, Part]:
    data = HistoryStore.of(history_dir).read_bytes(MANIFEST)
    if data is None:
        return {}
    return {p.path: p for p in msgspec.json.decode(data, type=list[Part])}


def _save_manifest(store: HistoryStore, parts: dict[str, Part]) -> None:
    store.write_bytes(MANIFEST, msgspec.json.encode(sorted(parts.values(), key=lambda p: p.path)))


ChunkWriter = Callable[[int, int], None]
"""How an export writes the log's events first..last to the history (`write_day_partitions` of them). A
serving process passes one that runs in an analytics worker process (`AnalyticsLane.export_writer`): the
worker reads the range from the log itself, so none of the export's Python work (reading and decoding
50,000 events, converting them to Arrow, writing Parquet) runs on the serving process's GIL. Read back in
the server, paced to half of the time, each export still came with a 100-300 ms spike of every request in
bench_mixed at a million shoppers."""


def writer_here(read: Callable[[int, int], Iterable[Event]], history: str | Path | HistoryStore) -> ChunkWriter:
    """The `ChunkWriter` that reads the range with `read(first, last)` and writes it in this process (an
    explicit `export()`, the last one at close, and tools without workers)."""
    def write(first: int, last: int) -> None:
        write_day_partitions(list(read(first, last)), history)

    return write


def events_to_arrow(events: Sequence[Event]) -> pa.Table:
    """Stored events (offsets assigned) as one Arrow table with `EVENT_ARROW_SCHEMA`, converted ARROW_CHUNK
    rows at a time: Arrow converts Python lists in one C call that holds the GIL throughout (65 ms for
    50,000 events here, a stall of every request of the process); in chunks the longest call took 5.8 ms."""
    if len(events) <= ARROW_CHUNK:
        return _to_arrow(events)
    return pa.concat_tables([_to_arrow(events[i : i + ARROW_CHUNK]) for i in range(0, len(events), ARROW_CHUNK)])


def _to_arrow(events: Sequence[Event]) -> pa.Table:
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


def history_files(history_dir: str | Path | HistoryStore) -> list[str]:
    """The complete Parquet part files of the history: what analytics and training read (temporaries of a
    running export and files set aside in `_quarantine/` are not matched). Full paths, as the store's
    filesystem names them (for a local directory: ordinary paths)."""
    store = HistoryStore.of(history_dir)
    return [store.full(rel) for rel in store.parts()]


def read_history(history: str | Path | HistoryStore, below: int | None = None) -> pa.Table:
    """The history's events (EVENT_ARROW_SCHEMA, part order), only those with offset < `below` when given:
    parts that start at or beyond it are not even opened (a takeover may be removing them)."""
    store = HistoryStore.of(history)
    rels = [r for r in store.parts() if below is None or _first(r) < below]
    if not rels:
        return EVENT_ARROW_SCHEMA.empty_table()
    table = store.dataset(rels).to_table()
    return table if below is None else table.filter(pc.less(table["offset"], below))


def history_dataset(history: str | Path | HistoryStore, below: int | None = None) -> pads.Dataset:
    """The history as a lazily scanned Arrow dataset holding only offsets < `below` (when given): parts wholly
    below it are scanned from the store; a part that straddles it (a mark trailing the exporter's) is read
    and filtered in memory. What the analytics lane hands DuckDB for an object-store history."""
    store = HistoryStore.of(history)
    whole, straddling = [], []
    for rel in store.parts():
        first, last = _first(rel), _last(rel)
        if below is None or last < below:
            whole.append(rel)
        elif first < below:
            straddling.append(rel)
    children: list[pads.Dataset] = [store.dataset(whole)]
    if straddling:
        table = store.dataset(straddling).to_table()
        children.append(pads.dataset(table.filter(pc.less(table["offset"], below))))
    return children[0] if len(children) == 1 else pads.dataset(children)


def day_of(ts_ms: int) -> str:
    """The UTC calendar day of an epoch-ms timestamp, as YYYY-MM-DD."""
    return datetime.fromtimestamp(ts_ms // DAY_MS * 86_400, UTC).strftime("%Y-%m-%d")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` so that the file is either absent or complete and on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    replace_durably(tmp, path)


def write_day_partitions(events: Sequence[Event], history_dir: str | Path | HistoryStore) -> list[str]:
    """Write events (in offset order) as one Parquet file per event day, then the manifest listing them;
    returns the parts written (relative to the history)."""
    store = HistoryStore.of(history_dir)
    by_day: dict[int, list[Event]] = {}
    for ev in events:
        by_day.setdefault(ev.ts // DAY_MS, []).append(ev)
    written = []
    manifest = load_manifest(store)
    for day_index, day_events in sorted(by_day.items()):
        rel = f"day={day_of(day_index * DAY_MS)}/part-{day_events[0].offset}-{day_events[-1].offset}.parquet"
        manifest[rel] = store.write_part(rel, day_events)
        written.append(rel)
    if written:
        _save_manifest(store, manifest)
    return written


def history_end(history_dir: str | Path | HistoryStore) -> int:
    """The last offset the Parquet history holds, by its manifest and its part files' names; -1: none."""
    store = HistoryStore.of(history_dir)
    try:
        ends = [part.last for part in load_manifest(store).values()]
    except ValueError:  # an unreadable manifest: verify_history refuses it with its own message
        ends = []
    ends += [int(m.group(2)) for rel in store.parts() if (m := _PART.match(rel.rsplit("/", 1)[-1]))]
    return max(ends, default=-1)


def remove_orphans(history_dir: str | Path | HistoryStore, exported_offset: int) -> int:
    """Delete part files (and temporaries) left by an export that crashed before it was recorded, and
    their manifest entries."""
    store = HistoryStore.of(history_dir)
    removed = 0
    for rel in store.files():
        m = _PART.match(rel.rsplit("/", 1)[-1])
        if (m is None and rel.endswith(".parquet.tmp")) or (m and int(m.group(1)) > exported_offset):
            store.delete(rel)
            removed += 1
    manifest = load_manifest(store)
    kept = {name: p for name, p in manifest.items() if p.first <= exported_offset}
    if len(kept) != len(manifest):
        _save_manifest(store, kept)
    return removed


def verify_history(history_dir: str | Path | HistoryStore, exported_offset: int,
                   read: Callable[[int, int], Iterable[Event]]) -> HistoryCheck:
    """Make the Parquet history what the manifest says (see the module doc). `read(first, last)` gives the
    log's events in [first, last]. A directory from before the manifest is adopted as it is (once).
    Raises ValueError when a part cannot be rebuilt to its recorded rows from the log."""
    store = HistoryStore.of(history_dir)
    check = HistoryCheck()
    if not store.exists():
        return check
    remove_orphans(store, exported_offset)
    manifest = load_manifest(store)
    on_disk = store.files()
    if not manifest and on_disk:  # written before the manifest existed: adopt what is there
        for name in on_disk:
            m = _PART.match(name.rsplit("/", 1)[-1])
            if m:
                data = store.read_bytes(name) or b""
                manifest[name] = Part(name, int(m.group(1)), int(m.group(2)), store.rows(name), len(data),
                                      zlib.crc32(data))
        _save_manifest(store, manifest)
        log.warning("history %s had no manifest: adopted %d parts as they are", store, len(manifest))
    for name in on_disk:
        if name not in manifest:
            _quarantine(store, name, "not in the manifest (a stray copy would count its events twice)")
            check.quarantined += 1
    for name, part in manifest.items():
        if store.intact(part, on_disk.get(name)):
            continue
        if name in on_disk:
            _quarantine(store, name, "its size or crc32 differs from the manifest's")
            check.quarantined += 1
        day = name.split("/", 1)[0].removeprefix("day=")
        events = [e for e in read(part.first, part.last) if day_of(e.ts) == day]
        if len(events) != part.rows:
            raise ValueError(f"history part {name} cannot be rebuilt from the log: {len(events)} of its "
                             f"{part.rows} events are in the log")
        manifest[name] = store.write_part(name, events)
        log.warning("history part %s was missing or damaged: rebuilt from the log (%d events)", name, part.rows)
        check.rebuilt += 1
    if check.rebuilt:
        _save_manifest(store, manifest)
    check.parts = len(manifest)
    return check


def _quarantine(store: HistoryStore, rel: str, why: str) -> None:
    store.move(rel, f"{QUARANTINE}/{rel}")
    log.warning("history file %s moved to %s/: %s", rel, QUARANTINE, why)
