"""The FeatureEngine facade: applies committed events in offset order, serves reads, snapshots state.

State is split into units, each with its own lock, applied offset and watermark:

- **P partitions** (default 16, the log's): partition p holds the shoppers with crc32(user_id) % P == p:
  their sessions, every user and user_item feature, and covisit's shopper side (each shopper's recent
  events, which find the co-visited pairs). A write to one partition never blocks reads of another.
- **one unit per item or global feature** (28-day popularity, 2-hour trending, covisit's counts...): fed
  by every partition's events, keyed by item. When partitions run in different processes, these units
  are owned by item key the same way (a pair found on a shopper's partition travels with its event).

One writer (`update_many`, the log's commit thread) decides lateness and the watermark in offset order
for all units, so the partitioned state equals the single-stream rule exactly (property-tested), then
applies each partition's events under that partition's lock, then the item and global units.

A node of a cluster may **hold** only some partitions (`held`, from `[cluster]`, see docs/cluster.md):
the partitions it does not hold keep only what the item units need from them (sessions and covisit's
shopper side: a few recent events per shopper), not their user and user_item features, and a read of
those raises `PartitionNotHeld` (the server forwards it to a node that holds the partition).

Snapshots never pause serving: each section of a unit (a partition's sessions, each of its features) is
captured (msgpack of the dict, one C call: ~5 ms per 10^5 shoppers) under the unit's lock only, while the
other units keep serving, and written with the offset it held. A restart replays the log from the earliest
offset and each section skips what it already holds. Sessions are captured before the features of their partition
and partitions before the item units, so no section ever holds an event whose session number or
co-visited pairs the sections it depends on would not compute again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import heapq
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec

from insession.durable import fsync_dir, write_atomic
from insession.features.declare import Feature, FeatureRegistry, default_registry
from insession.features.online import (
    ACTION_INDEX,
    NONE_ID,
    Agg,
    CovisitPairs,
    Ev,
    Names,
    Sessions,
    make_agg,
    stable_id,
)
from insession.features.snapshot import Sections, SnapshotError, UnitHeader, read_header, read_unit, write_unit
from insession.schema import Event, partition_of

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
CURRENT_FILE = "CURRENT"  # names the complete snapshot directory
SNAPSHOT_LOCK_FILE = "SNAPSHOT.lock"  # held by whoever writes a snapshot or loads one (see `snapshot_lock`)
OLD_PICKLE_FILE = "features.snapshot"  # format of insession <= 0.1 (pickle): set aside, never loaded
LOCK_EVERY = 512  # events applied per writer step, so readers never wait behind a long replay
SWEEP_CHUNK = 1_000  # keys swept per lock hold (~1-3 ms of the GIL at a million shoppers)
SWEEP_DUTY = 0.25  # the share of its time the maintenance sweep holds the GIL (it pauses 3x each chunk's time)
REPLAY_CHUNK = 10_000  # events per batch when a new feature is backfilled from the log
USER_ENTITIES = ("user", "user_item")
ITEM_UNIT = "feature-"  # the name prefix of an item or global feature's unit
OFFSETS = "offsets"  # the section of a unit file that holds each other section's applied offset


class PartitionNotHeld(LookupError):
    """A read of shoppers whose partitions this engine does not all hold (a cluster node with a subset);
    `partitions`: every partition the read needs, so that it can go to a node holding them all."""

    def __init__(self, partitions: Iterable[int]) -> None:
        self.partitions = frozenset(partitions)
        super().__init__(f"partitions {sorted(self.partitions)} are not all held by this node")


def _section(f: Feature) -> str:
    return f"f:{f.name}@{f.hash()}"


@contextlib.contextmanager
def snapshot_lock(state_dir: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold `state_dir/SNAPSHOT.lock` (flock, exclusive): one process at a time writes a snapshot (and deletes
    the ones it replaces) or loads one, so the server and its snapshot standby (`insession.features.standby`)
    never read a snapshot the other is deleting. `wait=False` raises BlockingIOError if it is held."""
    with (state_dir / SNAPSHOT_LOCK_FILE).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield  # closing the file releases the lock


def yield_rest(began: float, duty: float) -> None:
    """After a step of background work that began at `began` (perf_counter), sleep (1 / duty - 1) times as
    long as it took, so the work holds the GIL for `duty` of the time at most (1: no pause)."""
    if duty < 1:
        time.sleep((time.perf_counter() - began) * (1 / duty - 1))


def chunked(events: Iterable[Event], n: int) -> Iterator[list[Event]]:
    """`events` in lists of at most n (a replay applies a chunk per call, never the whole log at once)."""
    it = iter(events)
    while chunk := list(islice(it, n)):
        yield chunk


def _feed(aggs: Iterable[Agg], evs: list[Ev]) -> None:
    """Each aggregation gets the events that pass its `actions` (one filtered list per distinct filter)."""
    by_filter: dict[frozenset[int] | None, list[Ev]] = {None: evs}
    for agg in aggs:
        sub = by_filter.get(agg.actions)
        if sub is None:
            sub = by_filter[agg.actions] = [ev for ev in evs if ev.a in agg.actions]  # type: ignore[operator]
        if sub:
            agg.add_batch(sub)


class _Unit:
    """A piece of state with its own lock; `applied`: every event of its up to this offset is in it;
    `wm`: the watermark its reads use. After a restart its sections may hold different offsets
    (`applied_of`, section -> offset; empty once the log has caught up with all of them): each section
    then skips the events it already holds."""

    def __init__(self, name: str, aggs: dict[str, Agg]) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.aggs = aggs
        self.applied = -1
        self.applied_of: dict[str, int] = {}
        self.wm = -1

    def sections(self) -> list[tuple[str, Callable[[], list[bytes]]]]:
        """(section, capture) in capture order; a feature's section is named by its name and declaration
        hash, so a feature dropped and declared again differently never restores the old state."""
        return [(_section(agg.f), agg.capture) for agg in self.aggs.values()]

    def restore(self, sections: Sections) -> set[str]:
        """Restore the features `sections` hold; returns the names of those it does not hold."""
        missing = set()
        for name, agg in self.aggs.items():
            body = sections.get(_section(agg.f))
            if body is None:
                missing.add(name)
            else:
                agg.restore(body)
        return missing

    def since(self, section: str, evs: list[Ev]) -> list[Ev]:
        """The events of `evs` that `section` does not hold yet."""
        held = self.applied_of.get(section)
        return evs if held is None else [ev for ev in evs if ev.off > held]

    def caught_up(self, offset: int) -> None:
        if self.applied_of and offset >= max(self.applied_of.values()):
            self.applied_of = {}

    def apply(self, evs: list[Ev]) -> None:
        if not self.applied_of:
            _feed(self.aggs.values(), evs)
            return
        for agg in self.aggs.values():
            _feed([agg], self.since(_section(agg.f), evs))


class _Partition(_Unit):
    """The shoppers of one partition: sessions, user and user_item features, covisit's shopper side. A
    partition not `held` keeps only sessions and covisit's shopper side (what the item units need)."""

    def __init__(self, index: int, registry: FeatureRegistry, names: Names, max_users: int,
                 held: bool = True) -> None:
        self.sessions = Sessions(registry.session_gap_ms)
        self.held = held
        aggs: dict[str, Agg] = {}
        for f in registry:
            if f.entity in USER_ENTITIES and held:
                aggs[f.name] = make_agg(f, names, self.sessions)
            elif f.agg == "covisit":
                aggs[f.name] = CovisitPairs(f, names)
        super().__init__(f"partition-{index:03d}", aggs)
        self.max_users = max_users
        self.evicted = 0

    def apply(self, evs: list[Ev]) -> None:
        """Sessions first, then the features, of each event. With a cap, the shoppers are evicted at the event
        that takes the partition past it, wherever the batches end: a copy applying the same stream in other
        pages (the standby, a feature reader, a restart's replay) evicts the same shoppers at the same event,
        so its state equals this one's (evicting at the end of each batch made the copies differ)."""
        sessions, cap = self.sessions, self.max_users
        held = self.applied_of.get("sessions")
        start = 0
        for n, ev in enumerate(evs):
            if held is not None and ev.off <= held:
                continue  # a restart: the sessions section already holds it
            ev.sess = sessions.update(ev.u, ev.sid, ev.ts)
            ev.new = sessions.started
            if cap and len(sessions.state) > cap:
                super().apply(evs[start : n + 1])
                self.evict(ev.off)
                start = n + 1
        if start < len(evs):
            super().apply(evs[start:])

    def evict(self, at: int) -> None:
        """Forget the least recently active shoppers (by their latest event time, then their key) down to 98%
        of the cap, so the scan runs once per 2% of new shoppers, not per event. `at`: the offset of the event
        that passed the cap; a feature restored from a section captured after it already holds this eviction."""
        state = self.sessions.state
        keep = self.max_users - self.max_users // 50
        last_ts = self.sessions.last_ts
        victims = set(heapq.nsmallest(len(state) - keep, state, key=lambda u: (last_ts(u), u)))
        self.sessions.forget(victims)
        for agg in self.aggs.values():
            held = self.applied_of.get(_section(agg.f))
            if held is None or held < at:
                agg.forget(victims)
        self.evicted += len(victims)

    def sections(self) -> list[tuple[str, Callable[[], list[bytes]]]]:
        return [("sessions", self.sessions.capture), *super().sections()]

    def restore(self, sections: Sections) -> set[str]:
        if "sessions" not in sections:
            raise SnapshotError(f"{self.name}: the sessions section is missing")
        self.sessions.restore(sections["sessions"])
        return super().restore(sections)


class FeatureEngine:
    """Online state of every declared feature; one writer (`update_many`), many concurrent readers.

    Reads are answered at the watermark (the largest event time applied), never at the wall clock.
    `max_users` > 0 caps the shoppers tracked per partition at max_users / P (least recently active
    evicted; their features read empty until they come back, see docs/features.md). `held`: the
    partitions whose shoppers' features this engine keeps and serves (None: all of them).
    """

    def __init__(self, registry: FeatureRegistry, state_dir: Path | None = None, *,
                 partitions: int = 16, max_users: int = 0, held: frozenset[int] | None = None) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, not {partitions}")
        if max_users < 0:
            raise ValueError(f"max_users must be >= 0 (0: no cap), not {max_users}")
        if held is not None and (not held or not held <= set(range(partitions))):
            raise ValueError(f"held partitions must be a non-empty subset of 0..{partitions - 1}, not {sorted(held)}")
        self.registry = registry
        self.state_dir = state_dir
        self.partitions = partitions
        self.max_users = max_users
        self.held = frozenset(range(partitions)) if held is None else held
        self._names = Names()
        per_partition = -(-max_users // partitions) if max_users else 0
        self._parts = [_Partition(p, registry, self._names, per_partition, p in self.held) for p in range(partitions)]
        self._items = {f.name: self._item_unit(f) for f in registry if f.entity not in USER_ENTITIES}
        self._writer = threading.Lock()  # one writer step at a time; snapshots take it to order their captures
        self.lateness_ms = registry.lateness_ms
        self.watermark = -1
        self.applied_offset = -1
        self.too_late = 0
        self.snapshot_offset = -1
        self.snapshots_written = 0  # by this engine (a snapshot standby's are not counted here)
        self.rejected_snapshots = 0  # snapshots set aside (damaged, older format, other stream rules)
        self._sweep_cursor = -1
        self._snapshotting = threading.Lock()
        # True while a snapshot holds a unit's lock to capture a section (up to ~15-25 ms at a million
        # shoppers, in chunks that let the GIL go): a reader on an event loop reads in a thread meanwhile,
        # so the loop never waits on that lock (see `insession.query.service.QueryService.off_loop`).
        self.capturing = False
        self.version = 0  # +1 per feature installed or dropped (the query planner's cache key)
        self.unbuilt: list[Feature] = []  # declared, but not in the snapshot restored: to backfill, not served

    def _item_unit(self, f: Feature) -> _Unit:
        return _Unit(f"{ITEM_UNIT}{f.name}", {f.name: make_agg(f, self._names, Sessions(0))})

    def _units(self) -> list[_Unit]:
        """Partitions first, then item units: the order of snapshot captures (see the module docstring)."""
        return [*self._parts, *self._items.values()]

    @property
    def evicted_users(self) -> int:
        return sum(p.evicted for p in self._parts)

    @property
    def tracked_users(self) -> int:
        return sum(len(p.sessions.state) for p in self._parts)

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, registry: FeatureRegistry | None = None, *,
             partitions: int = 16, max_users: int = 0, held: frozenset[int] | None = None) -> FeatureEngine:
        """Open the state in `state_dir`: the last snapshot when it is intact and was taken with the same
        stream rules and partitions, else empty (applied_offset -1: replay the log from the start). A
        snapshot that cannot be used is set aside (renamed `rejected-*`) with a warning, never loaded.

        `registry` (default: `registry.json` there, else the default features) is what is declared. A
        declared feature the snapshot does not hold (declared after it was taken, or declared again
        differently) is not served: it is left out of `registry` and listed in `unbuilt`, for a backfill
        (`insession.features.manage`); a feature the snapshot holds but no longer declared is ignored. A
        snapshot taken with other `held` partitions is set aside like one of other stream rules: the
        partitions a node holds change only with a rebuild from the log."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        reg_path = state_dir / REGISTRY_FILE
        if registry is None and reg_path.exists():
            registry = FeatureRegistry.load(reg_path)
        else:
            registry = registry or default_registry()
            registry.save(reg_path)
        engine = cls(registry, state_dir, partitions=partitions, max_users=max_users, held=held)
        old = state_dir / OLD_PICKLE_FILE
        if old.exists():
            log.warning("feature snapshot %s is of an older format: set aside, rebuilding from the log", old.name)
            os.replace(old, state_dir / f"rejected-{OLD_PICKLE_FILE}")
            engine.rejected_snapshots += 1
        current = state_dir / CURRENT_FILE
        with snapshot_lock(state_dir):
            if current.exists():
                gen = state_dir / current.read_text().strip()
                try:
                    engine._restore(gen)
                except SnapshotError as e:
                    log.warning("feature snapshot %s set aside, rebuilding from the log: %s", gen.name, e)
                    engine = cls(registry, state_dir, partitions=partitions, max_users=max_users, held=held)
                    engine.rejected_snapshots += 1
                    if gen.is_dir():
                        shutil.rmtree(state_dir / f"rejected-{gen.name}", ignore_errors=True)
                        os.replace(gen, state_dir / f"rejected-{gen.name}")
                    current.unlink()
        return engine

    def _header(self, unit: str, offset: int = -1, watermark: int = -1) -> UnitHeader:
        rules = self.registry.rules_hash()
        if len(self.held) < self.partitions:  # a subset's state holds less: never restored as another's
            held = f"{rules}:held={sorted(self.held)}".encode()
            rules = hashlib.blake2b(held, digest_size=len(rules) // 2).hexdigest()
        return UnitHeader(self.partitions, rules, unit, offset, watermark)

    def _restore(self, gen: Path) -> None:
        """Load snapshot `gen`; the declared features it does not hold go to `unbuilt`."""
        head, sections = read_unit(gen / "stream.state", self._header("stream"))
        missing: set[str] = set()
        try:
            too_late = msgspec.msgpack.decode(sections["clock"][0], type=int)
            for chunk in sections["names"]:
                for name in msgspec.msgpack.decode(chunk, type=list[str]):
                    self._names(name)
            for unit in self._units():
                if unit.name.startswith(ITEM_UNIT) and not (gen / f"{unit.name}.state").exists():
                    missing.update(unit.aggs)
                    continue
                uh, body = read_unit(gen / f"{unit.name}.state", self._header(unit.name))
                offsets = msgspec.msgpack.decode(body.pop(OFFSETS, [b""])[0], type=dict[str, int])
                if set(offsets) != set(body) or min(offsets.values()) < head.offset:
                    raise SnapshotError(f"{unit.name}: its sections or their offsets do not fit the stream's")
                missing.update(unit.restore(body))
                held = {name: offsets[name] for name, _ in unit.sections() if name in offsets}
                unit.applied, unit.applied_of, unit.wm = min(held.values(), default=head.offset), held, uh.watermark
                unit.caught_up(unit.applied)
        except (KeyError, IndexError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            raise SnapshotError(f"{gen.name}: undecodable section ({type(e).__name__}: {e})") from None
        self.applied_offset, self.watermark, self.too_late = head.offset, head.watermark, too_late
        self.snapshot_offset = head.offset
        for name in sorted(missing):
            self.unbuilt.append(self.registry[name])
            self._remove(name)

    def sweep(self, units: list[_Unit] | None = None, duty: float = 1.0) -> None:
        """Forget expired state of `units` (default: all) for bounded memory of idle keys, `SWEEP_CHUNK`
        keys per lock hold, so readers and the writer wait for one chunk at most. `duty` < 1 pauses after each
        chunk for (1 / duty - 1) times as long as it took, leaving the GIL to serving (maintenance's sweep)."""
        for unit in self._units() if units is None else units:
            for agg in unit.aggs.values():
                with unit.lock:
                    keys = agg.swept_keys()
                for start in range(0, len(keys), SWEEP_CHUNK):
                    began = time.perf_counter()
                    with unit.lock:
                        agg.sweep(unit.wm, self.lateness_ms, keys[start : start + SWEEP_CHUNK])
                    yield_rest(began, duty)

    def sweep_next(self) -> None:
        """Sweep the next unit in turn (maintenance calls this every few seconds): a pass over every key of
        every unit at once was seconds of Python at a million shoppers, CPU taken from serving. Paced
        (SWEEP_DUTY): one unit swept flat out still put a 200-300 ms spike into every request every 5 s in
        bench_mixed at a million shoppers."""
        units = self._units()
        self._sweep_cursor = (self._sweep_cursor + 1) % len(units)
        self.sweep([units[self._sweep_cursor]], duty=SWEEP_DUTY)

    def snapshot(self) -> None:
        """Write every unit into a new snapshot directory and make it CURRENT.

        Each unit is captured under its own lock only (reads of the others go on; the writer waits for
        that one unit), then written outside it. A failure removes the new directory and raises; the
        previous snapshot stays CURRENT. Two other ways were measured under bench_mixed's load at a
        million shoppers and lost (docs/features.md): a forked child writing a copy-on-write picture, and
        captures paced to a quarter of the time."""
        if self.state_dir is None:
            raise ValueError("this engine has no state_dir")
        # maintenance and a finished backfill may both ask for one; a standby process may be writing one
        with self._snapshotting, snapshot_lock(self.state_dir):
            self._snapshot(self.state_dir)
        self.snapshots_written += 1

    def written_snapshot_offset(self) -> int:
        """The applied offset of the snapshot `CURRENT` names now, whichever process wrote it (-1: none);
        a snapshot standby's advance this way while this engine writes none. While another process holds
        the snapshot lock (writing one), `snapshot_offset` as last known: the caller never waits for it."""
        if self.state_dir is None:
            return -1
        try:
            with snapshot_lock(self.state_dir, wait=False):  # not replaced and deleted under us
                current = self.state_dir / CURRENT_FILE
                return read_header(self.state_dir / current.read_text().strip() / "stream.state").offset
        except BlockingIOError:
            return self.snapshot_offset
        except (FileNotFoundError, SnapshotError):  # none yet; a damaged one is set aside at the next start
            return -1

    def _snapshot(self, state_dir: Path) -> None:
        gen = state_dir / f"snap-{max(self.applied_offset, 0):012d}-{time.time_ns()}"
        tmp = gen.with_name(gen.name + ".tmp")
        try:
            tmp.mkdir()
            with self._writer:  # between writer steps: the stream's clock at one offset
                offset, wm, too_late = self.applied_offset, self.watermark, self.too_late
            for unit in self._parts:
                self._write_unit(tmp, unit)
            with self._writer:  # a writer step whose partitions were captured has reached the item units
                pass
            for unit in self._items.values():
                self._write_unit(tmp, unit)
            with self._writer:  # names last: every id a section captured above is named (names only grow)
                names = list(self._names.ids)
            stream = {"clock": [msgspec.msgpack.encode(too_late)],
                      "names": [msgspec.msgpack.encode(names[a : a + 50_000]) for a in range(0, len(names), 50_000)]}
            write_unit(tmp / "stream.state", self._header("stream", offset, wm), stream)
            fsync_dir(tmp)
            os.replace(tmp, gen)
            fsync_dir(state_dir)
            write_atomic(state_dir / CURRENT_FILE, gen.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in state_dir.glob("snap-*"):
            if old != gen:
                shutil.rmtree(old, ignore_errors=True)
        self.snapshot_offset = offset

    def _write_unit(self, directory: Path, unit: _Unit) -> None:
        """Capture a unit one section at a time, each under the unit's lock with the offset it holds
        (sections in `unit.sections()` order: a partition's sessions before its features), then write it."""
        sections: Sections = {}
        offsets: dict[str, int] = {}
        wm = -1
        with unit.lock:  # a feature installed or dropped meanwhile changes the unit's aggregations
            captures = unit.sections()
        for name, capture in captures:
            with unit.lock:
                self.capturing = True
                try:
                    sections[name], offsets[name] = capture(), unit.applied
                finally:
                    self.capturing = False
                wm = unit.wm if wm < 0 else wm
        sections[OFFSETS] = [msgspec.msgpack.encode(offsets)]
        write_unit(directory / f"{unit.name}.state", self._header(unit.name, min(offsets.values()), wm), sections)

    # -- writes ---------------------------------------------------------------------------------

    def update_many(self, events: list[Event]) -> None:
        """Apply committed events in offset order (events at or below applied_offset are skipped)."""
        for start in range(0, len(events), LOCK_EVERY):
            with self._writer:
                self._apply(events[start : start + LOCK_EVERY])

    def _apply(self, events: list[Event]) -> None:
        """One writer step: lateness and watermark in offset order, then each partition under its lock,
        then each item unit under its lock. A unit skips events at or below its own applied offset
        (after a restart, units captured at different offsets replay from the earliest)."""
        names, parts, n = self._names, self._parts, self.partitions
        wm, applied, lateness = self.watermark, self.applied_offset, self.lateness_ms
        by_part: dict[int, list[Ev]] = {}
        accepted: list[Ev] = []
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
            sid = NONE_ID if e.session_id is None else stable_id(e.session_id)
            ev = Ev(stable_id(e.user_id), names(e.item_id), names(e.category), ACTION_INDEX[e.action], ts,
                    e.offset, sid, wm, e)
            accepted.append(ev)
            p = partition_of(e.user_id, n)
            group = by_part.get(p)
            if group is None:
                by_part[p] = [ev]
            else:
                group.append(ev)
        for p, evs in by_part.items():
            part = parts[p]
            with part.lock:
                todo = [ev for ev in evs if ev.off > part.applied]
                if todo:
                    part.apply(todo)
                part.applied, part.wm = applied, wm
                part.caught_up(applied)
        for part in parts:  # untouched ones have nothing at or below `applied` to apply: no lock needed
            part.applied, part.wm = applied, wm
            part.caught_up(applied)
        for unit in self._items.values():
            todo = [ev for ev in accepted if ev.off > unit.applied]
            with unit.lock:
                if todo:
                    unit.apply(todo)
                unit.applied, unit.wm = applied, wm
                unit.caught_up(applied)
        self.watermark, self.applied_offset = wm, applied

    def staged(self, feature: Feature) -> FeatureEngine:
        """An empty engine for `feature` alone, with this one's stream rules and partitions: a backfill
        replays the stream into it from offset 0 (`update_many`), then `install` moves it in."""
        if feature.name in self.registry:
            raise ValueError(f"feature {feature.name!r} is already declared")
        reg = FeatureRegistry.of([feature], lateness_ms=self.registry.lateness_ms,
                                 session_gap_ms=self.registry.session_gap_ms)
        return FeatureEngine(reg, partitions=self.partitions, max_users=self.max_users, held=self.held)

    def install(self, staged: FeatureEngine, tail: Callable[[int, int], Iterable[Event]]) -> None:
        """Serve the feature a backfill built in `staged` (see `staged`): under the writer lock, `staged`
        applies `tail(from, upto)` (the log from its applied offset + 1 up to this engine's) and its state
        moves in; readers see the feature from the next read on, whole. Keep the tail short (catch up
        first, outside the lock): ingest waits for it. Shoppers this engine has evicted are dropped."""
        (feature,) = staged.registry
        with self._writer:
            if feature.name in self.registry:
                raise ValueError(f"feature {feature.name!r} is already declared")
            if staged.applied_offset < self.applied_offset:
                for chunk in chunked(tail(staged.applied_offset + 1, self.applied_offset), REPLAY_CHUNK):
                    staged.update_many(chunk)
            if staged.applied_offset != self.applied_offset:
                raise ValueError(f"the backfill of {feature.name!r} reached offset {staged.applied_offset}, "
                                 f"not the engine's {self.applied_offset}: the log tail given was incomplete")
            for name, i in staged._names.ids.items():
                if name not in self._names.ids:
                    self._names.ids[name], self._names.names[i] = i, name
            for mine, theirs in zip(self._parts, staged._parts, strict=True):
                agg = theirs.aggs.get(feature.name)
                if agg is None:
                    continue
                agg.names = self._names
                if hasattr(agg, "sessions"):
                    agg.sessions = mine.sessions  # the same rule over the same log: the same sessions
                with mine.lock:
                    if self.max_users:  # shoppers the cap evicted here since: not kept by the new feature
                        gone = set(theirs.sessions.state) - set(mine.sessions.state)
                        if gone:
                            agg.forget(gone)
                    mine.aggs[feature.name] = agg
            unit = staged._items.get(feature.name)
            if unit is not None:
                for agg in unit.aggs.values():
                    agg.names = self._names
                unit.applied, unit.wm = self.applied_offset, self.watermark
                self._items = {**self._items, feature.name: unit}  # copy-on-write: readers hold a whole dict
            self.registry = self.registry.plus(feature)
            self.version += 1

    def drop(self, name: str) -> Feature:
        """Stop serving feature `name` and free its state; returns its declaration. KeyError if unknown."""
        with self._writer:
            feature = self.registry[name]
            self._remove(name)
            self.version += 1
        return feature

    def _remove(self, name: str) -> None:
        self.registry = self.registry.minus(name)  # first: no new read asks for it
        for part in self._parts:
            with part.lock:
                part.aggs.pop(name, None)
        self._items = {n: u for n, u in self._items.items() if n != name}

    def add_feature(self, feature: Feature, log_events: Iterable[Event]) -> None:
        """Declare and build a feature in one call (tests, scripts): `log_events` is the log from offset 0
        (`EventLog.read(0)`). Ingest waits for the whole replay; a server uses the background backfill."""
        staged = self.staged(feature)
        for chunk in chunked(log_events, REPLAY_CHUNK):
            staged.update_many([e for e in chunk if e.offset <= self.applied_offset])
        self.install(staged, lambda a, b: ())

    def state_keys(self, feature: str) -> int:
        """How many keys `feature` holds state for (shoppers, items, pairs...), over all its units."""
        f = self.registry[feature]
        units = self._parts if f.entity in USER_ENTITIES or f.agg == "covisit" else []
        item = self._items.get(feature)
        total = 0
        for unit in [*units, *([item] if item is not None else [])]:
            with unit.lock:
                agg = unit.aggs.get(feature)
                total += len(agg.state) if agg is not None else 0
        return total

    # -- reads ----------------------------------------------------------------------------------

    def _key(self, entity: str, key: str | tuple[str, ...] | None,
             users: dict[str, tuple[int, int]] | None = None) -> tuple[Any, int]:
        """The state key of an entity key and the partition it lives in (0 for item and global keys).
        `users` memoises a shopper's (stable id, partition) across the keys of one read: a ranking request
        reads 60 (user, item) keys of one shopper (hashing the id each time was a tenth of `counters`)."""
        if entity == "global":
            return 0, 0
        ids = (key,) if isinstance(key, str) else tuple(key or ())
        if len(ids) != (2 if entity == "user_item" else 1):
            raise ValueError(f"a {entity} key is {'(user_id, item_id)' if entity == 'user_item' else 'one id'}")
        first = str(ids[0])
        if entity == "item":
            return self._item_id(first), 0
        user = None if users is None else users.get(first)
        if user is None:
            user = (stable_id(first), partition_of(first, self.partitions))
            if users is not None:
                users[first] = user
        if entity == "user_item":
            return (user[0], self._item_id(str(ids[1]))), user[1]
        return user

    def _item_id(self, item: str) -> int:
        """`stable_id(item)`, from the name table when the stream has named it (a dict lookup, not a hash:
        a ranking request looks up 60 candidates in 3 counters)."""
        i = self._names.ids.get(item)
        return stable_id(item) if i is None else i

    def _unit(self, f: Feature, part: int) -> _Unit:
        if f.entity in USER_ENTITIES and not self._parts[part].held:
            raise PartitionNotHeld([part])
        unit = self._parts[part] if f.entity in USER_ENTITIES else self._items.get(f.name)
        if unit is None or f.name not in unit.aggs:  # dropped since the caller looked it up
            raise KeyError(f"feature {f.name!r} was dropped")
        return unit

    def _check_held(self, partitions: Iterable[int]) -> None:
        if not all(self._parts[p].held for p in partitions):
            raise PartitionNotHeld(partitions)

    def read(self, feature: str, key: str | tuple[str, ...] | None) -> Any:
        """The JSON-able value of `feature` for `key` (None for global features) at the watermark."""
        f = self.registry[feature]
        k, part = self._key(f.entity, key)
        unit = self._unit(f, part)
        with unit.lock:
            agg = unit.aggs.get(feature)
            if agg is None:
                raise KeyError(f"feature {feature!r} was dropped")
            return agg.read(k, unit.wm)

    def read_many(self, feature: str, keys: list[str | tuple[str, ...] | None]) -> list[Any]:
        """`read` of `feature` for each of `keys`; one lock hold per partition (item features: one)."""
        f = self.registry[feature]
        users: dict[str, tuple[int, int]] = {}
        located = [self._key(f.entity, key, users) for key in keys]
        out: list[Any] = [None] * len(keys)
        by_part: dict[int, list[int]] = {}
        for n, (_, part) in enumerate(located):
            by_part.setdefault(part, []).append(n)
        if f.entity in USER_ENTITIES:
            self._check_held(by_part)
        for part, where in by_part.items():
            unit = self._unit(f, part)
            with unit.lock:
                agg = unit.aggs.get(feature)
                if agg is None:
                    raise KeyError(f"feature {feature!r} was dropped")
                values = agg.read_many([located[n][0] for n in where], unit.wm)
            for n, value in zip(where, values, strict=True):
                out[n] = value
        return out

    def read_all(self, entity: str, key: str | tuple[str, ...] | None) -> dict[str, Any]:
        """Every feature of `entity` for `key`: a shopper's at one watermark under its partition's lock."""
        return self.read_all_many(entity, [key])[0]

    def read_all_many(self, entity: str, keys: list[str | tuple[str, ...] | None],
                      names: list[str] | None = None) -> list[dict[str, Any]]:
        """`read_all` of each key (only the features `names`, when given): one lock hold per partition for
        all its shoppers, one per item feature for all the items. KeyError names an unknown feature."""
        feats = self.registry.of_entity(entity)
        if names is not None:
            wanted = set(names)
            for name in wanted:
                if self.registry[name].entity != entity:
                    raise KeyError(f"feature {name!r} is a {self.registry[name].entity} feature, not a {entity} one")
            feats = [f for f in feats if f.name in wanted]
        located = [self._key(entity, key) for key in keys]
        out: list[dict[str, Any]] = [{} for _ in keys]
        if entity in USER_ENTITIES:
            by_part: dict[int, list[int]] = {}
            for n, (_, part) in enumerate(located):
                by_part.setdefault(part, []).append(n)
            self._check_held(by_part)
            for part, where in by_part.items():
                unit = self._parts[part]
                with unit.lock:
                    aggs, wm = unit.aggs, unit.wm
                    present = [(f.name, aggs[f.name]) for f in feats if f.name in aggs]
                    for n in where:
                        k = located[n][0]
                        out[n] = {name: agg.read(k, wm) for name, agg in present}
            return out
        items = self._items
        for f in feats:
            item_unit = items.get(f.name)
            if item_unit is None:
                continue
            with item_unit.lock:
                agg, wm = item_unit.aggs[f.name], item_unit.wm
                for n, (k, _) in enumerate(located):
                    out[n][f.name] = agg.read(k, wm)
        return out

