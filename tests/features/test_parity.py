"""Parity: random streams replayed online, read at random instants, equal the offline engine there."""

from __future__ import annotations

from features_helpers import ALL_KINDS, assert_parity, online_reads, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import FeatureRegistry, default_registry
from insession.features.declare import HOUR_MS, MINUTE_MS, SESSION, UNBOUNDED, Feature, sliding
from insession.schema import Event


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


# Declarations over more than the built-in columns: event properties (text values only; numbers for sum)
# and catalogue attributes joined at ingest (brand, price, price_band).
DECLARED_FIELDS = FeatureRegistry.of(
    [
        Feature("colors_1h", "user", "distinct_topk", sliding(HOUR_MS, 10 * MINUTE_MS), "properties.color", 2),
        Feature("top_colors", "item", "topk_count", UNBOUNDED, "properties.color", 2),
        Feature("last_color", "user", "last", SESSION, "properties.color"),
        Feature("brands_3h", "user", "topk_count", sliding(3 * HOUR_MS, HOUR_MS), "brand", 2, actions=("view",)),
        Feature("bands", "user", "distinct_topk", UNBOUNDED, "price_band", 3),
        Feature("item_brand", "user_item", "last", UNBOUNDED, "brand"),
        Feature("spend_2h", "user", "sum", sliding(2 * HOUR_MS, 30 * MINUTE_MS), "price", actions=("purchase",)),
        Feature("value_all", "global", "sum", UNBOUNDED, "price"),
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), cuts=st.lists(st.integers(1, 60), min_size=1, max_size=4))
def test_declared_property_and_catalogue_fields_online_equals_offline(events: list[Event], cuts: list[int]) -> None:
    _check(DECLARED_FIELDS, events, cuts)
