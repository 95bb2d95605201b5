"""The product's Prometheus metrics: pushed observations and gauges pulled from the handle at scrape time."""

from __future__ import annotations

import time

from insession.schema import Event
from insession.serve.metrics import Metrics

from .conftest import World


def _value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def test_pulled_gauges_follow_the_handle(world: World) -> None:
    handle = world.handle()
    handle.lag = lambda: {"log_offset": world.log.last_offset(), "export_lag": 7, "snapshot_lag": 3}
    handle.applied_listeners = []
    m = Metrics()
    m.bind(handle)
    m.bind(handle)  # idempotent: one listener, one collector
    assert len(handle.applied_listeners) == 1
    assert _value(m, "insession_log_offset") == world.log.last_offset()
    assert _value(m, "insession_export_lag") == 7 and _value(m, "insession_snapshot_lag") == 3
    assert _value(m, "insession_feature_lag") == world.log.last_offset() - world.features.applied_offset
    assert _value(m, "insession_feature_watermark_ms") == world.features.watermark
    assert _value(m, "insession_analytics_queue_depth") == 0
    assert _value(m, "process_resident_memory_bytes") > 0
    assert _value(m, "insession_feature_tracked_users") == world.features.tracked_users > 0
    assert _value(m, "insession_feature_evicted_users_total") == 0
    assert _value(m, "insession_feature_snapshots_rejected_total") == 0
    handle.job_failures = {"export": 2, "snapshot": 1}
    assert _value(m, "insession_background_failures_total", {"job": "export"}) == 2


def test_pushed_observations(world: World) -> None:
    handle = world.handle()
    handle.applied_listeners = []
    m = Metrics()
    m.bind(handle)
    now = int(time.time() * 1000)
    for listener in handle.applied_listeners:
        listener([Event("u", "i", "view", now, ingest_ts=now - 250)])
    assert _value(m, "insession_event_to_feature_seconds_count") == 1
    assert 0.25 <= _value(m, "insession_event_to_feature_seconds_sum") < 5
    m.observe_ingest("events", 100, 0.002)
    m.ingest_failed("events", 422)
    m.observe_rank(0.004, fallback="timeout")
    assert _value(m, "insession_ingest_records_total", {"table": "events"}) == 100
    assert _value(m, "insession_ingest_errors_total", {"table": "events", "status": "422"}) == 1
    assert _value(m, "insession_rank_fallbacks_total", {"reason": "timeout"}) == 1
    world.query.execute("SELECT count(*) FROM items")
    assert _value(m, "insession_query_seconds_count", {"lane": "analytics"}) == 1
