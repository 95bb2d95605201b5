"""Parity: random streams replayed online, read at random instants, equal the offline engine there."""

from __future__ import annotations

from features_helpers import assert_parity, online_reads, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import (
    BEFORE_SESSION,
    SESSION,
    UNBOUNDED,
    Feature,
    FeatureRegistry,
    default_registry,
    sliding,
)
from insession.features.declare import HOUR_MS, MINUTE_MS
from insession.schema import Event

# Every aggregation and window kind, with short windows so tiles expire inside a small stream.
ALL_KINDS = FeatureRegistry.of(
    [
        Feature("n_2h", "user", "count", sliding(2 * HOUR_MS, 10 * MINUTE_MS), actions=("view", "purchase")),
        Feature("n_all", "item", "count"),
        Feature("spend_1h", "user", "sum", sliding(HOUR_MS, MINUTE_MS), "properties.price"),
        Feature("last_cat", "user", "last", sliding(HOUR_MS, 30 * MINUTE_MS), "category"),
        Feature("last_item", "user_item", "last", UNBOUNDED, "item_id"),
        Feature("seq_1h", "user", "last_n", sliding(HOUR_MS, 15 * MINUTE_MS), k=3),
        Feature("seq_all", "user", "last_n", UNBOUNDED, k=4, actions=("view", "add_to_cart")),
        Feature("hist_views", "user", "last_n", BEFORE_SESSION, k=3, actions=("view",)),
        Feature("sess_carts", "user", "count", SESSION, actions=("add_to_cart",)),
        Feature("sess_cats", "user", "distinct_topk", SESSION, "category", 2),
        Feature("cats_3h", "user", "distinct_topk", sliding(3 * HOUR_MS, HOUR_MS), "category", 2),
        Feature("top_items", "global", "topk_count", sliding(HOUR_MS, 5 * MINUTE_MS), "item_id", 2),
        Feature("user_top_items", "user", "topk_count", UNBOUNDED, "item_id", 2),
        Feature("actions_1h", "item", "counts_by_action", sliding(HOUR_MS, 20 * MINUTE_MS)),
        Feature("age_3h", "user", "age", sliding(3 * HOUR_MS, HOUR_MS)),
        Feature("co", "item", "covisit", sliding(6 * HOUR_MS, HOUR_MS), k=3, span=2, gap_ms=20 * MINUTE_MS),
    ]
)


def _check(registry: FeatureRegistry, events: list[Event], cuts: list[int]) -> None:
    rows, _ = online_reads(registry, events, [c % (len(events) + 1) or 1 for c in cuts])
    assert_parity(registry, events, rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), cuts=st.lists(st.integers(1, 60), min_size=1, max_size=4))
def test_default_features_online_equals_offline(events: list[Event], cuts: list[int]) -> None:
    _check(default_registry(), events, cuts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), cuts=st.lists(st.integers(1, 60), min_size=1, max_size=4))
def test_every_aggregation_and_window_online_equals_offline(events: list[Event], cuts: list[int]) -> None:
    _check(ALL_KINDS, events, cuts)
