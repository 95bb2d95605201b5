"""Tables and schemas: the one place that declares what an event and an item are.

The wire forms (`EventIn`, `ItemIn`) drive validation and the OpenAPI docs; the stored forms
(`Event`, `Item`) drive the log, the Parquet history (`EVENT_ARROW_SCHEMA`) and the features.
"""

from __future__ import annotations

import re
import time
import zlib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import pyarrow as pa

ACTIONS: tuple[str, ...] = ("view", "add_to_cart", "remove_from_cart", "purchase", "favorite", "search")
Action = Literal["view", "add_to_cart", "remove_from_cart", "purchase", "favorite", "search"]
TABLES: tuple[str, ...] = ("events", "items")

MAX_ID_LEN = 256
MAX_NAME_LEN = 1024  # catalogue item names
MAX_TEXT_LEN = 4096  # a text property value
MAX_PROPERTIES = 64
MAX_BATCH = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FUTURE_MS = 5 * 60 * 1000  # an event may be at most 5 minutes ahead of the server clock
MIN_EPOCH_MS = 100_000_000_000  # 1973-03-03 in ms; the earliest event time accepted, whatever its form
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Id = str | int
Short = Annotated[str, msgspec.Meta(max_length=MAX_ID_LEN)]  # surfaces, categories, brands, property names
PropertyValue = (
    Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LEN)]
    | Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]  # what the log, Parquet and DuckDB hold
    | float
    | bool
    | None
)


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    """An event as a client sends it (JSON object)."""

    user_id: Id
    item_id: Id
    action: Action
    ts: str | int  # ISO-8601 (naive means UTC) or epoch milliseconds
    event_id: str | None = None  # idempotency key: a retried event with the same id is stored once
    session_id: Id | None = None  # absent: the features cut sessions at 30 minutes of inactivity
    surface: Short | None = None  # home, search, cart, pdp, ...
    properties: dict[Short, PropertyValue] | None = None


class Event(msgspec.Struct, array_like=True):
    """An event as stored in the log: validated, normalised and enriched with its item's category."""

    user_id: str
    item_id: str
    action: str
    ts: int  # event time, epoch milliseconds UTC
    event_id: str | None = None
    session_id: str | None = None
    surface: str | None = None
    properties: dict[str, Any] | None = None
    category: str | None = None  # from the catalogue at ingest time; None for an unknown item
    subcategory: str | None = None
    ingest_ts: int = 0  # server wall clock when validated, epoch ms (freshness is measured from it)
    offset: int = -1  # position in the log, assigned on append; monotonically increasing
    # Catalogue attributes joined at ingest, like `category` (after `offset` so older log records, which
    # lack them, still decode): what the catalogue said when the event arrived, so a feature over them is
    # the same online and offline. Bounded (Short), so no request can amplify into the log.
    brand: str | None = None
    price: float | None = None
    price_band: str | None = None  # price_band(price)


class ItemIn(msgspec.Struct, forbid_unknown_fields=True):
    """A catalogue row as a client sends it. The hierarchy is category > subcategory > item."""

    item_id: Id
    category: Short  # copied into every event of the item: bounded, so a request cannot amplify into the log
    subcategory: Short | None = None  # absent: the item sits directly under its category
    price: float | None = None
    available: bool = True
    brand: Short | None = None
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LEN)] | None = None


class Item(msgspec.Struct, array_like=True):
    """A catalogue row as stored."""

    item_id: str
    category: str
    subcategory: str
    price: float | None = None
    available: bool = True
    brand: str | None = None
    name: str | None = None
    updated_ts: int = 0


EVENT_ARROW_SCHEMA = pa.schema(
    [
        ("offset", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("action", pa.string()),
        ("ts", pa.int64()),
        ("event_id", pa.string()),
        ("session_id", pa.string()),
        ("surface", pa.string()),
        ("properties", pa.string()),  # JSON text, so analysts can still reach it from SQL
        ("category", pa.string()),
        ("subcategory", pa.string()),
        ("ingest_ts", pa.int64()),
        ("brand", pa.string()),
        ("price", pa.float64()),
        ("price_band", pa.string()),
    ]
)
# The columns an older history part may lack (written before they existed): read as NULL.
LATER_EVENT_COLUMNS = ("brand", "price", "price_band")
_SQL_TYPE = {pa.int64(): "BIGINT", pa.string(): "VARCHAR", pa.float64(): "DOUBLE"}


def event_columns_sql(present: set[str] | list[str]) -> str:
    """The select list of the stored-event columns from a source holding `present`: a column the source
    lacks (a history part written before it existed) is NULL of its type, so every reader sees one schema."""
    out = []
    for f in EVENT_ARROW_SCHEMA:
        quoted = '"' + f.name + '"'
        out.append(quoted if f.name in present else f"NULL::{_SQL_TYPE[f.type]} AS {quoted}")
    return ", ".join(out)


# Price bands (decision: fixed, roughly log-spaced edges in the catalogue's currency) so that a feature
# can count "price levels" a shopper browses; computed once, at ingest, and stored with the event.
PRICE_BAND_EDGES: tuple[float, ...] = (10, 25, 50, 100, 250, 500, 1000)


def price_band(price: float | None) -> str | None:
    """'<10', '10-25', ..., '500-1000', '1000+' (lower edge inclusive); None for an item without a price."""
    if price is None:
        return None
    edges = PRICE_BAND_EDGES
    if price < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in zip(edges, edges[1:], strict=False):
        if price < hi:
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+"

ITEM_ARROW_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("category", pa.string()),
        ("subcategory", pa.string()),
        ("price", pa.float64()),
        ("available", pa.bool_()),
        ("brand", pa.string()),
        ("name", pa.string()),
        ("updated_ts", pa.int64()),
    ]
)


class FieldError(msgspec.Struct):
    """One reason a record was refused: which record (0-based index in the batch), which field, why."""

    index: int
    field: str
    message: str


class BatchRejected(ValueError):
    """A batch failed validation; nothing of it was stored."""

    def __init__(self, errors: list[FieldError], status: int = 422) -> None:
        self.errors = errors
        self.status = status
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"record {first.index}, field {first.field!r}: {first.message}{more}")


_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def _split_msgspec_error(err: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec says 'Expected `int`, got `str` - at `$.ts`'; return ('ts', 'Expected `int`, got `str`')."""
    text = str(err)
    m = _AT.search(text)
    if m is None:
        unknown = re.match(r"Object contains unknown field `([^`]*)`", text)
        missing = re.match(r"Object missing required field `([^`]*)`", text)
        field = (unknown or missing).group(1) if (unknown or missing) else ""
        return field, text
    return m.group(1) or "", text[: m.start()]


def parse_ts(value: str | int, now_ms: int, field: str = "ts") -> int:
    """Event time to epoch ms, in [MIN_EPOCH_MS, now + MAX_FUTURE_MS] whether sent as text or as an integer.
    Raises ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be ISO-8601 text or epoch milliseconds, got a boolean")
    if isinstance(value, int):
        if value < MIN_EPOCH_MS:
            raise ValueError(f"{field}={value} looks like epoch seconds or is before 1973; send epoch milliseconds")
        ms = value
    else:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{field}={value!r} is not ISO-8601 (e.g. 2026-11-22T13:05:00Z)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        try:
            ms = int(dt.timestamp() * 1000)
        except (OverflowError, OSError, ValueError):  # out of the platform's range (years 1 and 9999 with offsets)
            ms = MIN_EPOCH_MS - 1 if dt.year < 1973 else now_ms + MAX_FUTURE_MS + 1
        if ms < MIN_EPOCH_MS:
            raise ValueError(f"{field}={value!r} is before 1973-03-03, the earliest event time accepted")
    if ms > now_ms + MAX_FUTURE_MS:
        raise ValueError(f"{field} is {(ms - now_ms) / 1000:.0f}s in the future (at most {MAX_FUTURE_MS // 1000}s)")
    return ms


def _check_id(name: str, value: Id | None, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a string or an integer, got a boolean")
    text = str(value)
    if not text or len(text) > MAX_ID_LEN:
        raise ValueError(f"{name} must be 1..{MAX_ID_LEN} characters")
    return text


def normalise_event(rec: EventIn, now_ms: int) -> Event:
    """Check what the types cannot say (ids, time, sizes) and build the stored form (not yet enriched)."""
    if rec.properties is not None and len(rec.properties) > MAX_PROPERTIES:
        raise _FieldValueError("properties", f"at most {MAX_PROPERTIES} properties")
    values: dict[str, Any] = {}
    for name, required in (("user_id", True), ("item_id", True), ("event_id", False), ("session_id", False)):
        try:
            values[name] = _check_id(name, getattr(rec, name), required=required)
        except ValueError as e:
            raise _FieldValueError(name, str(e)) from None
    try:
        ts = parse_ts(rec.ts, now_ms)
    except ValueError as e:
        raise _FieldValueError("ts", str(e)) from None
    return Event(
        user_id=values["user_id"],
        item_id=values["item_id"],
        action=rec.action,
        ts=ts,
        event_id=values["event_id"],
        session_id=values["session_id"],
        surface=rec.surface,
        properties=rec.properties,
        ingest_ts=now_ms,
    )


class _FieldValueError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_events(records: list[Any], now_ms: int | None = None) -> list[Event]:
    """Validate a decoded batch (list of JSON objects); all-or-nothing. Raises BatchRejected."""
    if len(records) > MAX_BATCH:
        raise BatchRejected([FieldError(-1, "", f"batch of {len(records)} records exceeds {MAX_BATCH}")], 413)
    if not records:
        raise BatchRejected([FieldError(-1, "", "empty batch: send at least one event")])
    now = int(time.time() * 1000) if now_ms is None else now_ms
    out: list[Event] = []
    errors: list[FieldError] = []
    for i, raw in enumerate(records):
        try:
            out.append(normalise_event(msgspec.convert(raw, EventIn, strict=True), now))
        except msgspec.ValidationError as e:
            field, message = _split_msgspec_error(e)
            errors.append(FieldError(i, field, message))
        except _FieldValueError as e:
            errors.append(FieldError(i, e.field, str(e)))
    if errors:
        raise BatchRejected(errors)
    return out


def validate_items(records: list[Any], now_ms: int | None = None) -> list[Item]:
    """Validate a decoded batch of catalogue rows; all-or-nothing. Raises BatchRejected."""
    if len(records) > MAX_BATCH:
        raise BatchRejected([FieldError(-1, "", f"batch of {len(records)} records exceeds {MAX_BATCH}")], 413)
    if not records:
        raise BatchRejected([FieldError(-1, "", "empty batch: send at least one item")])
    now = int(time.time() * 1000) if now_ms is None else now_ms
    out: list[Item] = []
    errors: list[FieldError] = []
    for i, raw in enumerate(records):
        try:
            rec = msgspec.convert(raw, ItemIn, strict=True)
            item_id = _check_id("item_id", rec.item_id, required=True)
            assert item_id is not None
            if not rec.category:
                raise _FieldValueError("category", "category must not be empty")
            out.append(
                Item(item_id, rec.category, rec.subcategory or rec.category, rec.price, rec.available,
                     rec.brand, rec.name, now)
            )
        except msgspec.ValidationError as e:
            field, message = _split_msgspec_error(e)
            errors.append(FieldError(i, field, message))
        except _FieldValueError as e:
            errors.append(FieldError(i, e.field, str(e)))
        except ValueError as e:
            errors.append(FieldError(i, "item_id", str(e)))
    if errors:
        raise BatchRejected(errors)
    return out


def decode_body(body: bytes, content_type: str | None) -> list[Any]:
    """A JSON object, a JSON array, or NDJSON (one object per line) to a list of records.

    The body's size is bounded before it is read (the server's body limit); nesting deeper than the
    decoder's recursion limit is refused with 400 like any malformed JSON, never a 500."""
    ndjson = content_type is not None and "ndjson" in content_type
    if ndjson:
        records = []
        for line_no, line in enumerate(body.splitlines()):
            if not line.strip():
                continue
            records.append(_decode_json(line, len(records), f"line {line_no + 1}: "))
        return records
    doc = _decode_json(body, -1, "")
    return doc if isinstance(doc, list) else [doc]


def _decode_json(text: bytes, index: int, where: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise BatchRejected([FieldError(index, "", f"{where}malformed JSON: {e}")], 400) from None
    except RecursionError:
        raise BatchRejected(
            [FieldError(index, "", f"{where}JSON nested too deeply: a record's values are single values, and "
                        "`properties` an object of single values")],
            400,
        ) from None


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a shopper's events, in the log and in the online feature state alike: crc32 of the
    UTF-8 id modulo P (stable across processes, never Python's salted hash())."""
    return zlib.crc32(user_id.encode()) % partitions
