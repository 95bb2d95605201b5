"""The online engine: each aggregation and window, the session rule, lateness, restart, concurrency."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
from features_helpers import T0, ev, key_of, online_reads, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import Feature, FeatureEngine, FeatureRegistry, default_registry, sliding
from insession.features import engine as engine_module
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS
from insession.features.online import Agg, TileAgg, _tile_structs, stable_id
from insession.schema import ACTIONS, Event, partition_of

GAP = 30 * MINUTE_MS
T = T0 - T0 % HOUR_MS  # an hour boundary, so tile edges are easy to state


def engine_with(events: list[Event], registry: FeatureRegistry | None = None) -> FeatureEngine:
    engine = FeatureEngine(registry or default_registry())
    engine.update_many(events)
    return engine


def items(seq: list[dict[str, object]]) -> list[object]:
    return [e["item_id"] for e in seq]


def test_inactivity_gap_cuts_sessions() -> None:
    e = engine_with([ev(0, "u", "a", T), ev(1, "u", "b", T + GAP)])  # exactly the gap: same session
    assert e.read("session_length", "u") == 2
    assert e.read("session_age", "u") == GAP
    e.update_many([ev(2, "u", "c", T + 2 * GAP + 1)])  # more than the gap: a new session
    assert items(e.read("session_seq", "u")) == ["c"]
    assert items(e.read("history_seq", "u")) == ["a", "b"]
    assert e.read("session_age", "u") == 0


def test_client_session_id_overrides_the_gap() -> None:
    e = engine_with([ev(0, "u", "a", T, session="s1"), ev(1, "u", "b", T + 5 * HOUR_MS, session="s1")])
    assert items(e.read("session_seq", "u")) == ["a", "b"]
    e.update_many([ev(2, "u", "c", T + 5 * HOUR_MS + 1, session="s2")])
    assert items(e.read("session_seq", "u")) == ["c"]
    e.update_many([ev(3, "u", "d", T + 5 * HOUR_MS + 2)])  # no id after an id: a new session
    assert items(e.read("session_seq", "u")) == ["d"]
    assert items(e.read("history_seq", "u")) == ["a", "b", "c"]


def test_session_closes_when_the_watermark_passes_the_gap() -> None:
    e = engine_with([ev(0, "u", "a", T), ev(1, "v", "x", T, session="sv"), ev(2, "w", "y", T + GAP)])
    assert e.read("session_length", "u") == 1
    e.update_many([ev(3, "w", "y", T + GAP + 1)])  # other users move event time on
    assert e.read("session_seq", "u") == []
    assert e.read("session_length", "u") == 0
    assert e.read("session_age", "u") is None
    assert items(e.read("history_seq", "u")) == ["a"]
    assert e.read("session_length", "v") == 1  # a client session stays open


def test_sequences_are_capped_and_history_keeps_the_latest() -> None:
    e = engine_with([ev(n, "u", f"i{n}", T + n * 1000) for n in range(130)])
    assert e.read("session_length", "u") == 130
    seq = e.read("session_seq", "u")
    assert items(seq) == [f"i{n}" for n in range(80, 130)]
    assert [s["ts"] for s in seq] == sorted(s["ts"] for s in seq)
    assert e.read("history_seq", "u") == []
    e.update_many([ev(130, "u", "next", T + 130_000 + GAP + 1)])
    assert items(e.read("history_seq", "u")) == [f"i{n}" for n in range(30, 130)]


def test_lateness_rule() -> None:
    wm = T + 10 * MINUTE_MS
    e = engine_with([ev(0, "u", "a", wm), ev(1, "u", "b", wm - 5 * MINUTE_MS), ev(2, "u", "c", wm - 5 * MINUTE_MS - 1)])
    assert e.too_late == 1
    assert e.watermark == wm
    assert e.applied_offset == 2
    assert items(e.read("session_seq", "u")) == ["b", "a"]  # in event-time order
    assert e.read("item_count_28d", "c")["view"] == 0
    assert e.read("item_count_28d", "b")["view"] == 1


def test_late_event_lands_in_its_own_tile() -> None:
    e = engine_with([ev(0, "u", "a", T + 4 * MINUTE_MS), ev(1, "v", "a", T + 30_000)])  # 3.5 min late
    assert e.read("item_trending_2h", "a") == 2
    # 2 h later the tile of T has left the window (tiles T+1min .. T+2h), the tile of T+4min has not
    e.update_many([ev(2, "w", "z", T + 2 * HOUR_MS + 30_000)])
    assert e.read("item_trending_2h", "a") == 1
    e.update_many([ev(3, "w", "z", T + 2 * HOUR_MS + 4 * MINUTE_MS)])
    assert e.read("item_trending_2h", "a") == 0


@pytest.mark.parametrize("minutes_later", [119, 120])
def test_sliding_window_edge_moves_one_tile_at_a_time(minutes_later: int) -> None:
    e = engine_with([ev(0, "u", "a", T + 59_999), ev(1, "u", "z", T + minutes_later * MINUTE_MS + 59_999)])
    # the window at t covers the tiles t//tile - 119 .. t//tile: the event's tile T is in it up to T+119min
    assert e.read("item_trending_2h", "a") == (1 if minutes_later < 120 else 0)


def test_top_categories_distinct_by_recency_views_only() -> None:
    evs = [ev(n, "u", f"i{n}", T + n * 1000, category=f"c{n}") for n in range(7)]
    evs += [
        ev(7, "u", "i1", T + 7000, category="c1"),
        ev(8, "u", "i9", T + 8000, "add_to_cart", category="c9"),
        ev(9, "u", "i8", T + 9000, category=None),
    ]
    e = engine_with(evs)
    assert e.read("top_categories_15d", "u") == ["c1", "c6", "c5", "c4", "c3"]
    e.update_many([ev(10, "v", "x", T + 15 * DAY_MS + 6000)])  # the first tiles leave the 15-day window
    assert e.read("top_categories_15d", "u") == []


def test_counters_by_action() -> None:
    evs = [ev(n, "u", "a", T + n, action) for n, action in enumerate(["view", "view", "add_to_cart", "purchase"])]
    evs.append(ev(4, "v", "a", T + 4))
    e = engine_with(evs)
    assert e.read("user_item_count_28d", ("u", "a")) == {
        **dict.fromkeys(ACTIONS, 0),
        "view": 2,
        "add_to_cart": 1,
        "purchase": 1,
    }
    assert e.read("item_count_28d", "a")["view"] == 3
    assert e.read("user_item_count_28d", ("v", "b")) == dict.fromkeys(ACTIONS, 0)


def test_trending_orders_by_count_then_name() -> None:
    evs = [ev(n, "u", item, T + n) for n, item in enumerate(["b", "a", "c", "c", "b", "a", "d"])]
    e = engine_with(evs)
    assert e.read("trending_items_2h", None)[:4] == [
        {"item_id": "a", "count": 2},
        {"item_id": "b", "count": 2},
        {"item_id": "c", "count": 2},
        {"item_id": "d", "count": 1},
    ]


def test_covisit_pairs_within_session_span_and_gap() -> None:
    evs = [
        ev(0, "u", "a", T),
        ev(1, "u", "b", T + 1000),
        ev(2, "u", "a", T + 2000),
        ev(3, "u", "c", T + 3000),
        ev(4, "v", "c", T + 4000, session="sv"),
        ev(5, "v", "d", T + 4000 + 31 * MINUTE_MS, session="sv"),
        ev(6, "w", "a", T + 5000),
        ev(7, "w", "e", T + 5000 + GAP + 1),
    ]  # e: a new session of w
    e = engine_with(evs)
    assert e.read("covisit", "a") == [{"item_id": "b", "count": 2}, {"item_id": "c", "count": 2}]
    assert e.read("covisit", "b") == [{"item_id": "a", "count": 2}, {"item_id": "c", "count": 1}]
    assert e.read("covisit", "d") == []  # same session, but farther apart than the 30-minute gap
    assert e.read("covisit", "e") == []


def test_unknown_keys_read_empty_and_keys_are_checked() -> None:
    e = engine_with([ev(0, "u", "a", T)])
    assert e.read_all("user", "nobody") == {
        "top_categories_15d": [],
        "history_seq": [],
        "session_seq": [],
        "session_queries": [],
        "session_length": 0,
        "session_age": None,
    }
    assert set(e.read_all("item", "a")) == {"item_count_28d", "item_trending_2h", "covisit"}
    with pytest.raises(ValueError):
        e.read("user_item_count_28d", "u")
    with pytest.raises(KeyError):
        e.read("no_such_feature", "u")


def test_replayed_offsets_are_applied_once() -> None:
    evs = [ev(n, "u", "a", T + n) for n in range(5)]
    e = engine_with(evs)
    e.update_many(evs)  # a replay overlapping what was applied
    assert e.read("item_count_28d", "a")["view"] == 5


def _all_reads(engine: FeatureEngine, registry: FeatureRegistry) -> dict[tuple[str, str, str], object]:
    out = {}
    for u in ("u0", "u1", "u2"):
        for i in ("i0", "i1", "i2", "i3", "i4"):
            row = {"user_id": u, "item_id": i}
            for f in registry:
                out[(f.name, u, i)] = engine.read(f.name, key_of(f.entity, row))
    return out


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(events=streams(), cut=st.integers(0, 60))
def test_restart_from_snapshot_plus_log_equals_never_stopping(tmp_path: Path, events: list[Event], cut: int) -> None:
    state = Path(tempfile.mkdtemp(dir=tmp_path))  # one directory per example
    reference = engine_with(events)
    first = FeatureEngine.open(state)
    first.update_many(events[:cut])
    first.sweep()  # dropping expired state must not change any answer
    first.snapshot()
    assert first.snapshot_offset == first.applied_offset
    restarted = FeatureEngine.open(state)
    assert restarted.applied_offset == min(cut, len(events)) - 1
    restarted.update_many([e for e in events if e.offset > restarted.applied_offset])
    assert restarted.watermark == reference.watermark and restarted.too_late == reference.too_late
    assert _all_reads(restarted, reference.registry) == _all_reads(reference, reference.registry)


def test_snapshot_of_other_declarations_is_ignored(tmp_path: Path) -> None:
    e = FeatureEngine.open(tmp_path)
    e.update_many([ev(0, "u", "a", T)])
    e.snapshot()
    assert FeatureEngine.open(tmp_path).applied_offset == 0
    other = FeatureRegistry.of(default_registry(), lateness_ms=MINUTE_MS)
    assert FeatureEngine.open(tmp_path, other).applied_offset == -1


@settings(max_examples=10, deadline=None)
@given(events=streams())
def test_added_feature_is_backfilled_from_the_log(events: list[Event]) -> None:
    extra = Feature("carts_1d", "user", "count", sliding(DAY_MS, HOUR_MS), actions=("add_to_cart",))
    engine = engine_with(events)
    engine.add_feature(extra, iter(events))
    fresh = engine_with(events, FeatureRegistry.of([*default_registry(), extra]))
    assert engine.registry.hash() == fresh.registry.hash()
    assert _all_reads(engine, fresh.registry) == _all_reads(fresh, fresh.registry)


def test_reads_are_safe_while_the_writer_applies() -> None:
    evs = [ev(n, f"u{n % 7}", f"i{n % 11}", T + n * 5000, ACTIONS[n % 4], category=f"c{n % 5}") for n in range(6000)]
    engine = FeatureEngine(default_registry())
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                for u in range(7):
                    engine.read_all("user", f"u{u}")
                    engine.read("covisit", f"i{u}")
                    engine.read("trending_items_2h", None)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(0, len(evs), 300):
        engine.update_many(evs[start : start + 300])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert _all_reads(engine, engine.registry) == _all_reads(engine_with(evs), engine.registry)


def _agg(engine: FeatureEngine, feature: str, user: str | None = None) -> Agg:
    """The aggregation that holds `feature` (for a shopper's feature, in the shopper's partition)."""
    if user is None:
        return engine._items[feature].aggs[feature]
    return engine._parts[partition_of(user, engine.partitions)].aggs[feature]


def test_memory_per_key_is_bounded() -> None:
    day_events = [ev(n, "u", "a", T + n * 30 * MINUTE_MS, ACTIONS[n % 4]) for n in range(60 * 48)]  # 60 days
    e = engine_with(day_events)
    u, item = stable_id("u"), stable_id("a")
    assert len(_agg(e, "history_seq", "u").state[u][1]) <= 100 * 25  # 25-byte records
    assert len(_agg(e, "item_count_28d").state[item]) <= (28 * 24 + 1) * len(ACTIONS) * 9  # 9-byte records
    assert len(_agg(e, "item_trending_2h").state[item]) <= (2 * 60 + 1) * 9
    assert len(_agg(e, "user_item_count_28d", "u").state[u]) <= (28 * 24 + 1) * len(ACTIONS) * 16
    e.update_many([ev(len(day_events), "v", "b", T + 100 * DAY_MS)])
    e.sweep()  # what snapshot() runs first: keys with nothing left in their window go
    assert item not in _agg(e, "item_count_28d").state and item not in _agg(e, "item_trending_2h").state


def test_online_reads_helper_covers_all_features() -> None:
    rows, engine = online_reads(default_registry(), [ev(0, "u0", "i0", T)], [1])
    assert set(rows[0]["online"]) == set(default_registry().features)
    assert engine.watermark == T


@settings(max_examples=25, deadline=None)
@given(events=streams())
def test_read_many_equals_reading_key_by_key(events: list[Event]) -> None:
    registry = default_registry()
    engine, reference = engine_with(events), engine_with(events)
    rows = [{"user_id": u, "item_id": i} for u in ("u0", "u1", "u9") for i in ("i0", "i3", "i4", "i9")]
    for f in registry:
        keys = [key_of(f.entity, row) for row in rows]
        assert engine.read_many(f.name, keys) == [reference.read(f.name, k) for k in keys], f.name


@settings(max_examples=25, deadline=None)
@given(events=streams())
def test_tile_records_stay_in_tile_order(events: list[Event]) -> None:
    """Expiry pops from the front and running totals subtract what it pops: late events must not break
    the order of a key's records."""
    engine = engine_with(events)
    for agg in [a for unit in engine._units() for a in unit.aggs.values()]:
        if isinstance(agg, TileAgg):
            for buf in agg.state.values():
                tiles = [code >> 3 for _, code, _ in _tile_structs(*agg.layout)[0].iter_unpack(buf)]
                assert tiles == sorted(tiles), agg.f.name


def test_late_event_in_a_new_tile_expires_on_time() -> None:
    m = MINUTE_MS
    e = engine_with([ev(0, "u", "a", T), ev(1, "u", "a", T + 3 * m), ev(2, "u", "a", T + m)])  # the last is late
    assert e.read("item_trending_2h", "a") == 3
    e.update_many([ev(3, "v", "b", T + 121 * m)])  # the 2-hour window now starts at T + 2 min
    assert e.read("item_trending_2h", "a") == 1
    assert e.read_many("item_trending_2h", ["a", "b", "never-seen"]) == [1, 1, 0]


def test_a_failed_snapshot_raises_and_keeps_the_last_one(tmp_path: Path) -> None:
    e = FeatureEngine.open(tmp_path / "state")
    e.update_many([ev(0, "u", "a", T)])
    e.snapshot()
    e.update_many([ev(1, "u", "b", T + 1)])
    e.state_dir = tmp_path / "gone"  # the snapshot file cannot be created there
    with pytest.raises(OSError):
        e.snapshot()
    assert e.snapshot_offset == 0
    assert FeatureEngine.open(tmp_path / "state").applied_offset == 0


def test_chunked_sweep_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    evs = [ev(n, f"u{n % 13}", f"i{n % 17}", T + n * 7 * MINUTE_MS, ACTIONS[n % 4]) for n in range(3000)]
    chunked, whole = engine_with(evs), engine_with(evs)
    whole.sweep()  # the default chunk holds every key of this engine: one pass
    monkeypatch.setattr(engine_module, "SWEEP_CHUNK", 3)
    chunked.sweep()
    for mine, theirs in zip(chunked._units(), whole._units(), strict=True):
        for name, agg in theirs.aggs.items():
            assert mine.aggs[name].swept_keys() == agg.swept_keys(), name
    assert _all_reads(chunked, chunked.registry) == _all_reads(engine_with(evs), chunked.registry)


def test_session_queries_are_the_session_searches_latest_first() -> None:
    """The model's query tokens (issue 17): the current session's distinct search queries, latest first;
    other actions' properties are not queries, and a new session starts empty."""

    def search(off: int, ts: int, query: str, action: str = "search") -> Event:
        e = ev(off, "u", "a", ts, action)
        e.properties = {"query": query}
        return e

    e = engine_with([search(0, T, "red shoes"), search(1, T + 1000, "socks"), search(2, T + 2000, "red shoes"),
                     search(3, T + 3000, "not a search", action="view")])
    assert e.read("session_queries", "u") == ["red shoes", "socks"]
    e.update_many([ev(4, "u", "b", T + 3 * 3_600_000)])  # hours later: a new session
    assert e.read("session_queries", "u") == []
