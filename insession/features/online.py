"""The online feature engine: per-event incremental state for every declared feature, snapshots, reads."""

from __future__ import annotations

import heapq
import struct
from bisect import insort
from collections.abc import Callable
from typing import Any

from insession.features.declare import Feature, Window
from insession.schema import ACTIONS, Event

_NONE = -1  # interned id of a missing value
ACTION_INDEX = {a: i for i, a in enumerate(ACTIONS)}
_REC = struct.Struct("<qqiib")  # one sequence element: ts, offset, item, category, action (25 bytes)
_SLOT_BITS = 3  # tile codes: tile << 3 | slot (slot = action index for counts_by_action, else 0)


class Interner:
    """Ids and other strings to dense ints (and back): state holds small ints, not strings."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names: list[str] = names or []
        self.ids: dict[str, int] = {n: i for i, n in enumerate(self.names)}

    def __call__(self, name: str | None) -> int:
        if name is None:
            return _NONE
        i = self.ids.get(name)
        if i is None:
            i = self.ids[name] = len(self.names)
            self.names.append(name)
        return i

    def get(self, name: str) -> int | None:
        return self.ids.get(name)


class Ev:
    """One accepted event as the aggregations see it: interned ids plus its session number."""

    __slots__ = ("u", "i", "c", "a", "ts", "off", "sess", "raw")

    def __init__(self, u: int, i: int, c: int, a: int, ts: int, off: int, sess: int, raw: Event) -> None:
        self.u, self.i, self.c, self.a, self.ts, self.off, self.sess, self.raw = u, i, c, a, ts, off, sess, raw


class Sessions:
    """Per user: [session number, session id of the last event, max event time]; the session rule.

    An accepted event starts a new session when it is the user's first, when its session_id differs from
    the one of the user's previous event (arrival order), or when it has no session_id and comes more
    than `gap_ms` after the user's latest event time. A session is open at t while the last event has a
    session_id or t - latest event time <= gap_ms.
    """

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = gap_ms
        self.state: dict[int, list[int]] = {}

    def update(self, u: int, sid: int, ts: int) -> int:
        st = self.state.get(u)
        if st is None:
            self.state[u] = [0, sid, ts]
            return 0
        if sid != st[1] or (sid == _NONE and ts - st[2] > self.gap_ms):
            st[0] += 1
        st[1] = sid
        if ts > st[2]:
            st[2] = ts
        return st[0]

    def open_session(self, u: int, t: int) -> int | None:
        """The number of the user's open session at t, or None."""
        st = self.state.get(u)
        if st is None or (st[1] == _NONE and t - st[2] > self.gap_ms):
            return None
        return st[0]


def _key_fn(entity: str) -> Callable[[Ev], int]:
    return {
        "user": lambda ev: ev.u,
        "user_item": lambda ev: ev.u << 32 | ev.i,
        "item": lambda ev: ev.i,
        "global": lambda ev: 0,
    }[entity]


class Agg:
    """State of one feature: `update(ev, wm)` per accepted event, `read(key, t)` a JSON-able value."""

    def __init__(self, f: Feature, names: Interner, window: Window | None = None) -> None:
        self.f = f
        self.names = names
        self.window = window or f.window
        self.state: dict[int, Any] = {}
        self.key = _key_fn(f.entity)
        self.actions = None if f.actions is None else frozenset(ACTION_INDEX[a] for a in f.actions)
        self.tile_ms = self.window.tile_ms or 0
        self.tiles = self.window.tiles

    def min_tile(self, t: int) -> int:
        """The oldest tile inside the window at t (the one tile 0 for unbounded windows)."""
        return t // self.tile_ms - self.tiles + 1 if self.tile_ms else 0

    def tile(self, ts: int) -> int:
        return ts // self.tile_ms if self.tile_ms else 0

    def value(self, ev: Ev) -> int:
        """The interned value of the declared field."""
        name = self.f.field
        if name == "item_id":
            return ev.i
        if name == "category":
            return ev.c
        return self.names(getattr(ev.raw, name or ""))

    def update(self, ev: Ev, wm: int) -> None:
        if self.actions is not None and ev.a not in self.actions:
            return
        self.add(self.key(ev), ev, wm)

    def add(self, key: int, ev: Ev, wm: int) -> None:
        raise NotImplementedError

    def read(self, key: int, t: int) -> Any:
        raise NotImplementedError

    def empty(self) -> Any:
        raise NotImplementedError

    def sweep(self, wm: int) -> None:
        """Forget keys whose whole state has left the window (bounded memory for idle keys)."""


class TileAgg(Agg):
    """count, sum, counts_by_action and age: per key {tile << 3 | slot: number}, expiring tiles."""

    def __init__(self, f: Feature, names: Interner, window: Window | None = None) -> None:
        super().__init__(f, names, window)
        self.prop = f.field.split(".", 1)[1] if f.agg == "sum" and f.field else None

    def add(self, key: int, ev: Ev, wm: int) -> None:
        tile = self.tile(ev.ts)
        low = self.min_tile(wm)
        if tile < low:
            return  # only reachable for windows shorter than the lateness: never visible again
        agg = self.f.agg
        if agg == "sum":
            props = ev.raw.properties or {}
            v = props.get(self.prop or "")
            if not isinstance(v, int | float) or isinstance(v, bool):
                return
        code = tile << _SLOT_BITS | (ev.a if agg == "counts_by_action" else 0)
        d = self.state.get(key)
        if d is None:
            self.state[key] = {code: ev.ts if agg == "age" else (v if agg == "sum" else 1)}
            return
        old = d.get(code)
        if old is None:
            d[code] = ev.ts if agg == "age" else (v if agg == "sum" else 1)
            if self.tile_ms:
                for c in [c for c in d if c >> _SLOT_BITS < low]:
                    del d[c]
        elif agg == "age":
            if ev.ts < old:
                d[code] = ev.ts
        else:
            d[code] = old + (v if agg == "sum" else 1)

    def read(self, key: int, t: int) -> Any:
        d = self.state.get(key)
        if not d:
            return self.empty()
        low = self.min_tile(t)
        live = [(c & 7, v) for c, v in d.items() if c >> _SLOT_BITS >= low]
        agg = self.f.agg
        if agg == "count":
            return sum(v for _, v in live)
        if agg == "sum":
            return float(sum(v for _, v in live))
        if agg == "age":
            return t - min(v for _, v in live) if live else None
        out = dict.fromkeys(ACTIONS, 0)
        for slot, v in live:
            out[ACTIONS[slot]] += v
        return out

    def empty(self) -> Any:
        agg = self.f.agg
        return {"count": 0, "sum": 0.0, "age": None}.get(agg, dict.fromkeys(ACTIONS, 0))

    def sweep(self, wm: int) -> None:
        if self.tile_ms:
            low = self.min_tile(wm)
            self.state = {k: d for k, d in self.state.items() if any(c >> _SLOT_BITS >= low for c in d)}


class LastValue(Agg):
    """last(field): the value of the latest event (by ts, then offset) in the window."""

    def add(self, key: int, ev: Ev, wm: int) -> None:
        v = self.value(ev)
        if v == _NONE:
            return
        old = self.state.get(key)
        if old is None or (ev.ts, ev.off) > (old[0], old[1]):
            self.state[key] = (ev.ts, ev.off, v)

    def read(self, key: int, t: int) -> Any:
        old = self.state.get(key)
        if old is None or self.tile(old[0]) < self.min_tile(t):
            return None
        return self.names.names[old[2]]

    def empty(self) -> Any:
        return None

    def sweep(self, wm: int) -> None:
        low = self.min_tile(wm)
        self.state = {k: v for k, v in self.state.items() if self.tile(v[0]) >= low}


class DistinctTopK(Agg):
    """distinct_topk(field, k): per key the k values with the latest event time, as [[ts, value], ...].

    Keeping only k entries is exact: an evicted value trails k others that stay in the window at least as
    long, and a later event for it re-enters only with a time that beats the k-th.
    """

    def order(self, entry: list[int]) -> tuple[int, str]:
        return -entry[0], self.names.names[entry[1]]

    def add(self, key: int, ev: Ev, wm: int) -> None:
        v = self.value(ev)
        if v == _NONE:
            return
        entries = self.state.get(key)
        if entries is None:
            self.state[key] = [[ev.ts, v]]
            return
        for e in entries:
            if e[1] == v:
                if ev.ts > e[0]:
                    e[0] = ev.ts
                    entries.sort(key=self.order)
                return
        entries.append([ev.ts, v])
        entries.sort(key=self.order)
        if len(entries) > self.f.k:
            entries.pop()

    def read(self, key: int, t: int) -> Any:
        low = self.min_tile(t)
        names = self.names.names
        return [names[v] for ts, v in self.state.get(key, ()) if self.tile(ts) >= low]

    def empty(self) -> Any:
        return []

    def sweep(self, wm: int) -> None:
        low = self.min_tile(wm)
        self.state = {k: e for k, e in self.state.items() if self.tile(e[0][0]) >= low}


class TopKCount(Agg):
    """topk_count(field, k): per key [{tile: {value: n}}, {value: n in live tiles}]; top k by count."""

    def add(self, key: int, ev: Ev, wm: int) -> None:
        v = self.value(ev)
        if v != _NONE:
            self.count(key, v, ev.ts, wm)

    def count(self, key: int, v: int, ts: int, wm: int) -> None:
        tile = self.tile(ts)
        low = self.min_tile(wm)
        if tile < low:
            return
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = [{}, {}]
        tiles, total = st
        per = tiles.get(tile)
        if per is None:
            per = tiles[tile] = {}
            self.expire(st, low)
        per[v] = per.get(v, 0) + 1
        total[v] = total.get(v, 0) + 1

    @staticmethod
    def expire(st: list[dict[int, Any]], low: int) -> None:
        tiles, total = st
        for tile in [tile for tile in tiles if tile < low]:
            for v, n in tiles.pop(tile).items():
                left = total[v] - n
                if left:
                    total[v] = left
                else:
                    del total[v]

    def read(self, key: int, t: int) -> Any:
        st = self.state.get(key)
        if st is None:
            return []
        self.expire(st, self.min_tile(t))
        names = self.names.names
        k = self.f.k
        total = st[1]
        if len(total) > k:  # everything tied with the k-th count competes on the name
            kth = heapq.nlargest(k, total.values())[-1]
            cands = [(-n, names[v]) for v, n in total.items() if n >= kth]
        else:
            cands = [(-n, names[v]) for v, n in total.items()]
        field = self.f.field or "item_id"
        return [{field: name, "count": -n} for n, name in sorted(cands)[:k]]

    def empty(self) -> Any:
        return []

    def sweep(self, wm: int) -> None:
        low = self.min_tile(wm)
        for st in self.state.values():
            self.expire(st, low)
        self.state = {k: st for k, st in self.state.items() if st[1]}


class Covisit(TopKCount):
    """covisit: each event pairs with the user's previous `span` events of the same session (arrival
    order) within `gap_ms` and with another item; both directions count at the event's time."""

    def __init__(self, f: Feature, names: Interner, window: Window | None = None) -> None:
        super().__init__(f, names, window)
        self.recent: dict[int, list[tuple[int, int, int]]] = {}  # user -> [(session, item, ts)]

    def add(self, key: int, ev: Ev, wm: int) -> None:
        recent = self.recent.get(ev.u)
        if recent is None:
            recent = self.recent[ev.u] = []
        for sess, item, ts in recent:
            if sess == ev.sess and item != ev.i and abs(ts - ev.ts) <= self.f.gap_ms:
                self.count(ev.i, item, ev.ts, wm)
                self.count(item, ev.i, ev.ts, wm)
        recent.append((ev.sess, ev.i, ev.ts))
        if len(recent) > self.f.span:
            del recent[0]


def _pack(ev: Ev) -> bytes:
    return _REC.pack(ev.ts, ev.off, ev.i, ev.c, ev.a)


def _last_k(buf: bytes, k: int) -> bytearray:
    return bytearray(buf[-k * _REC.size:]) if len(buf) > k * _REC.size else bytearray(buf)


def _merge(a: bytes, b: bytes, k: int) -> bytearray:
    recs = sorted([*_REC.iter_unpack(a), *_REC.iter_unpack(b)])
    return bytearray(b"".join(_REC.pack(*r) for r in recs[-k:]))


def _insert(buf: bytearray, ev: Ev, k: int) -> bytearray:
    """Insert into a packed sequence sorted by (ts, offset), keeping the k latest."""
    rec = _pack(ev)
    if not buf or (ev.ts, ev.off) > _REC.unpack_from(buf, len(buf) - _REC.size)[:2]:
        buf += rec
    else:
        recs = list(_REC.iter_unpack(buf))
        insort(recs, _REC.unpack(rec))
        buf = bytearray(b"".join(_REC.pack(*r) for r in recs))
    return _last_k(buf, k) if len(buf) > k * _REC.size else buf


class LastN(Agg):
    """last_n(k): per key the k latest events (by ts, then offset), packed 25 bytes each."""

    def add(self, key: int, ev: Ev, wm: int) -> None:
        self.state[key] = _insert(self.state.get(key) or bytearray(), ev, self.f.k)

    def decode(self, buf: bytes, t: int) -> list[dict[str, Any]]:
        low = self.min_tile(t)
        names = self.names.names
        return [
            {"item_id": names[i], "action": ACTIONS[a], "ts": ts, "category": None if c == _NONE else names[c]}
            for ts, _, i, c, a in _REC.iter_unpack(buf)
            if self.tile(ts) >= low
        ]

    def read(self, key: int, t: int) -> Any:
        return self.decode(self.state.get(key, b""), t)

    def empty(self) -> Any:
        return []

    def sweep(self, wm: int) -> None:
        if self.tile_ms:
            low = self.min_tile(wm)
            self.state = {
                k: b for k, b in self.state.items() if self.tile(_REC.unpack_from(b, len(b) - _REC.size)[0]) >= low
            }


class SessionScoped(Agg):
    """Any aggregation over the user's current session: the inner state restarts with each session."""

    def __init__(self, f: Feature, names: Interner, sessions: Sessions) -> None:
        super().__init__(f, names)
        self.inner = _AGGS[f.agg](f, names, Window())
        self.sessions = sessions
        self.sess_of: dict[int, int] = {}

    def update(self, ev: Ev, wm: int) -> None:
        if self.sess_of.get(ev.u) != ev.sess:
            self.inner.state.pop(ev.u, None)
            self.sess_of[ev.u] = ev.sess
        self.inner.update(ev, wm)

    def read(self, key: int, t: int) -> Any:
        sess = self.sessions.open_session(key, t)
        if sess is None or self.sess_of.get(key) != sess:
            return self.inner.empty()
        return self.inner.read(key, t)

    def empty(self) -> Any:
        return self.inner.empty()

    def sweep(self, wm: int) -> None:
        gone = [u for u, s in self.sess_of.items() if self.sessions.open_session(u, wm) != s]
        for u in gone:
            del self.sess_of[u]
            self.inner.state.pop(u, None)


class BeforeSession(LastN):
    """last_n(k) over the user's events before the current session: [session, history, current]."""

    def __init__(self, f: Feature, names: Interner, sessions: Sessions) -> None:
        super().__init__(f, names)
        self.sessions = sessions

    def update(self, ev: Ev, wm: int) -> None:
        st = self.state.get(ev.u)
        if st is None:
            st = self.state[ev.u] = [ev.sess, bytearray(), bytearray()]
        elif st[0] != ev.sess:
            st[0], st[1], st[2] = ev.sess, _merge(st[1], st[2], self.f.k), bytearray()
        if self.actions is None or ev.a in self.actions:
            st[2] = _insert(st[2], ev, self.f.k)

    def read(self, key: int, t: int) -> Any:
        st = self.state.get(key)
        if st is None:
            return []
        if self.sessions.open_session(key, t) == st[0]:
            return self.decode(st[1], t)
        return self.decode(_merge(st[1], st[2], self.f.k), t)


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


def make_agg(f: Feature, names: Interner, sessions: Sessions) -> Agg:
    if f.window.kind == "session":
        return SessionScoped(f, names, sessions)
    if f.window.kind == "before_session":
        return BeforeSession(f, names, sessions)
    return _AGGS[f.agg](f, names)
