"""Parity: random streams replayed online, read at random instants, equal the offline engine there."""

from __future__ import annotations

from features_helpers import ALL_KINDS, assert_parity, online_reads, streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.features import FeatureRegistry, default_registry
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
