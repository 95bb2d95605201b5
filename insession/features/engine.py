"""The FeatureEngine facade: applies committed events in offset order, serves reads, snapshots state."""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

from insession.features.declare import Feature, FeatureRegistry, default_registry
from insession.features.online import ACTION_INDEX, Agg, Ev, Interner, Sessions, make_agg
from insession.schema import Event

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "features.snapshot"
REGISTRY_FILE = "registry.json"
LOCK_EVERY = 512  # events applied per lock hold, so readers never wait behind a long replay
SWEEP_CHUNK = 5_000  # keys swept per lock hold
REPLAY_CHUNK = 10_000  # events per batch when a new feature is backfilled from the log
_SNAPSHOT_VERSION = 4  # 4: packed sessions, scalar session counters, compact records


class _Stream:
    """Watermark, lateness and sessions for one pass over the log, feeding a set of aggregations."""

    def __init__(self, registry: FeatureRegistry, names: Interner) -> None:
        self.lateness_ms = registry.lateness_ms
        self.names = names
        self.sessions = Sessions(registry.session_gap_ms)
        self.aggs: dict[str, Agg] = {f.name: make_agg(f, names, self.sessions) for f in registry}
        self.watermark = -1
        self.applied_offset = -1
        self.too_late = 0

    def apply(self, events: Iterable[Event]) -> None:
        names, ids, sessions = self.names, self.names.ids, self.sessions
        wm, applied, lateness = self.watermark, self.applied_offset, self.lateness_ms
        evs: list[Ev] = []
        for e in events:
            if e.offset <= applied:
                continue  # already applied (a replay overlapping the snapshot)
            applied = e.offset
            ts = e.ts
            if ts < wm - lateness:
                self.too_late += 1
                continue
            if ts > wm:
                wm = ts
            u, i, c = ids.get(e.user_id), ids.get(e.item_id), ids.get(e.category)  # type: ignore[arg-type]
            if u is None:
                u = names(e.user_id)
            if i is None:
                i = names(e.item_id)
            if c is None:
                c = names(e.category)
            sess = sessions.update(u, names(e.session_id), ts)
            evs.append(Ev(u, i, c, ACTION_INDEX[e.action], ts, e.offset, sess, sessions.started, wm, e))
        self.watermark, self.applied_offset = wm, applied
        if not evs:
            return
        by_filter: dict[frozenset[int] | None, list[Ev]] = {None: evs}
        for agg in self.aggs.values():
            sub = by_filter.get(agg.actions)
            if sub is None:
                sub = by_filter[agg.actions] = [ev for ev in evs if ev.a in agg.actions]  # type: ignore[operator]
            if sub:
                agg.add_batch(sub)


class FeatureEngine:
    """Online state of every declared feature; one writer (`update_many`), many concurrent readers.

    Reads are answered at the watermark (the largest event time applied), never at the wall clock.
    """

    def __init__(self, registry: FeatureRegistry, state_dir: Path | None = None) -> None:
        self.registry = registry
        self.state_dir = state_dir
        self._names = Interner()
        self._stream = _Stream(registry, self._names)
        self._lock = threading.Lock()
        self.snapshot_offset = -1

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, registry: FeatureRegistry | None = None) -> FeatureEngine:
        """Open the state in `state_dir`: the last snapshot when it was taken with the same registry
        (hash), else empty (applied_offset -1: replay the log from the start)."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        reg_path = state_dir / REGISTRY_FILE
        if registry is None:
            registry = FeatureRegistry.load(reg_path) if reg_path.exists() else default_registry()
        registry.save(reg_path)
        engine = cls(registry, state_dir)
        snap = state_dir / SNAPSHOT_FILE
        if snap.exists():
            with snap.open("rb") as f:
                body = pickle.load(f)
            if body["version"] == _SNAPSHOT_VERSION and body["registry_hash"] == registry.hash():
                engine._names = body["names"]
                engine._stream = body["stream"]
                engine.snapshot_offset = engine.applied_offset
            else:
                log.warning("feature snapshot %s was taken with other declarations: rebuilding from the log", snap)
        return engine

    def sweep(self) -> None:
        """Forget expired state (bounded memory for idle keys), `SWEEP_CHUNK` keys per lock hold, so
        readers and the writer wait for one chunk at most, never for a pass over every key."""
        for name in list(self._stream.aggs):
            with self._lock:
                agg = self._stream.aggs[name]
                keys = agg.swept_keys()
            for start in range(0, len(keys), SWEEP_CHUNK):
                with self._lock:
                    agg.sweep(self._stream.watermark, self._stream.lateness_ms, keys[start : start + SWEEP_CHUNK])

    def snapshot(self) -> None:
        """Sweep (in chunks), then write the whole state atomically (temporary file, fsync, rename).

        The state is pickled under the lock (a pause for readers that grows with the state); only the
        write and fsync happen outside it. A forked writer would remove the pause but crashed (SIGSEGV)
        in the server process, beside ONNX Runtime, torch and DuckDB threads."""
        if self.state_dir is None:
            raise ValueError("this engine has no state_dir")
        self.sweep()
        with self._lock:
            offset = self.applied_offset
            body = pickle.dumps(
                {
                    "version": _SNAPSHOT_VERSION,
                    "registry_hash": self.registry.hash(),
                    "names": self._names,
                    "stream": self._stream,
                },
                protocol=pickle.HIGHEST_PROTOCOL,
            )
        path = self.state_dir / SNAPSHOT_FILE
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.snapshot_offset = offset

    # -- writes ---------------------------------------------------------------------------------

    def update_many(self, events: list[Event]) -> None:
        """Apply committed events in offset order (events at or below applied_offset are skipped)."""
        for start in range(0, len(events), LOCK_EVERY):
            with self._lock:
                self._stream.apply(events[start : start + LOCK_EVERY])

    def add_feature(self, feature: Feature, log_events: Iterable[Event]) -> None:
        """Declare a new feature and backfill it: `log_events` is the log from offset 0 (EventLog.read(0))."""
        if feature.name in self.registry:
            raise ValueError(f"feature {feature.name!r} is already declared")
        reg = FeatureRegistry.of(
            [feature], lateness_ms=self.registry.lateness_ms, session_gap_ms=self.registry.session_gap_ms
        )
        with self._lock:  # the writer waits while the new feature catches up with the log
            backfill = _Stream(reg, self._names)
            events = iter(log_events)
            while chunk := [e for e in islice(events, REPLAY_CHUNK) if e.offset <= self.applied_offset]:
                backfill.apply(chunk)
            agg = backfill.aggs[feature.name]
            if hasattr(agg, "sessions"):
                agg.sessions = self._stream.sessions  # the same rule over the same log: the same sessions
            self._stream.aggs[feature.name] = agg
            self.registry.add(feature)
        if self.state_dir is not None:
            self.registry.save(self.state_dir / REGISTRY_FILE)

    # -- reads ----------------------------------------------------------------------------------

    @property
    def applied_offset(self) -> int:
        return self._stream.applied_offset

    @property
    def watermark(self) -> int:
        return self._stream.watermark

    @property
    def too_late(self) -> int:
        return self._stream.too_late

    def _key(self, entity: str, key: str | tuple[str, ...] | None) -> int | None:
        """The state key of an entity key, or None when some id was never seen."""
        if entity == "global":
            return 0
        ids = (key,) if isinstance(key, str) else tuple(key or ())
        if len(ids) != (2 if entity == "user_item" else 1):
            raise ValueError(f"a {entity} key is {'(user_id, item_id)' if entity == 'user_item' else 'one id'}")
        ints = [self._names.get(str(i)) for i in ids]
        if None in ints:
            return None
        return ints[0] << 32 | ints[1] if entity == "user_item" else ints[0]  # type: ignore[operator]

    def read(self, feature: str, key: str | tuple[str, ...] | None) -> Any:
        """The JSON-able value of `feature` for `key` (None for global features) at the watermark."""
        f = self.registry[feature]
        with self._lock:
            agg = self._stream.aggs[feature]
            k = self._key(f.entity, key)
            return agg.empty() if k is None else agg.read(k, self._stream.watermark)

    def read_many(self, feature: str, keys: list[str | tuple[str, ...] | None]) -> list[Any]:
        """`read` of `feature` for each of `keys`, at one watermark under one lock."""
        f = self.registry[feature]
        with self._lock:
            agg = self._stream.aggs[feature]
            ints = [self._key(f.entity, key) for key in keys]
            known = agg.read_many([k for k in ints if k is not None], self._stream.watermark)
            values = iter(known)
            return [agg.empty() if k is None else next(values) for k in ints]

    def read_all(self, entity: str, key: str | tuple[str, ...] | None) -> dict[str, Any]:
        """Every feature of `entity` for `key`, read at one watermark."""
        with self._lock:
            k = self._key(entity, key)
            wm = self._stream.watermark
            return {
                f.name: self._stream.aggs[f.name].empty() if k is None else self._stream.aggs[f.name].read(k, wm)
                for f in self.registry.of_entity(entity)
            }
