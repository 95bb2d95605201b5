"""The overview's figures against the registry `/metrics` renders, and the shopper streams' wake-ups."""

from __future__ import annotations

import asyncio
import math
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from insession.serve.console.figures import Sample, overview, quantile
from insession.serve.console.routes import ShopperHub
from insession.serve.metrics import Metrics


def test_quantile_interpolates_within_the_bucket_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.2, 10.0), (math.inf, 10.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.199)
    assert quantile(0.9, [(1.0, 5.0), (math.inf, 10.0)]) == 1.0  # in +Inf: the largest finite bound
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_percentiles_only_see_the_window_and_totals_match_the_metrics_text() -> None:
    m = Metrics()
    for _ in range(100):
        m.observe_rank(2.0, "timeout")  # slow, before the window
    before = Sample.read(m.registry)
    for _ in range(100):
        m.observe_rank(0.0008)
    m.observe_rank(0.0008, "no_model")
    m.query_done("serving", 0.0002, 200)
    m.query_done("analytics", 0.3, 429)
    m.observe_ingest("events", 50, 0.001)
    now = Sample.read(m.registry)
    o = overview(now, before)

    rank = o["latency_ms"]["rank"]
    assert rank["count"] == 101
    assert 0.5 < rank["p99"] <= 1.0  # in the (0.5, 1] ms bucket: the 2 s requests are outside the window
    assert o["latency_ms"]["serving"]["count"] == 1
    assert o["latency_ms"]["analytics"]["p50"] is None  # a refused query has no latency
    assert o["fallbacks"]["by_reason"] == {"no_model": 1, "timeout": 100}
    assert o["fallbacks"]["rank_requests"] == 201
    assert o["query_errors"] == [{"lane": "analytics", "status": "429", "total": 1}]
    assert o["ingest"]["events_total"] == 50
    assert o["ingest"]["events_per_s"] > 0

    text = {s.name: s for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
            if s.name == "insession_rank_fallbacks_total" and s.labels.get("reason") == "timeout"}
    assert text["insession_rank_fallbacks_total"].value == o["fallbacks"]["by_reason"]["timeout"]


def test_the_hub_wakes_only_the_streams_of_the_users_in_an_applied_group() -> None:
    async def scenario() -> tuple[bool, bool]:
        hub = ShopperHub(asyncio.get_running_loop())
        u1, u2 = hub.subscribe("u1"), hub.subscribe("u2")
        writer = threading.Thread(target=hub.applied, args=([SimpleNamespace(user_id="u1")],))
        writer.start()  # the log's writer thread calls it
        writer.join()
        await asyncio.wait_for(u1.wait(), 1.0)
        hub.unsubscribe("u1", u1)
        u1.clear()
        hub.applied([SimpleNamespace(user_id="u1")])
        await asyncio.sleep(0.05)
        return u1.is_set(), u2.is_set()

    # A loop of its own on a thread: Playwright's sync API may hold a running loop in this one.
    results: list[tuple[bool, bool]] = []
    runner = threading.Thread(target=lambda: results.append(asyncio.run(scenario())))
    runner.start()
    runner.join(10)
    assert results, "u1's stream was not woken within a second"
    woken_after_unsubscribe, other_woken = results[0]
    assert not woken_after_unsubscribe and not other_woken
