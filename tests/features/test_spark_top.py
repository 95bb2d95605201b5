"""The Spark engine's sliding top-k by count over a global list (a shortlist of values per row from running
counts, the engine's `_top`, used over dense traffic) equals the exact answer: every accepted event with
start <= ts <= t that had arrived by the row's offset, counted value by value in Python, the k largest,
ties by value.

Streams are dense on purpose: few values, so counts tie often, and windows of many blocks, so the shortlist
prunes; spine rows are read at random instants and offsets (unsettled rows, whose tail of at most the
lateness is read event by event, as well as settled ones)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
from features_helpers import T0, ev
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from spark_helpers import shared_spark_engine

from insession.features import FeatureRegistry
from insession.features.declare import HOUR_MS, MINUTE_MS, Feature, sliding
from insession.log.export import events_to_arrow
from insession.offline import open_engine
from insession.schema import Event

TOPS = FeatureRegistry.of(
    [
        # 60 tiles: blocks of 2 minutes, a window of 30 blocks; k = 2 of 4 items
        Feature("top_items", "global", "topk_count", sliding(HOUR_MS, MINUTE_MS), "item_id", 2),
        # a catalogue field with NULLs and an action filter; k = 1 (ties decide alone)
        Feature(
            "top_category",
            "global",
            "topk_count",
            sliding(30 * MINUTE_MS, MINUTE_MS),
            "category",
            1,
            actions=("view", "add_to_cart"),
        ),
    ]
)


@st.composite
def dense_streams(draw: st.DrawFn) -> list[Event]:
    """Up to 80 events a few minutes apart (sometimes late, sometimes too late), 4 items, 2 users."""
    n = draw(st.integers(1, 80))
    ts, out = T0, []
    for off in range(n):
        ts += draw(st.one_of(st.integers(0, 4 * MINUTE_MS), st.integers(-8 * MINUTE_MS, 0),
                             st.integers(0, 90 * MINUTE_MS)))  # fmt: skip
        out.append(
            ev(
                off,
                draw(st.sampled_from(["u0", "u1"])),
                draw(st.sampled_from(["i0", "i1", "i2", "i3"])),
                ts,
                draw(st.sampled_from(["view", "add_to_cart", "purchase"])),
                category=draw(st.sampled_from(["c0", "c1", "c2", None])),
            )  # fmt: skip
        )
    return out


def exact(f: Feature, accepted: pa.Table, user: str, t: int, o: int) -> list[dict]:
    """The k most counted values of the window [start(t), t] among the events accepted by offset o."""
    start = f.window.start(t)
    field = f.field or "item_id"
    counts = Counter(
        e[field]
        for e in accepted.to_pylist()
        if e["offset"] <= o and start <= e["ts"] <= t and e[field] is not None
        and (f.entity == "global" or e["user_id"] == user) and (f.actions is None or e["action"] in f.actions)
    )  # fmt: skip
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: f.k]
    return [{field: v, "count": n} for v, n in top]


@settings(
    max_examples=3,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(  # four items tied at one event each: the two smallest names win; one user's tie of categories
    events=[ev(i, "u0", f"i{3 - i}", T0 + i * MINUTE_MS, category=f"c{i % 2}") for i in range(4)],
    reads=[(3, 3 * MINUTE_MS), (2, 3 * MINUTE_MS), (3, 0)],
)
@given(
    events=dense_streams(),
    reads=st.lists(
        st.tuples(st.integers(-1, 80), st.integers(-10 * MINUTE_MS, 70 * MINUTE_MS)), min_size=1, max_size=12
    ),  # fmt: skip
)
def test_the_sliding_top_k_shortlist_equals_the_exact_counts(events: list[Event], reads: list[tuple[int, int]]) -> None:
    spark = shared_spark_engine()
    history = events_to_arrow(events)
    accepted = open_engine("duckdb").accepted(TOPS, history)
    rows = []  # read at (offset o, instant t): t near the ts of event o, earlier or later
    for i, (o, dt) in enumerate(reads):
        o = min(o, len(events) - 1)
        rows.append(("u0" if i % 2 else "u1", events[max(o, 0)].ts + dt, o))
    spine = pa.table(
        {
            "user_id": [u for u, _, _ in rows],
            "ts": pa.array([t for _, t, _ in rows], pa.int64()),
            "offset": pa.array([o for _, _, o in rows], pa.int64()),
        }
    )
    spark.top_above = 0  # the shortlist for every chunk, however small
    try:
        got = spark.compute(TOPS, history, spine)
    finally:
        del spark.top_above  # back to the class's threshold
    for f in TOPS:
        want = [exact(f, accepted, u, t, o) for u, t, o in rows]
        assert got[f.name].to_pylist() == want, (f.name, rows)
