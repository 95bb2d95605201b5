"""Prometheus metrics of the ranking service (registered in the default registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RANK_REQUESTS = Counter(
    "insession_rank_requests_total", "Rank requests answered, by how (model or fallback)", ["outcome"]
)
RANK_FALLBACKS = Counter(
    "insession_rank_fallbacks_total",
    "Rank requests answered by a fallback ranking, by fallback and reason",
    ["fallback", "reason"],
)
RANK_LATENCY = Histogram(
    "insession_rank_latency_seconds",
    "Rank request latency inside the service (features, model, hygiene)",
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0),
)
RANK_HYGIENE_DROPS = Counter(
    "insession_rank_hygiene_drops_total", "Items removed from ranked lists by a hygiene rule", ["reason"]
)
RANK_RELOADS = Counter(
    "insession_rank_model_reloads_total", "Model artefact loads, by result (ok, refused, error)", ["result"]
)
RANK_MODEL_LOADED = Gauge("insession_rank_model_loaded", "1 while a model artefact is serving, else 0")
