"""Parity of the Spark offline engine: online = DuckDB = Spark on random streams at random instants.

One registry holds every aggregation and window kind (ALL_KINDS), the declared property and catalogue
fields (DECLARED_FIELDS) and the default features, so each example is one Spark computation (a Spark job
costs ~1 s of fixed overhead: ~25-45 s per example on 2 busy cores; examples are few but long: up to 120
events, read at up to 6 cuts)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from features_helpers import ALL_KINDS, T0, assert_parity, ev, online_reads, streams
from hypothesis import example, given
from hypothesis import strategies as st
from spark_helpers import several_events, shared_spark_engine, spark_settings
from test_parity import DECLARED_FIELDS

from insession.features import FeatureRegistry, default_registry
from insession.features.declare import MINUTE_MS
from insession.log.export import events_to_arrow
from insession.offline import open_engine, value_type
from insession.offline.spark_engine import SparkEngine
from insession.schema import Event

EVERY_KIND = FeatureRegistry.of([*ALL_KINDS, *DECLARED_FIELDS, *default_registry()])


@pytest.fixture(scope="module")
def spark() -> SparkEngine:
    return shared_spark_engine()


def _spine(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "user_id": [r["user_id"] for r in rows],
            "item_id": [r["item_id"] for r in rows],
            "ts": pa.array([r["ts"] for r in rows], pa.int64()),
            "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        }
    )


def _assert_same(reg: FeatureRegistry, want: pa.Table, got: pa.Table) -> None:
    assert [got.schema.field(f.name).type for f in reg] == [value_type(f) for f in reg]
    for f in reg:
        for r, (a, b) in enumerate(zip(want[f.name].to_pylist(), got[f.name].to_pylist(), strict=True)):
            if f.agg == "sum":
                assert abs(a - b) <= 1e-9 * max(1.0, abs(a)), (f.name, want.slice(r, 1).to_pylist(), b)
            else:
                assert a == b, (f.name, {k: want[k][r].as_py() for k in ("user_id", "item_id", "ts")}, a, b)


# No shrinking: each step of it is a Spark computation (minutes); the failing example is printed as drawn.
@spark_settings(1)
@example(  # the shopper's latest event has no session id after one that had: the session closes by inactivity
    events=[ev(0, "u0", "i0", T0, category="c1", session="s2"), ev(1, "u0", "i1", T0 + MINUTE_MS, category="c0"),
            ev(2, "u1", "i2", T0 + 120 * MINUTE_MS)],
    cuts=[3, 3],
)
@given(events=several_events(streams(max_events=120)), cuts=st.lists(st.integers(1, 120), min_size=2, max_size=6))
def test_spark_equals_duckdb_equals_online_for_every_kind(events: list[Event], cuts: list[int]) -> None:
    spark = shared_spark_engine()
    rows, _ = online_reads(EVERY_KIND, events, [c % (len(events) + 1) or 1 for c in cuts])
    assert_parity(EVERY_KIND, events, rows)  # online = DuckDB
    history, spine = events_to_arrow(events), _spine(rows)
    want = open_engine("duckdb").compute(EVERY_KIND, history, spine)
    _assert_same(EVERY_KIND, want, spark.compute(EVERY_KIND, history, spine))  # DuckDB = Spark


def _late_stream() -> list[Event]:
    """A stream with a late event (kept), a too-late one (dropped), a re-sent copy and two sessions."""
    return [
        ev(0, "u0", "i0", T0),
        ev(1, "u0", "i1", T0 + MINUTE_MS, "add_to_cart"),
        ev(2, "u1", "i1", T0 + 20 * MINUTE_MS),
        ev(3, "u0", "i2", T0 + 17 * MINUTE_MS),  # 3 min late: kept
        ev(4, "u0", "i3", T0 + 2 * MINUTE_MS),  # 18 min late: dropped by both engines
        ev(5, "u0", "i1", T0 + MINUTE_MS, "add_to_cart"),  # re-sent copy (new id), late too: dropped
        ev(6, "u0", "i4", T0 + 90 * MINUTE_MS, "purchase"),  # a new session (30-minute gap)
    ]


def test_spark_accepts_and_numbers_sessions_as_duckdb(spark: SparkEngine) -> None:
    history = events_to_arrow(_late_stream())
    want = open_engine("duckdb").accepted(default_registry(), history)
    got = spark.accepted(default_registry(), history)
    assert got.schema == want.schema
    assert got.to_pylist() == want.to_pylist()
    assert got["offset"].to_pylist() == [0, 1, 2, 3, 6]
    assert got["sess"].to_pylist() == [0, 0, 0, 0, 1]


def test_a_spine_without_offsets_sees_what_arrived_by_its_instant(spark: SparkEngine) -> None:
    history = events_to_arrow(_late_stream())
    spine = pa.table(
        {
            "user_id": ["u0", "u0", "u1", "u9"],
            "item_id": ["i1", "i2", "i1", "i0"],
            "ts": pa.array([T0 - 1, T0 + 17 * MINUTE_MS, T0 + 25 * MINUTE_MS, T0 + 200 * MINUTE_MS], pa.int64()),
        }
    )
    want = open_engine("duckdb").compute(default_registry(), history, spine)  # the spine's rule: any features
    _assert_same(default_registry(), want, spark.compute(default_registry(), history, spine))


def test_an_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="unknown offline engine 'flink'; choose one of duckdb, spark"):
        open_engine("flink")


def test_a_spine_longer_than_a_chunk_comes_back_in_chunks_equal_to_duckdb(spark: SparkEngine) -> None:
    """Past `chunk_rows` the engine computes each feature once over the whole spine, keeps the values on
    local disk and hands them back a chunk at a time: each chunk holds its own rows, in order."""
    history = events_to_arrow(_late_stream())
    reg = FeatureRegistry.of([default_registry()[n] for n in ("item_count_28d", "session_seq", "trending_items_2h")])
    spine = pa.table(
        {
            "user_id": ["u0", "u1", "u0", "u0", "u1", "u0", "u9"],
            "item_id": ["i1", "i1", "i2", "i0", "i4", "i1", "i0"],
            "ts": pa.array([T0 + m * MINUTE_MS for m in (0, 1, 17, 19, 21, 90, 200)], pa.int64()),
            "offset": pa.array([0, 1, 3, 4, 2, 6, 6], pa.int64()),
        }
    )
    want = open_engine("duckdb").compute(reg, history, spine)
    chunks = list(spark.compute_chunks(reg, history, spine, chunk_rows=3))
    assert [c.num_rows for c in chunks] == [3, 3, 1]
    _assert_same(reg, want, pa.concat_tables(chunks))
