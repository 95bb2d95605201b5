"""The overview's figures, computed from the same registry `GET /metrics` renders.

A `Sample` is one read of every sample in a Prometheus registry. `overview(now, before)` turns two
samples taken `window_s` apart into what the console draws: rates over the window (like PromQL's
`rate()`), latency percentiles of the observations made in the window (like `histogram_quantile()` over
the bucket increases), and the current value of every gauge and counter. Nothing here keeps its own
counts: a figure on the console and the same series scraped from `/metrics` can only differ by when
they were read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from insession.query.service import ANALYTICS, SERVING

LabelKey = tuple[tuple[str, str], ...]
QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Sample:
    """Every sample of a registry at `at` (monotonic seconds): `values[name][labels] = value`."""

    at: float
    values: dict[str, dict[LabelKey, float]] = field(default_factory=dict)

    @classmethod
    def read(cls, registry: CollectorRegistry) -> Sample:
        values: dict[str, dict[LabelKey, float]] = {}
        for family in registry.collect():
            for s in family.samples:
                values.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
        return cls(time.monotonic(), values)

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (0 when absent: a labelled series not yet observed)."""
        return self.values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """`name` summed per value of one label (e.g. fallbacks per reason)."""
        out: dict[str, float] = {}
        for key, v in self.values.get(name, {}).items():
            value = dict(key).get(label)
            if value is not None:
                out[value] = out.get(value, 0.0) + v
        return out

    def buckets(self, histogram: str, **labels: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram's series, by increasing bound (+Inf last)."""
        out = []
        for key, v in self.values.get(histogram + "_bucket", {}).items():
            d = dict(key)
            le = d.pop("le", None)
            if le is not None and d == labels:
                out.append((float(le), v))
        return sorted(out)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: linear within the bucket holding rank q; None without observations.

    `buckets` are (upper bound, cumulative count) by increasing bound, the last one +Inf; a rank in the
    +Inf bucket answers the largest finite bound (what Prometheus does too)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _increase(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Bucket counts observed between two samples (a series absent before started at zero)."""
    old = dict(before)
    return [(le, max(v - old.get(le, 0.0), 0.0)) for le, v in now]


def percentiles_ms(now: Sample, before: Sample, histogram: str, **labels: str) -> dict[str, Any]:
    """p50/p95/p99 in ms (None without observations) and the count of what `histogram` observed in between."""
    window = _increase(now.buckets(histogram, **labels), before.buckets(histogram, **labels))
    out: dict[str, Any] = {"count": int(window[-1][1]) if window else 0}
    for q in QUANTILES:
        v = quantile(q, window)
        out[f"p{round(q * 100)}"] = None if v is None else round(v * 1000, 3)
    return out


def _rate(now: Sample, before: Sample, name: str, **labels: str) -> float:
    dt = now.at - before.at
    return max(now.get(name, **labels) - before.get(name, **labels), 0.0) / dt if dt > 0 else 0.0


def _grouped(sample: Sample, name: str, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for key, v in sorted(sample.values.get(name, {}).items()):
        d = dict(key)
        rows.append({**{lab: d.get(lab, "") for lab in labels}, "total": int(v)})
    return rows


def overview(now: Sample, before: Sample) -> dict[str, Any]:
    """The overview figures from two samples of the app's registry (`before` taken earlier)."""
    observed = {dict(k).get("lane", "") for k in now.values.get("insession_query_seconds_count", {})}
    lanes = [SERVING, ANALYTICS, *sorted(observed - {SERVING, ANALYTICS})]
    latency = {lane: percentiles_ms(now, before, "insession_query_seconds", lane=lane) for lane in lanes}
    latency["rank"] = percentiles_ms(now, before, "insession_rank_seconds")
    return {
        "window_s": round(now.at - before.at, 3),
        "ingest": {
            "events_per_s": round(_rate(now, before, "insession_ingest_records_total", table="events"), 1),
            "events_total": int(now.get("insession_ingest_records_total", table="events")),
            "errors": _grouped(now, "insession_ingest_errors_total", ("table", "status")),
            "unknown_items": int(now.get("insession_ingest_unknown_items_total")),
        },
        "freshness_ms": percentiles_ms(now, before, "insession_event_to_feature_seconds"),
        "latency_ms": latency,
        "query_errors": _grouped(now, "insession_query_errors_total", ("lane", "status")),
        "fallbacks": {
            "per_s": round(sum(
                _rate(now, before, "insession_rank_fallbacks_total", reason=r)
                for r in now.by("insession_rank_fallbacks_total", "reason")
            ), 3),
            "by_reason": {r: int(v) for r, v in sorted(now.by("insession_rank_fallbacks_total", "reason").items())},
            "rank_requests": int(now.get("insession_rank_seconds_count")),
        },
        "hygiene_drops": _grouped(now, "insession_feature_hygiene_drops_total", ("feature", "reason")),
        "analytics": {
            "queue_depth": int(now.get("insession_analytics_queue_depth")),
            "running": int(now.get("insession_analytics_running")),
            "rejected_429": int(now.get("insession_analytics_rejected_total")),
            "timeouts": int(now.get("insession_analytics_timeouts_total")),
        },
        "lag": {
            "log_offset": int(now.get("insession_log_offset")),
            "export_lag": int(now.get("insession_export_lag")),
            "snapshot_lag": int(now.get("insession_snapshot_lag")),
            "feature_lag": int(now.get("insession_feature_lag")),
            "late_events": int(now.get("insession_feature_late_events_total")),
            "watermark_ms": int(now.get("insession_feature_watermark_ms")),
        },
        "memory": {
            "resident_bytes": int(now.get("process_resident_memory_bytes")),
            "cpu_seconds": round(now.get("process_cpu_seconds_total"), 2),
        },
    }
