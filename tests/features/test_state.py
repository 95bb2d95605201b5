"""The partitioned online state: partitioned = single stream, restart at any interleaving = never stopped,
pure reads, damaged snapshots rebuilt, the shopper cap, and snapshots that leave other units serving."""

from __future__ import annotations

import hashlib
import pickle
import random
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from features_helpers import ALL_KINDS, T0, ev, key_of, streams
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from insession.features import FeatureEngine, FeatureRegistry, default_registry, online
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS, UNBOUNDED, Feature, sliding
from insession.features.engine import CURRENT_FILE, OLD_PICKLE_FILE, PartitionNotHeld, _feed, _Partition, _Unit
from insession.features.online import Ev, Names, Sessions, make_agg
from insession.features.snapshot import _HEAD, _HEAD_CRC, HEADER_SIZE
from insession.schema import Event, partition_of

USERS = [f"u{n}" for n in range(12)]
ITEMS = ["i0", "i1", "i2", "i3", "i4", "i9"]
REGISTRIES = {"default": default_registry(), "all_kinds": ALL_KINDS}


@st.composite
def many_user_streams(draw: st.DrawFn) -> list[Event]:
    """`streams()` with its three users spread over twelve (so every partition count splits them)."""
    events = draw(streams())
    names = draw(st.lists(st.sampled_from(USERS), min_size=3, max_size=3))
    rename = dict(zip(["u0", "u1", "u2"], names, strict=True))
    for e in events:
        e.user_id = rename[e.user_id]
    return events


def all_reads(engine: FeatureEngine) -> dict[tuple[str, str, str], Any]:
    out = {}
    for u in [*USERS, "nobody"]:
        for i in ITEMS:
            row = {"user_id": u, "item_id": i}
            for f in engine.registry:
                out[(f.name, u, i)] = engine.read(f.name, key_of(f.entity, row))
    return out


def replayed(registry: FeatureRegistry, events: list[Event], partitions: int = 16) -> FeatureEngine:
    engine = FeatureEngine(registry, partitions=partitions)
    engine.update_many(events)
    return engine


def captures(engine: FeatureEngine) -> list[dict[str, list[bytes]]]:
    return [{name: capture() for name, capture in unit.sections()} for unit in engine._units()]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=many_user_streams(), partitions=st.sampled_from([2, 3, 7, 16]),
       registry=st.sampled_from(sorted(REGISTRIES)), cuts=st.lists(st.integers(1, 60), max_size=3))
def test_partitioned_equals_single_stream(events: list[Event], partitions: int, registry: str,
                                          cuts: list[int]) -> None:
    reg = REGISTRIES[registry]
    single, split = FeatureEngine(reg, partitions=1), FeatureEngine(reg, partitions=partitions)
    start = 0
    for cut in [*sorted({c % (len(events) + 1) for c in cuts}), len(events)]:
        single.update_many(events[start:cut])
        split.update_many(events[start:cut])
        start = cut
        assert all_reads(split) == all_reads(single)
        assert (split.watermark, split.applied_offset, split.too_late) == (
            single.watermark, single.applied_offset, single.too_late)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(  # one event before each unit's capture, on one shopper whose every event pairs with the last
    events=[ev(n, "u1", f"i{n % 3}", T0 + n * 1000) for n in range(12)], registry="default", cut=3, progress=[1] * 25,
)
@given(events=many_user_streams(), registry=st.sampled_from(sorted(REGISTRIES)), cut=st.integers(0, 60),
       progress=st.lists(st.integers(0, 4), min_size=25, max_size=25))
def test_restart_at_any_interleaving_equals_never_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[Event], registry: str, cut: int,
    progress: list[int],
) -> None:
    """The writer goes on between the captures of the sections of every unit (`progress[k]` events before
    the k-th), so the sections of one snapshot hold different offsets; restarting from it and replaying the
    whole log equals never having stopped. Sections go in chunks of 3 keys, so most span several."""
    monkeypatch.setattr(online, "CAPTURE_CHUNK", 3)
    reg = REGISTRIES[registry]
    state = Path(tempfile.mkdtemp(dir=tmp_path))
    cut = cut % (len(events) + 1)
    engine = FeatureEngine.open(state, FeatureRegistry.from_json(reg.to_json()), partitions=5)
    engine.update_many(events[:cut])
    pending = iter(events[cut:])
    steps = iter(progress)

    def interleaved(sections: Callable[[_Unit], list[Any]]) -> Callable[[_Unit], Iterator[Any]]:
        def each(unit: _Unit) -> Iterator[Any]:
            for section in sections(unit):  # runs outside the unit's lock, between two captures
                engine.update_many([e for _, e in zip(range(next(steps, 0)), pending, strict=False)])
                yield section
        return each

    for cls in (_Partition, _Unit):
        monkeypatch.setattr(cls, "sections", interleaved(cls.sections))
    engine.snapshot()
    monkeypatch.undo()
    restarted = FeatureEngine.open(state, partitions=5)
    assert restarted.rejected_snapshots == 0
    restarted.update_many([e for e in events if e.offset > restarted.applied_offset])
    assert all_reads(restarted) == all_reads(replayed(reg, events))
    assert restarted.too_late == replayed(reg, events).too_late


ITEM_KINDS = FeatureRegistry.of([
    *(f for f in [*ALL_KINDS, *default_registry()] if f.entity not in ("user", "user_item")),
    Feature("item_last_user_cat", "item", "last", sliding(HOUR_MS, 30 * MINUTE_MS), "category"),
    Feature("item_recent_cats", "item", "distinct_topk", sliding(3 * HOUR_MS, HOUR_MS), "category", 2),
    Feature("item_spend_3h", "item", "sum", sliding(3 * HOUR_MS, 10 * MINUTE_MS), "properties.price"),
    Feature("item_age_3h", "item", "age", sliding(3 * HOUR_MS, HOUR_MS)),
    Feature("item_spend_all", "item", "sum", UNBOUNDED, "properties.price"),
    Feature("item_first_seen", "item", "age", UNBOUNDED),
])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=many_user_streams(), partitions=st.sampled_from([2, 3, 7]), order=st.randoms(use_true_random=False),
       later=st.lists(st.integers(0, 30 * DAY_MS), max_size=3))
def test_merging_per_partition_partials_in_any_order_equals_one_state(
    events: list[Event], partitions: int, order: random.Random, later: list[int],
) -> None:
    """Chronon's merge: each item or global feature computed per shopper partition (the events each
    partition's shoppers sent, lateness and watermark decided once for the stream), merged in a random
    order, reads like the one unit fed every event, at the watermark and later."""
    engine = FeatureEngine(ITEM_KINDS, partitions=partitions)
    fed: dict[str, list[Ev]] = {}
    apply = _Unit.apply

    def recording(unit: _Unit, evs: list[Ev]) -> None:
        fed.setdefault(unit.name, []).extend(evs)
        apply(unit, evs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Unit, "apply", recording)
        engine.update_many(events)
    for f in ITEM_KINDS:
        unit = engine._items[f.name]
        whole = unit.aggs[f.name]
        evs = fed.get(unit.name, [])
        partials = [make_agg(f, engine._names, Sessions(0)) for _ in range(partitions)]
        for p, partial in enumerate(partials):
            _feed([partial], [ev for ev in evs if partition_of(ev.raw.user_id, partitions) == p])
        order.shuffle(partials)
        merged = make_agg(f, engine._names, Sessions(0))
        for partial in partials:
            merged.merge(partial)
        keys = [None] if f.entity == "global" else [*ITEMS, "nobody"]
        for key in keys:
            k = engine._key(f.entity, key)[0]
            for t in [unit.wm, *(unit.wm + d for d in later)]:
                assert merged.read(k, t) == whole.read(k, t), (f.name, key, t)


def test_aggregations_that_cannot_merge_exactly_say_so() -> None:
    seq = Feature("item_seq", "item", "last_n", UNBOUNDED, k=3)
    with pytest.raises(NotImplementedError, match="item_seq: partial states of LastN do not merge"):
        make_agg(seq, Names(), Sessions(0)).merge(make_agg(seq, Names(), Sessions(0)))


@settings(max_examples=25, deadline=None)
@given(events=many_user_streams(), registry=st.sampled_from(sorted(REGISTRIES)), seed=st.integers(0, 99))
def test_reads_are_pure(events: list[Event], registry: str, seed: int) -> None:
    """Reading changes no state, and reading in any order gives the same answers."""
    engine = replayed(REGISTRIES[registry], events)
    before = captures(engine)
    first = all_reads(engine)
    keys = list(first)
    random.Random(seed).shuffle(keys)
    for name, u, i in keys:
        f = engine.registry[name]
        assert engine.read(name, key_of(f.entity, {"user_id": u, "item_id": i})) == first[(name, u, i)]
    assert captures(engine) == before


def _snapshotted(tmp_path: Path) -> tuple[Path, list[Event]]:
    events = [ev(n, USERS[n % 12], ITEMS[n % 5], T0 + n * 7 * MINUTE_MS, category=f"c{n % 3}") for n in range(300)]
    engine = FeatureEngine.open(tmp_path / "state")
    engine.update_many(events)
    engine.snapshot()
    return tmp_path / "state", events


def _reopened_equals_never_stopping(state: Path, events: list[Event], rejected: int) -> FeatureEngine:
    engine = FeatureEngine.open(state)
    assert engine.rejected_snapshots == rejected
    assert engine.applied_offset == (-1 if rejected else events[-1].offset)
    engine.update_many([e for e in events if e.offset > engine.applied_offset])
    assert all_reads(engine) == all_reads(replayed(default_registry(), events))
    return engine


def _unit_files(state: Path) -> list[Path]:
    gen = state / (state / CURRENT_FILE).read_text().strip()
    return sorted(gen.glob("*.state"))


def test_an_intact_snapshot_is_loaded(tmp_path: Path) -> None:
    state, events = _snapshotted(tmp_path)
    assert len(_unit_files(state)) == 1 + 16 + 4  # the clock, the partitions, the item and global features
    _reopened_equals_never_stopping(state, events, rejected=0)


@pytest.mark.parametrize("unit", ["stream", "partition-003", "feature-covisit"])
def test_a_truncated_unit_file_leads_to_a_rebuild(tmp_path: Path, unit: str) -> None:
    state, events = _snapshotted(tmp_path)
    path = next(p for p in _unit_files(state) if p.stem == unit)
    data = path.read_bytes()
    for size in (0, HEADER_SIZE - 1, len(data) - 1):
        path.write_bytes(data[:size])
        _reopened_equals_never_stopping(state, events, rejected=1)
        _snapshotted(tmp_path)
        path = next(p for p in _unit_files(state) if p.stem == unit)
        data = path.read_bytes()
    assert list(state.glob("rejected-snap-*")), "the damaged snapshot is set aside, not deleted"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unit=st.integers(0, 20), position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_leads_to_a_rebuild(tmp_path: Path, unit: int, position: float, bit: int) -> None:
    state, events = _snapshotted(Path(tempfile.mkdtemp(dir=tmp_path)))
    path = _unit_files(state)[unit]
    data = bytearray(path.read_bytes())
    data[int(position * len(data))] ^= 1 << bit
    path.write_bytes(bytes(data))
    _reopened_equals_never_stopping(state, events, rejected=1)


@pytest.mark.parametrize("keys", [0, 1, 3, 7, 9])
@pytest.mark.parametrize("feature", ["seq_all", "last_item"])  # keyed by shopper; by (shopper, item) pairs
def test_a_section_goes_in_chunks_of_at_most_capture_chunk_keys_and_restores_whole(
    monkeypatch: pytest.MonkeyPatch, keys: int, feature: str,
) -> None:
    monkeypatch.setattr(online, "CAPTURE_CHUNK", 3)
    f = ALL_KINDS[feature]
    agg = make_agg(f, Names(), Sessions(30 * MINUTE_MS))
    agg.state = {((n, n % 2) if agg.pair_keys else n): agg.VALUE(bytes([n])) if agg.VALUE is bytearray
                 else (n, n, n) for n in range(keys)}
    chunks = agg.capture()
    assert len(chunks) == max(1, -(-keys // 3))  # never an empty trailing chunk; one (empty) for no keys
    again = make_agg(f, Names(), Sessions(30 * MINUTE_MS))
    again.restore(chunks)
    assert again.state == agg.state


def _as_format_1(path: Path) -> bytearray:
    """The unit file rewritten as format 1 wrote it: the same body, its blake2b-128 in the header."""
    data = bytearray(path.read_bytes())
    fields = list(_HEAD.unpack_from(data))
    fields[1], fields[-1] = 1, hashlib.blake2b(data[HEADER_SIZE:], digest_size=16).digest()
    head = _HEAD.pack(*fields)
    data[:HEADER_SIZE] = head + _HEAD_CRC.pack(zlib.crc32(head))
    return data


def test_a_format_1_snapshot_with_its_blake2b_checksum_is_still_read(tmp_path: Path) -> None:
    """Format 2 changed only the body's checksum (crc32 for blake2b-128): data directories written by
    format 1 load as they are, and a bit flipped in one is still caught."""
    state, events = _snapshotted(tmp_path)
    for path in _unit_files(state):
        path.write_bytes(bytes(_as_format_1(path)))
    _reopened_equals_never_stopping(state, events, rejected=0)
    _snapshotted(tmp_path)
    path = next(p for p in _unit_files(state) if p.stem == "partition-003")
    data = _as_format_1(path)
    data[-5] ^= 4
    path.write_bytes(bytes(data))
    _reopened_equals_never_stopping(state, events, rejected=1)


def test_an_old_pickle_snapshot_is_set_aside_never_unpickled(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, ("raise SystemExit('unpickled')",))

    (state / OLD_PICKLE_FILE).write_bytes(pickle.dumps({"version": 4, "stream": Boom()}))
    events = [ev(n, USERS[n % 12], "i0", T0 + n) for n in range(20)]
    _reopened_equals_never_stopping(state, events, rejected=1)
    assert (state / f"rejected-{OLD_PICKLE_FILE}").exists() and not (state / OLD_PICKLE_FILE).exists()


def test_a_snapshot_with_other_partitions_leads_to_a_rebuild(tmp_path: Path) -> None:
    state, events = _snapshotted(tmp_path)
    engine = FeatureEngine.open(state, partitions=4)
    assert (engine.rejected_snapshots, engine.applied_offset) == (1, -1)


def test_the_shopper_cap_evicts_the_least_recently_active_and_counts(tmp_path: Path) -> None:
    engine = FeatureEngine(default_registry(), partitions=4, max_users=40)
    events = [ev(n, f"new{n}", f"i{n % 7}", T0 + n * 1000) for n in range(1000)]  # a stream of new shoppers
    engine.update_many(events)
    assert engine.tracked_users <= 40
    assert engine.evicted_users == 1000 - engine.tracked_users
    assert engine.read("session_length", "new999") == 1  # the most recent shopper is kept
    evicted = next(f"new{n}" for n in range(1000) if engine.read("session_seq", f"new{n}") == [])
    assert evicted == "new0"
    assert engine.read_all("user", evicted) == engine.read_all("user", "never-seen")  # empty, documented
    assert engine.read("user_item_count_28d", (evicted, "i0")) == engine.read("user_item_count_28d", ("x", "i0"))
    assert engine.read("item_count_28d", "i0")["view"] == len(range(0, 1000, 7))  # items keep every event
    engine.update_many([ev(1000, evicted, "i1", T0 + 1_000_000)])  # a returning shopper starts afresh
    assert engine.read("session_length", evicted) == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(events=many_user_streams(), cap=st.integers(1, 6), partitions=st.sampled_from([1, 2, 4]),
       sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6), cut=st.integers(0, 120))
def test_with_a_shopper_cap_the_state_is_the_stream_s_whatever_the_batches_and_a_restart(
    tmp_path_factory: pytest.TempPathFactory, events: list[Event], cap: int, partitions: int, sizes: list[int],
    cut: int,
) -> None:
    """The standby, a feature reader and a restart's replay apply the stream in other pages than the server:
    with a cap, each must evict the same shoppers at the same event."""
    whole = FeatureEngine(default_registry(), partitions=partitions, max_users=cap)
    whole.update_many(events)
    paged = FeatureEngine(default_registry(), partitions=partitions, max_users=cap)
    start = 0
    for n in range(len(events)):
        if start >= len(events):
            break
        paged.update_many(events[start : start + sizes[n % len(sizes)]])
        start += sizes[n % len(sizes)]
    assert all_reads(paged) == all_reads(whole)
    assert paged.evicted_users == whole.evicted_users
    state = tmp_path_factory.mktemp("state")
    first = FeatureEngine.open(state, partitions=partitions, max_users=cap)
    first.update_many(events[: cut % (len(events) + 1)])
    first.snapshot()
    again = FeatureEngine.open(state, partitions=partitions, max_users=cap)
    again.update_many(events)  # what the snapshot holds is skipped
    assert all_reads(again) == all_reads(whole)


def test_capturing_one_partition_blocks_neither_other_partitions_nor_item_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FeatureEngine.open(tmp_path / "state", partitions=4)
    engine.update_many([ev(n, USERS[n % 12], ITEMS[n % 5], T0 + n * 1000) for n in range(200)])
    held = engine._parts[0]
    mine = next(u for u in USERS if partition_of(u, 4) == 0)
    other = next(u for u in USERS if partition_of(u, 4) != 0)
    capturing, release = threading.Event(), threading.Event()
    capture_sessions = held.sessions.capture

    def slow_capture() -> list[bytes]:  # runs under the partition's lock
        assert engine.capturing, "readers on an event loop are told to read in a thread"
        capturing.set()
        assert release.wait(30)
        return capture_sessions()

    monkeypatch.setattr(held.sessions, "capture", slow_capture)
    snap = threading.Thread(target=engine.snapshot)
    snap.start()
    assert capturing.wait(30)
    done: list[object] = []

    def serve() -> None:
        done.append(engine.read_all("user", other))
        done.append(engine.read_many("item_count_28d", ITEMS))
        engine.update_many([ev(200, other, "i1", T0 + 200_000)])  # a write to another partition
        done.append(engine.read("session_length", other))

    reader = threading.Thread(target=serve)
    reader.start()
    reader.join(30)
    blocked_mine = threading.Thread(target=engine.read_all, args=("user", mine))
    blocked_mine.start()
    blocked_mine.join(0.2)
    assert not reader.is_alive() and len(done) == 3, "other partitions and item reads waited for the capture"
    assert blocked_mine.is_alive(), "the captured partition is consistent: its readers wait for the capture"
    release.set()
    snap.join(30)
    blocked_mine.join(30)
    assert not snap.is_alive() and not blocked_mine.is_alive()
    assert engine.snapshot_offset == 199 and not engine.capturing


def test_a_large_batch_holds_one_partition_at_a_time_and_never_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the writer applies a 10,000-event batch, each partition's lock is held only for its own share
    of one 512-event step: a read of another partition goes through while one partition is being written."""
    engine = FeatureEngine(default_registry(), partitions=4)
    held = engine._parts[0]
    mine = next(u for u in USERS if partition_of(u, 4) == 0)
    other = next(u for u in USERS if partition_of(u, 4) != 0)
    engine.update_many([ev(0, other, "i0", T0)])
    inside, release = threading.Event(), threading.Event()
    apply = _Partition.apply

    def slow_apply(self: _Partition, evs: list[Any]) -> None:  # runs under the partition's lock
        if self is held and not inside.is_set():
            inside.set()
            assert release.wait(30)
        apply(self, evs)

    monkeypatch.setattr(_Partition, "apply", slow_apply)
    batch = [ev(n, USERS[n % 12], ITEMS[n % 5], T0 + n) for n in range(1, 10_001)]
    writer = threading.Thread(target=engine.update_many, args=(batch,))
    writer.start()
    assert inside.wait(30)
    done: list[object] = []
    reader = threading.Thread(target=lambda: done.append(engine.read("session_length", other)))
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and len(done) == 1, "a read of another partition waited for the writer"
    release.set()
    writer.join(60)
    assert not writer.is_alive()
    assert engine.read("session_length", mine) == sum(1 for e in batch if e.user_id == mine)
    assert all_reads(engine) == all_reads(replayed(default_registry(), [ev(0, other, "i0", T0), *batch]))


def test_sweeping_unit_by_unit_equals_one_sweep() -> None:
    events = [ev(n, USERS[n % 12], ITEMS[n % 5], T0 + n * 29 * MINUTE_MS) for n in range(400)]
    whole, by_unit = replayed(default_registry(), events), replayed(default_registry(), events)
    whole.sweep()
    for _ in by_unit._units():
        by_unit.sweep_next()
    assert captures(by_unit) == captures(whole) != captures(replayed(default_registry(), events))
    assert all_reads(by_unit) == all_reads(replayed(default_registry(), events))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=many_user_streams(), partitions=st.sampled_from([2, 3, 7, 16]),
       registry=st.sampled_from(sorted(REGISTRIES)), data=st.data())
def test_a_node_holding_some_partitions_answers_as_one_holding_all(
        events: list[Event], partitions: int, registry: str, data: st.DataObject) -> None:
    """A cluster node holding a subset: its held shoppers' features and every item and global feature (fed
    by all partitions, co-visitation included) equal those of an engine holding every partition; a read
    of a shopper it does not hold raises PartitionNotHeld, naming the partition to forward to."""
    reg = REGISTRIES[registry]
    held = frozenset(data.draw(st.sets(st.integers(0, partitions - 1), min_size=1, max_size=partitions - 1)))
    whole, subset = replayed(reg, events, partitions), FeatureEngine(reg, partitions=partitions, held=held)
    subset.update_many(events)
    expected = all_reads(whole)
    for (name, user, item), value in expected.items():
        f = reg[name]
        key = key_of(f.entity, {"user_id": user, "item_id": item})
        if f.entity in ("user", "user_item") and partition_of(user, partitions) not in held:
            with pytest.raises(PartitionNotHeld) as raised:
                subset.read(name, key)
            assert raised.value.partitions == {partition_of(user, partitions)}
        else:
            assert subset.read(name, key) == value, (name, user, item)
    mine = [u for u in USERS if partition_of(u, partitions) in held]
    assert subset.read_all_many("user", mine) == whole.read_all_many("user", mine)


def test_a_snapshot_of_other_held_partitions_leads_to_a_rebuild(tmp_path: Path) -> None:
    """The partitions a node holds change only with a rebuild from the log: a snapshot taken holding other
    partitions (fewer features in them) is set aside, never restored with features missing."""
    state, events = _snapshotted(tmp_path)
    engine = FeatureEngine.open(state, held=frozenset({0, 1}))
    assert (engine.rejected_snapshots, engine.applied_offset) == (1, -1)
    engine.update_many(events)
    engine.snapshot()
    again = FeatureEngine.open(state, held=frozenset({0, 1}))
    assert (again.rejected_snapshots, again.applied_offset) == (0, events[-1].offset)
    assert FeatureEngine.open(state).rejected_snapshots == 1
