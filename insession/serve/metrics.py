"""Prometheus metrics for the whole product: one registry per app, served at `GET /metrics`.

Pushed by the code paths that see the event (call the `observe_*` methods): ingest counts, errors and
latency; event-to-feature freshness; per-lane query latency and errors (as a `QueryListener` of the
QueryService); feature hygiene drops; rank latency and fallbacks. Pulled from the embedded handle at
scrape time (`bind(handle)`): log offset, export (history) lag, snapshot lag, feature apply lag, the
feature engine's watermark and late events, and the analytics lane's queue depth, running queries,
rejections and timeouts. Process memory and CPU come from prometheus-client's process collector.

The serving model's age and the continuous updates' counters (`insession train --follow`, which writes them
to the model directory's `follow.json`) are read at scrape time too (`_model_metrics`).

On a replicated log, `cluster_status(handle)` is the one definition of this node's view of the cluster
(quorum, servers, leader, per-partition and consumer lag, stale), read by the `insession_log_*` gauges,
the `cluster` detail of /readyz and the console's cluster page alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from fastapi import Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from insession.log.base import ServerState, cluster_state
from insession.model.artefact import WEIGHTS

log = logging.getLogger(__name__)

# Seconds, from 100 µs (a served feature) to a minute (a heavy analytics scan).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LAG_HELP = {
    "log_offset": "Offset of the newest acknowledged event",
    "export_lag": "Events acknowledged but not yet exported to the Parquet history",
    "snapshot_lag": "Events applied since the last feature-state snapshot",
}


# Written beside the model versions by `insession train --follow` (`insession.train.follow.STATUS`; the server
# does not import the trainer, so the name is repeated here and a test holds the two equal).
FOLLOW_STATUS = "follow.json"
_FOLLOW_COUNTERS = {
    "updates": "Continuous updates that trained and validated a candidate model",
    "promotions": "Candidate models promoted (validated no worse than the serving one)",
    "refusals": "Candidate models refused (validated worse than the serving one)",
    "skips": "Continuous updates skipped (too few new add-to-carts)",
}

STALE_AFTER_S = 5.0  # a cluster check older than this (the watcher is stuck) cannot vouch for the state


class PartitionLag(msgspec.Struct, frozen=True):
    """One partition on this node: the stream's newest offset in it, and how far this node's state trails it."""

    partition: int
    last_offset: int  # -1: no event in this partition yet
    lag: int  # offsets between the partition's newest event and the newest one this node applied (0: current)
    held: bool = True  # this node serves the partition's shoppers ([cluster] copies; else it forwards them)


class ClusterStatus(msgspec.Struct, frozen=True):
    """This node's view of the replicated log (see `cluster_status`)."""

    stream: str
    quorum: bool  # a write can be acknowledged now
    stale: bool  # reads serve from state that cannot be confirmed current (quorum lost, or no recent check)
    reason: str  # why not quorum / why stale; "" when neither
    leader: str | None
    servers: list[ServerState]
    checked_s_ago: float | None  # None: no check has finished yet
    stream_last_offset: int  # the stream's newest offset, as far as this node knows
    applied_offset: int  # the newest offset this node's feature state applied
    consumer_lag: int  # stream_last_offset - applied_offset: events stored but not yet in this node's state
    partitions: list[PartitionLag]
    exporting: bool  # this node writes the Parquet history now (its own, or a shared one under the lease)


def cluster_status(handle: Any) -> ClusterStatus | None:
    """This node's view of its replicated log, from the log's last cluster check and the feature state;
    None for the embedded log (one machine: no quorum, nothing to trail).

    Decision: lag is counted in offsets against the state's applied offset. The state applies the stream in
    offset order, so every partition is current up to `applied_offset`; partition p's lag is how far its
    newest stored event lies beyond that (0: this node serves p's latest event), and the consumer lag is
    the same for the whole stream. `stale` is set when the quorum is lost or the last check is older than
    STALE_AFTER_S: reads keep answering from state, but writes acknowledged elsewhere cannot be ruled out.
    """
    log_ = getattr(handle, "log", None)
    state = cluster_state(log_) if log_ is not None else None
    if state is None:
        return None
    applied = handle.features.applied_offset
    last = max(state.last_offset, log_.last_offset())
    age = time.time() - state.checked_at_ms / 1000 if state.checked_at_ms else None
    stale = not state.quorum or age is None or age > STALE_AFTER_S
    reason = state.reason if not state.quorum else (
        f"no cluster check finished in the last {STALE_AFTER_S:.0f} s" if stale else "")
    return ClusterStatus(
        stream=state.stream, quorum=state.quorum, stale=stale, reason=reason, leader=state.leader,
        servers=state.servers, checked_s_ago=round(age, 3) if age is not None else None,
        stream_last_offset=last, applied_offset=applied, consumer_lag=max(last - applied, 0),
        partitions=[PartitionLag(p, off, max(off - applied, 0), p in handle.features.held)
                    for p, off in enumerate(state.partition_last_offsets)],
        exporting=log_.exporting(),
    )


class Metrics:
    """Every insession metric in its own registry (so several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.ingest_records = Counter(
            "insession_ingest_records", "Records stored, by table", ["table"], registry=r
        )
        self.ingest_errors = Counter(
            "insession_ingest_errors",
            "Ingest requests refused, by table and HTTP status",
            ["table", "status"],
            registry=r,
        )
        self.ingest_latency = Histogram(
            "insession_ingest_seconds",
            "Ingest request latency (validated to durable)",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.freshness = Histogram(
            "insession_event_to_feature_seconds",
            "From an event's ingest (validated) to its effect on online features; the "
            "oldest event of each applied group",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.query_latency = Histogram(
            "insession_query_seconds",
            "Query latency by lane (serving, analytics)",
            ["lane"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.query_errors = Counter(
            "insession_query_errors",
            "Queries refused or failed, by lane and HTTP status",
            ["lane", "status"],
            registry=r,
        )
        self.hygiene_drops = Counter(
            "insession_feature_hygiene_drops",
            "Feature values dropped or replaced before serving, by feature and reason",
            ["feature", "reason"],
            registry=r,
        )
        self.rank_latency = Histogram(
            "insession_rank_seconds", "Rank request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rank_fallbacks = Counter(
            "insession_rank_fallbacks",
            "Rank requests answered by a fallback, by reason",
            ["reason"],
            registry=r,
        )
        self._pull = _HandleCollector()
        r.register(self._pull)

    # -- wiring ---------------------------------------------------------------------------------

    def bind(self, handle: Any, forwarder: Any = None, reader: Any = None) -> None:
        """Pull gauges from the embedded handle (and the forwarder's counts, the feature reader's state) at
        scrape time and observe its queries (idempotent)."""
        if forwarder is not None:
            self._pull.forwarder = forwarder
        if reader is not None:
            self._pull.reader = reader
        if self._pull.handle is handle:
            return
        self._pull.handle = handle
        query = getattr(handle, "query", None)
        if query is not None and hasattr(query, "listen"):
            query.listen(self)
        applied = getattr(handle, "applied_listeners", None)  # called with each group features applied
        if applied is not None:
            applied.append(self.features_applied)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # -- pushed observations --------------------------------------------------------------------

    def observe_ingest(self, table: str, records: int, seconds: float) -> None:
        self.ingest_records.labels(table).inc(records)
        self.ingest_latency.labels(table).observe(seconds)

    def ingest_failed(self, table: str, status: int) -> None:
        self.ingest_errors.labels(table, str(status)).inc()

    def features_applied(self, events: Sequence[Any]) -> None:
        """Call after the feature engine applied a committed group (events carry `ingest_ts`, epoch ms)."""
        if events:
            self.freshness.observe(max(time.time() * 1000 - events[0].ingest_ts, 0.0) / 1000)

    def observe_rank(self, seconds: float, fallback: str | None = None) -> None:
        self.rank_latency.observe(seconds)
        if fallback:
            self.rank_fallbacks.labels(fallback).inc()

    # QueryListener (insession.query.service)
    def query_done(self, lane: str, seconds: float, status: int) -> None:
        if status < 400:
            self.query_latency.labels(lane).observe(seconds)
        else:
            self.query_errors.labels(lane, str(status)).inc()

    def hygiene_dropped(self, feature: str, reason: str, n: int) -> None:
        self.hygiene_drops.labels(feature, reason).inc(n)


class _HandleCollector(Collector):
    """Gauges read from the embedded handle when Prometheus scrapes."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.forwarder: Any = None  # insession.serve.forward.Forwarder, on a node holding some partitions
        self.reader: Any = None  # the feature reader's ChildProcess (insession.serve.reader), with [server] reader_port

    def collect(self) -> Iterator[Metric]:
        h = self.handle
        if h is None:
            return
        try:
            yield from self._collect(h)
        except Exception:  # a scrape must never fail because one source is closing or missing
            log.exception("metrics: reading the embedded handle failed")

    def _collect(self, h: Any) -> Iterator[Metric]:
        if hasattr(h, "lag"):
            for name, value in h.lag().items():
                g = GaugeMetricFamily(f"insession_{name}", _LAG_HELP.get(name, name.replace("_", " ")))
                g.add_metric([], value)
                yield g
        features, event_log = getattr(h, "features", None), getattr(h, "log", None)
        if features is not None:
            g = GaugeMetricFamily(
                "insession_feature_watermark_ms", "Newest event time applied to features (ms)"
            )
            g.add_metric([], features.watermark)
            yield g
            c = CounterMetricFamily("insession_feature_late_events", "Events dropped as later than allowed")
            c.add_metric([], features.too_late)
            yield c
            if event_log is not None:
                g = GaugeMetricFamily(
                    "insession_feature_lag", "Acknowledged events not yet applied to features"
                )
                g.add_metric([], event_log.last_offset() - features.applied_offset)
                yield g
            yield GaugeMetricFamily("insession_feature_tracked_users", "Shoppers held in online feature state",
                                    value=features.tracked_users)
            yield CounterMetricFamily("insession_feature_evicted_users",
                                      "Shoppers evicted by the [features] max_users cap", value=features.evicted_users)
            yield CounterMetricFamily(
                "insession_feature_snapshots_rejected",
                "Feature snapshots set aside at start (damaged, older format, other declarations)",
                value=features.rejected_snapshots)
        standby = getattr(h, "standby", None)
        if standby is not None:  # [features] snapshot_writer = "standby"
            yield GaugeMetricFamily("insession_snapshot_standby_running",
                                    "1 while the snapshot standby process runs (it writes the snapshots), else 0",
                                    value=int(standby.running()))
            yield CounterMetricFamily("insession_snapshot_standby_starts", "Snapshot standby processes started",
                                      value=standby.starts)
        check = getattr(h, "history_check", None)
        if check is not None:
            yield CounterMetricFamily("insession_history_parts_rebuilt",
                                      "History parts missing or damaged at start, rebuilt from the log",
                                      value=check.rebuilt)
            yield CounterMetricFamily("insession_history_files_quarantined",
                                      "History files set aside at start (not in the manifest, or damaged)",
                                      value=check.quarantined)
        failures = getattr(h, "job_failures", None)
        if failures is not None:
            c = CounterMetricFamily("insession_background_failures", "Failed runs of a background job", labels=["job"])
            for job, n in failures.items():
                c.add_metric([job], n)
            standby = getattr(h, "standby", None)  # a ChildProcess with snapshot_writer = "standby"
            c.add_metric(["standby"], standby.failures if standby is not None else 0)
            yield c
        if hasattr(h, "unknown_items"):
            yield CounterMetricFamily("insession_ingest_unknown_items", "Events stored for items not in the catalogue",
                                      value=h.unknown_items)
        yield from _cluster_metrics(h)
        if self.forwarder is not None:
            c = CounterMetricFamily("insession_forwarded_requests", "Reads of shoppers this node does not hold, "
                                    "forwarded, by target node and outcome", labels=["node", "outcome"])
            for (node, outcome), n in sorted(self.forwarder.forwarded.items()):
                c.add_metric([node, outcome], n)
            yield c
        if self.reader is not None:
            yield GaugeMetricFamily("insession_reader_running", "1 while the feature reader process runs, else 0",
                                    value=int(self.reader.running()))
            yield CounterMetricFamily("insession_reader_starts", "Feature reader processes started",
                                      value=self.reader.starts)
            yield CounterMetricFamily("insession_reader_failures", "Feature reader processes that exited failing",
                                      value=self.reader.failures)
        yield from _model_metrics(h)
        lane = getattr(getattr(h, "query", None), "analytics", None)
        if lane is not None:
            yield GaugeMetricFamily("insession_analytics_queue_depth", "Analytics queries admitted and waiting",
                                    value=lane.queue_depth)
            yield GaugeMetricFamily("insession_analytics_running", "Analytics queries running", value=lane.running)
            yield CounterMetricFamily("insession_analytics_rejected", "Analytics queries refused with 429 (queue full)",
                                      value=lane.rejected)
            yield CounterMetricFamily("insession_analytics_timeouts", "Analytics queries interrupted at their deadline",
                                      value=lane.timeouts)
            first = lane.serving_first
            if first is not None:
                yield CounterMetricFamily("insession_analytics_paused_seconds",
                                          "Seconds running analytics queries were held paused for serving "
                                          "(including a pause going on now)",
                                          value=first.paused_s())
                yield CounterMetricFamily("insession_analytics_pauses",
                                          "Pauses for serving of the running analytics queries",
                                          value=first.pauses)
                yield GaugeMetricFamily("insession_serving_lateness_seconds",
                                        "How late the serving process wakes, mean over the last 100 ms",
                                        value=first.lateness_s)


def _model_metrics(h: Any) -> Iterator[Metric]:
    """`insession_model_age_seconds`: seconds since the serving model's weights were written (nothing while
    no model serves); the counters of `insession train --follow` from the model directory's status file, when
    a follower has written one."""
    ranker = getattr(h, "ranker", None)
    info = getattr(ranker, "model", None)
    model_dir = getattr(ranker, "model_dir", None)
    status = Path(model_dir) / FOLLOW_STATUS if model_dir is not None else None
    written: float | None = None
    doc: dict[str, Any] | None = None
    with contextlib.suppress(OSError):  # a rolled-back version is moved away while it may still serve
        written = (Path(info.path) / WEIGHTS).stat().st_mtime if info is not None else None
    with contextlib.suppress(OSError, ValueError):  # no follower yet (or an unreadable file): no counters
        doc = json.loads(status.read_text()) if status is not None else None
    if written is not None:
        yield GaugeMetricFamily("insession_model_age_seconds", "Seconds since the serving model's weights were written",
                                value=max(time.time() - written, 0.0))
    if doc is not None:
        for key, text in _FOLLOW_COUNTERS.items():
            yield CounterMetricFamily(f"insession_model_{key}", text, value=doc.get(key, 0))


def _cluster_metrics(h: Any) -> Iterator[Metric]:
    """The `insession_log_*` gauges of a node on a replicated log (nothing for the embedded log)."""
    status = cluster_status(h)
    if status is None:
        return
    yield GaugeMetricFamily("insession_log_quorum", "1: a quorum of the log's servers can acknowledge writes now",
                            value=int(status.quorum))
    yield GaugeMetricFamily("insession_log_stale", "1: reads serve from state while the quorum is lost (or unchecked)",
                            value=int(status.stale))
    yield GaugeMetricFamily("insession_log_stream_last_offset", "Newest offset of the replicated stream",
                            value=status.stream_last_offset)
    yield GaugeMetricFamily("insession_log_consumer_lag", "Events in the stream not yet applied by this node",
                            value=status.consumer_lag)
    yield GaugeMetricFamily("insession_log_exporting", "1: this node writes the Parquet history now (a shared one: "
                            "it holds the export lease)", value=int(status.exporting))
    if status.checked_s_ago is not None:
        yield GaugeMetricFamily("insession_log_check_age_seconds", "Age of the last cluster check",
                                value=status.checked_s_ago)
    lag = GaugeMetricFamily("insession_log_partition_lag", "Offsets by which a partition's newest event is beyond "
                            "what this node applied", labels=["partition"])
    held = GaugeMetricFamily("insession_partition_held", "1: this node serves the partition's shoppers (else it "
                             "forwards their reads to a node that does)", labels=["partition"])
    for p in status.partitions:
        lag.add_metric([str(p.partition)], p.lag)
        held.add_metric([str(p.partition)], int(p.held))
    yield lag
    yield held
    up = GaugeMetricFamily("insession_log_server_up", "1: the server answers its monitoring endpoint",
                           labels=["server"])
    current = GaugeMetricFamily("insession_log_server_current", "1: the stream's leader, or a replica it counts "
                                "caught up", labels=["server"])
    leader = GaugeMetricFamily("insession_log_leader", "1 for the server leading the stream", labels=["server"])
    for s in status.servers:
        if s.up is not None:
            up.add_metric([s.name], int(s.up))
        current.add_metric([s.name], int(bool(s.current)))
        leader.add_metric([s.name], int(s.role == "leader"))
    yield from (up, current, leader)


def metrics_of(request: Request) -> Metrics:
    """The app's Metrics (created on first use), bound to the app's embedded handle."""
    state = request.app.state
    metrics: Metrics | None = getattr(state, "metrics", None)
    if metrics is None:
        metrics = state.metrics = Metrics()
    handle = getattr(state, "insession", None)
    if handle is not None:
        metrics.bind(handle)
    return metrics
