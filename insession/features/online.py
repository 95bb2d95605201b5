"""Online aggregation state: one small state object per declared feature, updated per event, read at t.

Every aggregation gets the accepted events of a batch in offset order (`add_batch`), each carrying its
stable ids, its session number and the watermark right after its arrival, and answers `read(key, t)`
with a JSON-able value at t (the watermark). Per-event work is a few dict operations in one tight loop
per feature and batch; state is bounded per key (capped sequences, tiles that expire).

Three contracts the engine builds on (docs/features.md, "Online state"):

- **Stable keys.** State is keyed by `stable_id(id)` (63 bits of blake2b over the UTF-8 id), the same in
  every process and Python version, so state written by one process reads in another. A (user, item)
  key is the pair of the two. Values that reads must name back (items, categories, other declared
  fields) are kept in `Names`; shopper ids never are (a million shoppers cost no name table).
- **Reads are pure.** `read`/`read_many` never change state: what left the window is skipped when read
  and dropped on the write path or by `sweep` (maintenance).
- **A codec per aggregation.** `capture()` turns the state into msgpack bytes (plain ints, floats, bytes,
  lists and maps: no Python classes) and `restore()` reads them back; the engine frames them with a
  versioned header and a checksum (`insession.features.snapshot`).
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable
from functools import cache
from itertools import chain, islice
from operator import attrgetter, itemgetter
from typing import Any

import msgspec
import numpy as np

from insession.features.declare import MINUTE_MS, Feature, Window
from insession.schema import ACTIONS, Event

NONE_ID = -1  # the id of a missing value (stable ids are >= 0)
ACTION_INDEX = {a: i for i, a in enumerate(ACTIONS)}
# One sequence element: ts, item, category, action (25 bytes). Sequences are ordered by (ts, offset) without
# storing the offset: a key's events arrive in offset order, so a new event goes after every stored one with
# a ts at most its own, and of two sequences merged, the first holds the events that arrived earlier.
_REC = struct.Struct("<qqqb")
_SLOT_BITS = 3  # tile codes: tile << 3 | slot (slot = action index for counts_by_action, else 0)
_CREC = struct.Struct("<iqq")  # covisit: one recent event of a user (session, item, ts)
_DREC = struct.Struct("<qq")  # distinct_topk: (latest ts, value)


def stable_id(name: str) -> int:
    """The stable id of a string: 63 bits of blake2b (>= 0, so NONE_ID and struct "q" fit). Two of a
    million ids collide with probability ~3e-8."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


class Names:
    """Values that reads name back (items, categories, declared fields) <-> their stable ids."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: dict[int, str] = {}

    def __call__(self, name: str | None) -> int:
        if name is None:
            return NONE_ID
        i = self.ids.get(name)
        if i is None:
            i = self.ids[name] = stable_id(name)
            self.names[i] = name
        return i


class Ev:
    """One accepted event as the aggregations see it: stable ids, session number, watermark after it.

    `sess` and `new` are set by the shopper's partition (sessions are per user); `pairs` carries the
    co-visited items a partition found for each covisit feature to the item-keyed state."""

    __slots__ = ("u", "i", "ui", "c", "a", "ts", "off", "sid", "sess", "new", "wm", "raw", "pairs")
    g = 0  # the key of global features

    def __init__(self, u: int, i: int, c: int, a: int, ts: int, off: int, sid: int, wm: int, raw: Event) -> None:
        self.u, self.i, self.c, self.a, self.ts, self.off, self.sid, self.wm = u, i, c, a, ts, off, sid, wm
        self.sess, self.new = 0, False  # the first event of its session
        self.ui = (u, i)  # the (user, item) key
        self.raw = raw
        self.pairs: dict[str, list[int]] | None = None


_TS_BITS = 48  # Sessions packs (session number, max event time) in one int: below 2^64 up to 65,535 sessions
_TS_MASK = (1 << _TS_BITS) - 1


CAPTURE_CHUNK = 4_096  # keys per msgpack chunk of a captured section


def _encode_map(state: dict[Any, Any], pair_keys: bool) -> list[bytes]:
    """A state map as msgpack chunks of at most `CAPTURE_CHUNK` keys, each one C call over a slice of the
    dict (no per-key Python code, so neither a Python loop nor the garbage collector runs while the owner's
    lock is held); (user, item) keys (`pair_keys`) go as lists of (key, value) pairs (msgpack keys are
    scalars). Chunked because one call over the whole map holds the GIL throughout: 14 ms for a partition's
    `history_seq` and 25 ms for the item co-visitation at a million shoppers, a stall of every request,
    while between chunks (~1 ms each) the GIL passes to serving. The owner's lock is held across all the
    chunks (the values are mutable), so the chunks are one picture."""
    items = iter(state.items())
    chunks = []
    while True:
        part = list(islice(items, CAPTURE_CHUNK)) if pair_keys else dict(islice(items, CAPTURE_CHUNK))
        if part or not chunks:
            chunks.append(msgspec.msgpack.encode(part))
        if len(part) < CAPTURE_CHUNK:
            return chunks


def _decode_map(chunks: list[bytes], pair_keys: bool, value: Any) -> dict[Any, Any]:
    """The map `_encode_map` wrote (its chunks in order), values decoded as `value`."""
    if pair_keys:
        pairs = msgspec.msgpack.Decoder(list[tuple[tuple[int, int], value]])
        return dict(chain.from_iterable(pairs.decode(c) for c in chunks))
    maps = msgspec.msgpack.Decoder(dict[int, value])
    state = maps.decode(chunks[0])
    for c in chunks[1:]:
        state.update(maps.decode(c))
    return state


class Sessions:
    """Per user: session number, session id of the last event, max event time; the session rule.

    An accepted event starts a new session when it is the user's first, when its session_id differs from
    the one of the user's previous event (arrival order), or when it has no session_id and comes more
    than `gap_ms` after the user's latest event time. A session is open at t while the last event has a
    session_id or t - latest event time <= gap_ms. `state` packs (session number, max event time) in one
    int per user (event times are epoch ms >= 0 below 2^48); `sids` holds the session id of the last event
    for the users whose last event had one.
    """

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = gap_ms
        self.state: dict[int, int] = {}
        self.sids: dict[int, int] = {}
        self.started = False

    def update(self, u: int, sid: int, ts: int) -> int:
        """Apply one accepted event; returns its session number (`started`: it is the session's first)."""
        v = self.state.get(u)
        if sid == NONE_ID:
            last_sid = self.sids.pop(u, NONE_ID)
        else:
            last_sid = self.sids.get(u, NONE_ID)
            self.sids[u] = sid
        if v is None:
            self.state[u] = ts
            self.started = True
            return 0
        sess, last_ts = v >> _TS_BITS, v & _TS_MASK
        self.started = sid != last_sid or (sid == NONE_ID and ts - last_ts > self.gap_ms)
        if self.started:
            sess += 1
        self.state[u] = sess << _TS_BITS | (ts if ts > last_ts else last_ts)
        return sess

    def open_session(self, u: int, t: int) -> int | None:
        """The number of the user's open session at t, or None."""
        v = self.state.get(u)
        if v is None:
            return None
        if u not in self.sids and t - (v & _TS_MASK) > self.gap_ms:
            return None
        return v >> _TS_BITS

    def last_ts(self, u: int) -> int:
        return self.state[u] & _TS_MASK

    def forget(self, users: set[int]) -> None:
        for u in users:
            del self.state[u]
            self.sids.pop(u, None)

    def capture(self) -> list[bytes]:
        """[state, sids]; past 65,535 sessions of one user the packed int is too wide for msgpack, so the
        state then goes as (session number, max event time) pairs: [b"", pairs, sids]."""
        if self.state and max(self.state.values()) >= 1 << 64:
            wide = {u: (v >> _TS_BITS, v & _TS_MASK) for u, v in self.state.items()}
            return [b"", msgspec.msgpack.encode(wide), msgspec.msgpack.encode(self.sids)]
        return [msgspec.msgpack.encode(self.state), msgspec.msgpack.encode(self.sids)]

    def restore(self, chunks: list[bytes]) -> None:
        if len(chunks) == 3:
            wide = msgspec.msgpack.decode(chunks[1], type=dict[int, tuple[int, int]])
            self.state = {u: sess << _TS_BITS | ts for u, (sess, ts) in wide.items()}
        else:
            self.state = msgspec.msgpack.decode(chunks[0], type=dict[int, int])
        self.sids = msgspec.msgpack.decode(chunks[-1], type=dict[int, int])


_KEY_ATTR = {"user": "u", "user_item": "ui", "item": "i", "global": "g"}
_VALUE_ATTR = {"item_id": "i", "category": "c"}


class Agg:
    """State of one feature: `add_batch(evs)` with the accepted events that pass `actions`, in offset
    order; `read(key, t)` a JSON-able value at t; `empty()` the value of a key never seen.

    `state` maps a key to a value of type `VALUE` (what `restore` decodes); `capture`/`restore` are the
    codec, `forget(users)` drops shoppers' state (the memory cap), `rebuilt()` derives what is not stored."""

    VALUE: Any = Any

    def __init__(self, f: Feature, names: Names, window: Window | None = None) -> None:
        self.f = f
        self.names = names
        self.window = window or f.window
        self.state: dict[Any, Any] = {}
        self.key: Callable[[Ev], Any] = attrgetter(_KEY_ATTR[f.entity])
        attr = _VALUE_ATTR.get(f.field or "")
        self.value: Callable[[Ev], int] = attrgetter(attr) if attr else self.raw_value
        self.actions = None if f.actions is None else frozenset(ACTION_INDEX[a] for a in f.actions)
        self.tile_ms = self.window.tile_ms or 0
        self.tiles = self.window.tiles
        self.pair_keys = f.entity == "user_item"  # state keyed by (user, item); TileAgg keeps it per user

    def min_tile(self, t: int) -> int:
        """The oldest tile inside the window at t (the one tile 0 for unbounded windows)."""
        return t // self.tile_ms - self.tiles + 1 if self.tile_ms else 0

    def tile(self, ts: int) -> int:
        return ts // self.tile_ms if self.tile_ms else 0

    def raw_value(self, ev: Ev) -> int:
        """The stable id of a declared field the engine does not look up up front."""
        return self.names(self.f.value(ev.raw))

    def add_batch(self, evs: list[Ev]) -> None:
        raise NotImplementedError

    def read(self, key: Any, t: int) -> Any:
        raise NotImplementedError

    def read_many(self, keys: list[Any], t: int) -> list[Any]:
        """`read` of each key (aggregations that can share work between keys override it)."""
        return [self.read(key, t) for key in keys]

    def empty(self) -> Any:
        raise NotImplementedError

    def swept_keys(self) -> list[Any]:
        """The keys `sweep` looks at."""
        return list(self.state)

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[Any] | None = None) -> None:
        """Forget what has left the window at wm for good, for `keys` (default: `swept_keys()`): bounded
        memory for idle keys; a session is done when even an event late by `lateness_ms` could not reopen
        it. Keys given may have gone meanwhile (the engine sweeps in chunks between writes)."""

    # -- codec and memory cap -----------------------------------------------------------------------

    def capture(self) -> list[bytes]:
        """The state as msgpack chunks (called under the owner's lock: a few ms per 10^5 keys)."""
        return _encode_map(self.state, self.pair_keys)

    def restore(self, chunks: list[bytes]) -> None:
        if not chunks:
            raise msgspec.ValidationError(f"{self.f.name}: the section holds no chunk")
        self.state = _decode_map(chunks, self.pair_keys, self.VALUE)
        self.rebuilt()

    def rebuilt(self) -> None:
        """Derive what `capture` does not store (running totals) after `restore`."""

    def merge(self, other: Agg) -> None:
        """Fold `other` into this state: the same feature's partial state over other events (another
        partition's shoppers), as Chronon's `merge` of two intermediate results. Keys are stable ids, so
        partials from other processes name the same values (their `Names` are a union). Afterwards every
        read equals that of one state fed both partials' events; in any merge order (property-tested for
        each kind an item or global feature can be). Aggregations that cannot merge exactly say why."""
        raise NotImplementedError(f"{self.f.name}: partial states of {type(self).__name__} do not merge")

    def forget(self, users: set[int]) -> None:
        """Drop the state of these shoppers (user and user_item keys)."""
        state = self.state
        if self.pair_keys:
            for key in [k for k in state if k[0] in users]:
                del state[key]
            return
        for u in users:
            state.pop(u, None)


class Expiring(Agg):
    """An aggregation whose per-key state holds tiles in tile order, some keys with running totals
    (`totals`); `expire(key, state, low)` drops the tiles before `low` from a key's state and totals."""

    RUNNING_TOTALS_FROM = 8  # tiles per window from which keys keep running totals (reads skip the tiles)
    totals: dict[Any, Any] | None

    def expire(self, key: Any, value: Any, low: int) -> None:
        raise NotImplementedError

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[Any] | None = None) -> None:
        low, state, totals = self.min_tile(wm), self.state, self.totals
        for key in self.swept_keys() if keys is None else keys:
            value = state.get(key)
            if value is None:
                continue
            self.expire(key, value, low)
            if not value:
                del state[key]
                if totals is not None:
                    del totals[key]


@cache
def _tile_structs(sub: str, code: str, value: str) -> tuple[struct.Struct, struct.Struct, struct.Struct]:
    """A tile record (sub, code, value), its (sub, code) prefix, and its value."""
    return struct.Struct(f"<{sub}{code}{value}"), struct.Struct(f"<{sub}{code}"), struct.Struct(f"<{value}")


class TileAgg(Expiring):
    """count, sum, counts_by_action and age, tiled: per key a packed run of records
    (sub, tile << 3 | slot, value) in tile order, where sub is the item of a (user, item) key (the state is
    kept per user) and slot the action index for counts_by_action. An event adds to a matching recent
    record or inserts one (a late event's goes before the records of later tiles); expired records go
    from the front. Item and global counts with many tiles (e.g. the 672 hourly tiles of 28 days) also
    keep running totals per slot over their records, so a read does not add up every tile (it subtracts
    the few records at the front that have left the window but are not dropped yet)."""

    LOOKBACK = 16  # records searched for a match before appending (a miss only costs one record)
    VALUE = bytearray

    def __init__(self, f: Feature, names: Names, window: Window | None = None) -> None:
        super().__init__(f, names, window)
        self.per_user = f.entity == "user_item"
        if self.per_user:
            self.key = attrgetter("u")
            self.pair_keys = False
        # A record: sub (the item's stable id for a (user, item) key, else one unused byte), tile << 3 | slot
        # (int32 for tiles of a minute or more: until the year 2480), value (uint32 counts, float64 sums,
        # int64 times): 9 bytes for item counts, 16 for a shopper's item counts.
        code = "i" if not self.tile_ms or self.tile_ms >= MINUTE_MS else "q"
        value = {"sum": "d", "age": "q"}.get(f.agg, "I")
        self.layout = ("q" if self.per_user else "B", code, value)
        self._rec_key = _tile_structs(*self.layout)[1]  # a record's (sub, code): is the front still live?
        running = f.agg in ("count", "counts_by_action") and not self.per_user
        self.totals: dict[int, list[float]] | None = {} if running and self.tiles > self.RUNNING_TOTALS_FROM else None

    def add_batch(self, evs: list[Ev]) -> None:
        state, totals, key_of, agg = self.state, self.totals, self.key, self.f.agg
        tile_ms, tiles = self.tile_ms, self.tiles
        by_action, is_sum, is_age = agg == "counts_by_action", agg == "sum", agg == "age"
        per_user, number = self.per_user, self.f.number
        rec, rec_key, rec_val = _tile_structs(*self.layout)
        size, back, vpos = rec.size, self.LOOKBACK * rec.size, rec_key.size
        pack_key, pack_rec, unpack_key = rec_key.pack, rec.pack, rec_key.unpack_from
        unpack_val, pack_val = rec_val.unpack_from, rec_val.pack_into
        for ev in evs:
            if tile_ms:
                tile = ev.ts // tile_ms
                low = ev.wm // tile_ms - tiles + 1
                if tile < low:
                    continue  # only reachable for windows shorter than the lateness: never visible again
            else:
                tile = low = 0
            if is_sum:
                v = number(ev.raw)
                if v is None:
                    continue
            else:
                v = ev.ts if is_age else 1
            sub = ev.i if per_user else 0
            slot = ev.a if by_action else 0
            code = tile << _SLOT_BITS | slot
            key = key_of(ev)
            if totals is not None:
                total = totals.get(key)
                if total is None:
                    total = totals[key] = [0.0] * len(ACTIONS)
                total[slot] += v
            buf = state.get(key)
            if not buf:  # a new key (or one whose records expired)
                state[key] = bytearray(pack_rec(sub, code, v))
                continue
            n = len(buf)
            pos = buf.rfind(pack_key(sub, code), n - back if n > back else 0)
            if pos >= 0 and pos % size == 0:
                old = unpack_val(buf, pos + vpos)[0]
                pack_val(buf, pos + vpos, (v if v < old else old) if is_age else old + v)
                continue
            at = n - size
            if unpack_key(buf, at)[1] >> _SLOT_BITS > tile:  # late: it goes before the later tiles' records
                while at and unpack_key(buf, at - size)[1] >> _SLOT_BITS > tile:
                    at -= size
                buf[at:at] = pack_rec(sub, code, v)
            else:
                buf += pack_rec(sub, code, v)
            if tile_ms and unpack_key(buf)[1] >> _SLOT_BITS < low:
                self.expire(key, buf, low)

    def expire(self, key: int, buf: bytearray, low: int) -> None:
        """Drop the records of tiles before `low` from the front of `buf` (and from the key's totals)."""
        rec = _tile_structs(*self.layout)[0]
        size, n, end = rec.size, len(buf), 0
        total = self.totals.get(key) if self.totals is not None else None
        while end < n:
            _, code, v = rec.unpack_from(buf, end)
            if code >> _SLOT_BITS >= low:
                break
            if total is not None:
                total[code & 7] -= v
            end += size
        if end:
            del buf[:end]

    def rebuilt(self) -> None:
        if self.totals is not None:
            self.totals = {}
            self._total(self.state)

    def _total(self, keys: Iterable[Any]) -> None:
        """Recompute the running totals of `keys` from their records."""
        if self.totals is None:
            return
        rec = _tile_structs(*self.layout)[0]
        for key in keys:
            total = self.totals[key] = [0.0] * len(ACTIONS)
            for _, code, v in rec.iter_unpack(self.state[key]):
                total[code & 7] += v

    def merge(self, other: Agg) -> None:
        """Records of one (sub, tile, slot) add up (ages: the earliest), kept in tile order."""
        rec = _tile_structs(*self.layout)[0]
        is_age = self.f.agg == "age"
        for key, theirs in other.state.items():
            mine = self.state.get(key)
            acc: dict[tuple[int, int], Any] = {}
            for sub, code, v in (*rec.iter_unpack(mine or b""), *rec.iter_unpack(theirs)):
                old = acc.get((sub, code))
                acc[(sub, code)] = v if old is None else (min(old, v) if is_age else old + v)
            ordered = sorted(acc.items(), key=lambda r: r[0][1] >> _SLOT_BITS)  # stable: tile order
            self.state[key] = bytearray(b"".join(rec.pack(sub, code, v) for (sub, code), v in ordered))
        self._total(other.state)

    def _accumulate(self, buf: bytes, low: int) -> dict[int, list[float]]:
        """sub -> per-slot sums (for age: [earliest ts]) over the records of tiles >= low."""
        acc: dict[int, list[float]] = {}
        is_age = self.f.agg == "age"
        for sub, code, v in _tile_structs(*self.layout)[0].iter_unpack(buf):
            if code >> _SLOT_BITS < low:
                continue
            a = acc.get(sub)
            if a is None:
                a = acc[sub] = [v] if is_age else [0.0] * len(ACTIONS)
            if is_age:
                if v < a[0]:
                    a[0] = v
            else:
                a[code & 7] += v
        return acc

    def _live_total(self, key: int, buf: bytes, low: int) -> list[float]:
        """The key's running total less the records at the front that have left the window (pure)."""
        total = self.totals[key]  # type: ignore[index]
        if not buf or self._rec_key.unpack_from(buf)[1] >> _SLOT_BITS >= low:
            return total
        rec = _tile_structs(*self.layout)[0]
        total = list(total)
        for _, code, v in rec.iter_unpack(buf):
            if code >> _SLOT_BITS >= low:
                break
            total[code & 7] -= v
        return total

    def _value(self, acc: list[float] | None, t: int) -> Any:
        """The feature's value from one key's accumulated slots (None: nothing live)."""
        if acc is None:
            return self.empty()
        agg = self.f.agg
        if agg == "count":
            return int(acc[0])
        if agg == "sum":
            return float(acc[0])
        if agg == "age":
            return t - int(acc[0])
        return dict(zip(ACTIONS, map(int, acc), strict=True))  # counts_by_action: one slot per action

    def read(self, key: Any, t: int) -> Any:
        return self.read_many([key], t)[0]

    def read_many(self, keys: list[Any], t: int) -> list[Any]:
        """One pass over each key's records (a (user, item) key's user's records once for all its items)."""
        low, state, out = self.min_tile(t), self.state, []
        if self.totals is not None:
            for key in keys:
                buf = state.get(key)
                out.append(self._value(self._live_total(key, buf, low) if buf else None, t))
            return out
        seen: dict[int, dict[int, list[float]]] = {}
        for key in keys:
            owner, sub = key if self.per_user else (key, 0)
            acc = seen.get(owner)
            if acc is None:
                acc = seen[owner] = self._accumulate(state.get(owner, b""), low)
            out.append(self._value(acc.get(sub), t))
        return out

    def empty(self) -> Any:
        agg = self.f.agg
        return {"count": 0, "sum": 0.0, "age": None}.get(agg, dict.fromkeys(ACTIONS, 0))


class Scalar(Agg):
    """count, sum and age over an unbounded window (also a session's, inside SessionScoped): per key one
    number, where TileAgg would keep a one-record buffer (a fifth of the memory for a user's session
    length and age)."""

    VALUE = int | float

    def add_batch(self, evs: list[Ev]) -> None:
        state, key_of, agg, number = self.state, self.key, self.f.agg, self.f.number
        for ev in evs:
            key = key_of(ev)
            old = state.get(key)
            if agg == "count":
                state[key] = 1 if old is None else old + 1
            elif agg == "age":
                if old is None or ev.ts < old:
                    state[key] = ev.ts
            else:
                v = number(ev.raw)
                if v is not None:
                    state[key] = v if old is None else old + v

    def read(self, key: int, t: int) -> Any:
        old = self.state.get(key)
        if old is None:
            return self.empty()
        return t - old if self.f.agg == "age" else old

    def empty(self) -> Any:
        return {"count": 0, "sum": 0.0, "age": None}[self.f.agg]

    def merge(self, other: Agg) -> None:
        """Counts and sums add, ages take the earliest first event."""
        state, is_age = self.state, self.f.agg == "age"
        for key, v in other.state.items():
            old = state.get(key)
            state[key] = v if old is None else (min(old, v) if is_age else old + v)


class LastValue(Agg):
    """last(field): per key (ts, offset, value) of the latest event (by ts, then offset)."""

    VALUE = tuple[int, int, int]

    def add_batch(self, evs: list[Ev]) -> None:
        state, key_of, value_of = self.state, self.key, self.value
        for ev in evs:
            v = value_of(ev)
            if v == NONE_ID:
                continue
            key = key_of(ev)
            old = state.get(key)
            if old is None or (ev.ts, ev.off) > (old[0], old[1]):
                state[key] = (ev.ts, ev.off, v)

    def read(self, key: int, t: int) -> Any:
        old = self.state.get(key)
        if old is None or self.tile(old[0]) < self.min_tile(t):
            return None
        return self.names.names[old[2]]

    def empty(self) -> Any:
        return None

    def merge(self, other: Agg) -> None:
        """The later of the two latest events, by (ts, offset)."""
        state = self.state
        for key, v in other.state.items():
            old = state.get(key)
            if old is None or (v[0], v[1]) > (old[0], old[1]):
                state[key] = v

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[int] | None = None) -> None:
        low, state = self.min_tile(wm), self.state
        for key in self.swept_keys() if keys is None else keys:
            old = state.get(key)
            if old is not None and self.tile(old[0]) < low:
                del state[key]


class DistinctTopK(Agg):
    """distinct_topk(field, k): per key the k values with the latest event time, packed (ts, value)
    records, most recent first (ties by value name).

    Keeping only k entries is exact: an evicted value trails k others that stay in the window at least as
    long, and a later event for it re-enters only with a time that beats the k-th.
    """

    VALUE = bytearray

    def order(self, entry: list[int]) -> tuple[int, str]:
        return -entry[0], self.names.names[entry[1]]

    def add_batch(self, evs: list[Ev]) -> None:
        state, key_of, value_of, k, order = self.state, self.key, self.value, self.f.k, self.order
        for ev in evs:
            v = value_of(ev)
            if v == NONE_ID:
                continue
            key, ts = key_of(ev), ev.ts
            buf = state.get(key)
            if buf is None:
                state[key] = bytearray(_DREC.pack(ts, v))
                continue
            first_ts, first_v = _DREC.unpack_from(buf)
            if first_v == v:  # the most recent value again: it only gets more recent, it stays first
                if ts > first_ts:
                    _DREC.pack_into(buf, 0, ts, v)
                continue
            if ts > first_ts:  # the newest event (the usual case): v moves to the front, no sorting
                size = _DREC.size
                for pos in range(size, len(buf), size):
                    if _DREC.unpack_from(buf, pos)[1] == v:
                        del buf[pos : pos + size]
                        break
                else:
                    del buf[(k - 1) * size :]
                buf[0:0] = _DREC.pack(ts, v)
                continue
            entries = [list(r) for r in _DREC.iter_unpack(buf)]
            for e in entries:
                if e[1] == v:
                    if ts <= e[0]:
                        break
                    e[0] = ts
                    entries.sort(key=order)
                    state[key] = bytearray(b"".join(_DREC.pack(*e) for e in entries))
                    break
            else:
                entries.append([ts, v])
                entries.sort(key=order)
                state[key] = bytearray(b"".join(_DREC.pack(*e) for e in entries[:k]))

    def read(self, key: int, t: int) -> Any:
        low = self.min_tile(t)
        names = self.names.names
        return [names[v] for ts, v in _DREC.iter_unpack(self.state.get(key, b"")) if self.tile(ts) >= low]

    def merge(self, other: Agg) -> None:
        """Each value's latest time over both, the k most recent kept. Exact: a value among the k most
        recent overall has fewer than k values more recent than it in its own partial too, so each partial
        kept it."""
        for key, theirs in other.state.items():
            latest: dict[int, int] = {}
            for ts, v in (*_DREC.iter_unpack(self.state.get(key, b"")), *_DREC.iter_unpack(theirs)):
                latest[v] = max(ts, latest.get(v, ts))
            entries = sorted(([ts, v] for v, ts in latest.items()), key=self.order)[: self.f.k]
            self.state[key] = bytearray(b"".join(_DREC.pack(*e) for e in entries))

    def empty(self) -> Any:
        return []

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[int] | None = None) -> None:
        low, state = self.min_tile(wm), self.state
        for key in self.swept_keys() if keys is None else keys:
            buf = state.get(key)
            if buf is not None and self.tile(_DREC.unpack_from(buf)[0]) < low:  # the newest entry is first
                del state[key]


class TopKCount(Expiring):
    """topk_count(field, k): per key {tile: {value: n}}; the top k by count over the live tiles.

    Keys of a window with more than one tile (global trending: 120 one-minute tiles, covisit: 7 days) also
    keep a running total over their tiles, so a read does not sum every tile (it subtracts the tiles that
    have left the window but are not dropped yet), and the last top k read of a key is kept exact by the
    writes (`tops`): an increment updates a member's count, and only a value that would overtake the k-th
    (or an expiry) drops it. A popular item's covisit map holds tens of thousands of neighbours; its top 20
    then costs a sort of 20, not a pass over the map, on each read.
    """

    VALUE = dict[int, dict[int, int]]  # tiles in tile order (msgpack maps keep their order)

    def __init__(self, f: Feature, names: Names, window: Window | None = None) -> None:
        super().__init__(f, names, window)
        # Counts per value keep a running total from two tiles on: a covisit read summed the 7 day-tiles of a
        # popular item's neighbour maps on every call (27% of the server's samples under mixed load).
        self.totals: dict[int, dict[int, int]] | None = {} if self.tiles > 1 else None
        # key -> (member -> count, the last member's (-count, name)): derived, never captured
        self.tops: dict[int, tuple[dict[int, int], tuple[int, str]]] = {}

    def count(self, key: int, values: list[int], tile: int, low: int) -> None:
        """Count each of `values` once for `key` in `tile` (low: the oldest live tile)."""
        tiles = self.state.get(key)
        if tiles is None:
            tiles = self.state[key] = {}
        per = tiles.get(tile)
        if per is None:
            late = bool(tiles) and tile < next(reversed(tiles))
            per = tiles[tile] = {}
            if late:  # keep the tiles in tile order, so expiry pops from the front
                ordered = sorted(tiles.items())
                tiles.clear()
                tiles.update(ordered)
            self.expire(key, tiles, low)
        for v in values:
            per[v] = per.get(v, 0) + 1
        if self.totals is not None:
            total = self.totals.get(key)
            if total is None:
                total = self.totals[key] = {}
            for v in values:
                n = total[v] = total.get(v, 0) + 1
                if key in self.tops:
                    self._bumped(key, v, n)

    def _bumped(self, key: int, v: int, n: int) -> None:
        """Keep the key's cached top k exact after v's total became n (one more)."""
        members, worst = self.tops[key]
        names = self.names.names
        if v in members:
            members[v] = n
            if worst == (1 - n, names[v]):  # the last member moved up: find the new last
                self.tops[key] = (members, max((-c, names[m]) for m, c in members.items()))
        elif len(members) < self.f.k:  # every value is a member: v joins
            members[v] = n
            self.tops[key] = (members, max(worst, (-n, names[v])))
        elif n > -worst[0] or (n == -worst[0] and names[v] < worst[1]):
            del self.tops[key]  # v overtakes the last member: recomputed on the next read

    def expire(self, key: int, tiles: dict[int, dict[int, int]], low: int) -> None:
        while tiles and (first := next(iter(tiles))) < low:
            per = tiles.pop(first)
            self.tops.pop(key, None)
            if self.totals is not None:
                total = self.totals[key]
                for v, n in per.items():
                    if total[v] == n:
                        del total[v]
                    else:
                        total[v] -= n

    def rebuilt(self) -> None:
        self.tops = {}
        if self.totals is not None:
            self.totals = {}
            self._total(self.state)

    def _total(self, keys: Iterable[int]) -> None:
        """Recompute the running totals of `keys` from their tiles."""
        if self.totals is None:
            return
        for key in keys:
            total = self.totals[key] = {}
            for per in self.state[key].values():
                for v, n in per.items():
                    total[v] = total.get(v, 0) + n

    def merge(self, other: Agg) -> None:
        """Counts of one (tile, value) add up; tiles kept in tile order."""
        for key, theirs in other.state.items():
            tiles = self.state.get(key, {})
            for tile, per in theirs.items():
                mine = tiles.setdefault(tile, {})
                for v, n in per.items():
                    mine[v] = mine.get(v, 0) + n
            self.state[key] = dict(sorted(tiles.items()))
            self.tops.pop(key, None)
        self._total(other.state)

    def add_batch(self, evs: list[Ev]) -> None:
        key_of, value_of, tile_ms, tiles = self.key, self.value, self.tile_ms, self.tiles
        state, totals = self.state, self.totals
        for ev in evs:
            v = value_of(ev)
            if v == NONE_ID:
                continue
            tile = ev.ts // tile_ms if tile_ms else 0
            low = ev.wm // tile_ms - tiles + 1 if tile_ms else 0
            if tile < low:
                continue
            key = key_of(ev)
            per = state[key].get(tile) if key in state else None
            if per is None:  # a new tile (or key): ordering and expiry
                self.count(key, [v], tile, low)
                continue
            per[v] = per.get(v, 0) + 1  # the usual case: the tile exists, count it and its running total
            if totals is not None:
                total = totals[key]
                n = total[v] = total.get(v, 0) + 1
                if key in self.tops:
                    self._bumped(key, v, n)

    def read(self, key: int, t: int) -> Any:
        tiles = self.state.get(key)
        if not tiles:
            return []
        low = self.min_tile(t)
        if self.totals is not None:
            total = self.totals[key]
            if next(iter(tiles)) < low:  # tiles that left the window but are not dropped yet: skip them
                total = dict(total)
                for tile, per in tiles.items():
                    if tile >= low:
                        break
                    for v, n in per.items():
                        total[v] -= n
                return self.top({v: n for v, n in total.items() if n})
            cached = self.tops.get(key)
            if cached is None:
                best = self.best(total)
                cached = self.tops[key] = ({v: -n for n, _, v in best}, best[-1][:2] if best else (0, ""))
            return self.top(cached[0])
        total = {}
        for tile, per in tiles.items():
            if tile < low:
                continue
            for v, n in per.items():
                total[v] = total.get(v, 0) + n
        return self.top(total)

    def best(self, total: dict[int, int]) -> list[tuple[int, str, int]]:
        """The k largest counts as (-count, name, value), best first; ties with the k-th compete on the name."""
        names = self.names.names
        k = self.f.k
        if len(total) > k:  # the k-th count by numpy's partition: a covisit map can hold 10^4 values
            counts = np.fromiter(total.values(), np.int64, len(total))
            kth = int(np.partition(counts, len(counts) - k)[len(counts) - k])
            keys = np.fromiter(total.keys(), np.int64, len(total))[counts >= kth].tolist()
        else:
            keys = list(total)
        return sorted((-total[v], names[v], v) for v in keys)[:k]

    def top(self, total: dict[int, int]) -> list[dict[str, Any]]:
        """The k largest counts, ties by value name: [{field: name, "count": n}]."""
        field = self.f.field or "item_id"
        return [{field: name, "count": -n} for n, name, _ in self.best(total)]

    def empty(self) -> Any:
        return []


class CovisitPairs(Agg):
    """The shopper side of covisit: per user the packed (session, item, ts) of the last `span` events; each
    event pairs with those of the same session (arrival order) within `gap_ms` and with another item.
    The pairs ride on the event (`ev.pairs[feature]`) to the item side (`Covisit`), which counts them."""

    VALUE = bytearray

    def __init__(self, f: Feature, names: Names) -> None:
        super().__init__(f, names)
        self.key = attrgetter("u")

    def add_batch(self, evs: list[Ev]) -> None:
        state, gap, span, size, name = self.state, self.f.gap_ms, self.f.span, _CREC.size, self.f.name
        for ev in evs:
            i, ts, sess = ev.i, ev.ts, ev.sess
            rec = _CREC.pack(sess, i, ts)
            recent = state.get(ev.u)
            if recent is None:
                state[ev.u] = bytearray(rec)
                continue
            co = [p for s, p, t in _CREC.iter_unpack(recent) if s == sess and p != i and -gap <= t - ts <= gap]
            recent += rec
            if len(recent) > span * size:
                del recent[:size]
            if co:
                if ev.pairs is None:
                    ev.pairs = {}
                ev.pairs[name] = co


class Covisit(TopKCount):
    """covisit: per item the items most often co-visited with it (pairs found by `CovisitPairs` on the
    shopper's partition); both directions count at the event's time."""

    def add_batch(self, evs: list[Ev]) -> None:
        tile_ms, tiles, name = self.tile_ms, self.tiles, self.f.name
        for ev in evs:
            co = ev.pairs.get(name) if ev.pairs is not None else None
            if not co:
                continue
            tile = ev.ts // tile_ms if tile_ms else 0
            low = ev.wm // tile_ms - tiles + 1 if tile_ms else 0
            if tile >= low:
                self.count(ev.i, co, tile, low)
                one = [ev.i]
                for p in co:
                    self.count(p, one, tile, low)


def _last_k(buf: bytes, k: int) -> bytearray:
    return bytearray(buf[-k * _REC.size :]) if len(buf) > k * _REC.size else bytearray(buf)


def _merge(a: bytes, b: bytes, k: int) -> bytearray:
    """The k latest records of two packed sequences, `a`'s events having arrived before `b`'s."""
    if not b:
        return bytearray(a)
    if not a or _REC.unpack_from(b)[0] >= _REC.unpack_from(a, len(a) - _REC.size)[0]:  # b follows a (usual)
        return _last_k(bytearray(a) + b, k)
    recs = sorted([*_REC.iter_unpack(a), *_REC.iter_unpack(b)], key=itemgetter(0))  # stable: a first on ties
    return bytearray(b"".join(_REC.pack(*r) for r in recs[-k:]))


def _insert(buf: bytearray, ev: Ev, k: int) -> bytearray:
    """Insert the newest arrival into a packed sequence sorted by (ts, offset), keeping the k latest."""
    rec = _REC.pack(ev.ts, ev.i, ev.c, ev.a)
    size = _REC.size
    if not buf or ev.ts >= _REC.unpack_from(buf, len(buf) - size)[0]:
        buf += rec
    else:  # a late event: after every stored event with a ts at most its own
        at = bisect_right([r[0] for r in _REC.iter_unpack(buf)], ev.ts) * size
        buf[at:at] = rec
    return _last_k(buf, k) if len(buf) > k * size else buf


class LastN(Agg):
    """last_n(k): per key the k latest events (by ts, then offset), packed 25 bytes each."""

    VALUE = bytearray

    def add_batch(self, evs: list[Ev]) -> None:
        state, key_of, k = self.state, self.key, self.f.k
        for ev in evs:
            key = key_of(ev)
            state[key] = _insert(state.get(key) or bytearray(), ev, k)

    def decode(self, buf: bytes, t: int) -> list[dict[str, Any]]:
        low = self.min_tile(t)
        names = self.names.names
        return [
            {
                "item_id": names[i],
                "action": ACTIONS[a],
                "ts": ts,
                "category": None if c == NONE_ID else names[c],
            }
            for ts, i, c, a in _REC.iter_unpack(buf)
            if self.tile(ts) >= low
        ]

    def read(self, key: int, t: int) -> Any:
        return self.decode(self.state.get(key, b""), t)

    def empty(self) -> Any:
        return []

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[int] | None = None) -> None:
        if not self.tile_ms:
            return
        low, size, state = self.min_tile(wm), _REC.size, self.state
        for key in self.swept_keys() if keys is None else keys:
            buf = state.get(key)
            if buf is not None and self.tile(_REC.unpack_from(buf, len(buf) - size)[0]) < low:
                del state[key]


class SessionScoped(Agg):
    """Any aggregation over the user's current session: the inner state restarts with each session.

    It sees every accepted event (a session starts with any event), the inner one only those that pass
    the declared `actions`."""

    def __init__(self, f: Feature, names: Names, sessions: Sessions) -> None:
        super().__init__(f, names)
        unbounded = Window()
        self.inner = _agg_class(f, unbounded)(f, names, unbounded)
        self.sessions = sessions
        self.actions = None

    def add_batch(self, evs: list[Ev]) -> None:
        inner, acts = self.inner, self.inner.actions
        run: list[Ev] = []
        in_run: set[int] = set()
        for ev in evs:
            u = ev.u
            if ev.new:
                if u in in_run:  # the user's earlier events in this batch belong to the old session
                    inner.add_batch(run)
                    run, in_run = [], set()
                inner.state.pop(u, None)
            if acts is None or ev.a in acts:
                run.append(ev)
                in_run.add(u)
        if run:
            inner.add_batch(run)

    def read(self, key: int, t: int) -> Any:
        if self.sessions.open_session(key, t) is None:
            return self.inner.empty()
        return self.inner.read(key, t)

    def empty(self) -> Any:
        return self.inner.empty()

    def swept_keys(self) -> list[int]:
        return list(self.inner.state)

    def capture(self) -> list[bytes]:
        return self.inner.capture()

    def restore(self, chunks: list[bytes]) -> None:
        self.inner.restore(chunks)

    def forget(self, users: set[int]) -> None:
        self.inner.forget(users)

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[int] | None = None) -> None:
        done, state = wm - lateness_ms, self.inner.state
        for u in self.swept_keys() if keys is None else keys:
            if u in state and self.sessions.open_session(u, done) is None:
                del state[u]


class BeforeSession(LastN):
    """last_n(k) over the user's events before the current session: per user (session, history, current),
    a tuple (the garbage collector stops tracking it: a million shoppers add no GC work).

    Like SessionScoped it sees every accepted event and filters by `actions` itself."""

    VALUE = tuple[int, bytearray, bytearray]

    def __init__(self, f: Feature, names: Names, sessions: Sessions) -> None:
        super().__init__(f, names)
        self.sessions = sessions
        self.filter = self.actions
        self.actions = None

    def add_batch(self, evs: list[Ev]) -> None:
        state, k, acts = self.state, self.f.k, self.filter
        for ev in evs:
            st = state.get(ev.u)
            if st is None:
                st = state[ev.u] = (ev.sess, bytearray(), bytearray())
            elif st[0] != ev.sess:
                st = state[ev.u] = (ev.sess, _merge(st[1], st[2], k), bytearray()) if st[2] else (ev.sess, *st[1:])
            if acts is None or ev.a in acts:
                current = _insert(st[2], ev, k)
                if current is not st[2]:
                    state[ev.u] = (st[0], st[1], current)

    def read(self, key: int, t: int) -> Any:
        st = self.state.get(key)
        if st is None:
            return []
        if self.sessions.open_session(key, t) == st[0]:
            return self.decode(st[1], t)
        return self.decode(_merge(st[1], st[2], self.f.k), t)

    def sweep(self, wm: int, lateness_ms: int, keys: Iterable[int] | None = None) -> None:
        done, state = wm - lateness_ms, self.state
        for u in self.swept_keys() if keys is None else keys:  # a closed session joins the history
            st = state.get(u)
            if st is not None and st[2] and self.sessions.open_session(u, done) != st[0]:
                state[u] = (st[0], _merge(st[1], st[2], self.f.k), bytearray())


_AGGS: dict[str, type[Agg]] = {
    "count": TileAgg,
    "sum": TileAgg,
    "counts_by_action": TileAgg,
    "age": TileAgg,
    "last": LastValue,
    "last_n": LastN,
    "distinct_topk": DistinctTopK,
    "topk_count": TopKCount,
    "covisit": Covisit,
}


def _agg_class(f: Feature, window: Window) -> type[Agg]:
    if window.kind == "unbounded" and f.agg in ("count", "sum", "age") and f.entity != "user_item":
        return Scalar
    return _AGGS[f.agg]


def make_agg(f: Feature, names: Names, sessions: Sessions) -> Agg:
    """The state of `f` (for covisit: the item side; `CovisitPairs` is the shopper side)."""
    if f.window.kind == "session":
        return SessionScoped(f, names, sessions)
    if f.window.kind == "before_session":
        return BeforeSession(f, names, sessions)
    return _agg_class(f, f.window)(f, names)
