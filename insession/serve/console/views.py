"""What the console pages show, read from the embedded handle (plain dicts, JSON-ready).

Every view reads through the same public paths the API uses: the shopper's features come from the
query service's `read_features` (hygiene-cleaned, the serving lane), the ranking from the ranker with
`explain`, and the per-candidate counters and signals from `insession.rank.inputs` (the functions that
build the head's inputs for every request), read at the same moment as the ranking.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec

from insession.features.declare import pinned_hash
from insession.features.sql import to_sql
from insession.model import COUNTERS
from insession.model.artefact import CURVE, FEATURES, METRICS, versions
from insession.model.reranker import SIGNALS
from insession.rank import RankRequest
from insession.rank.inputs import Shopper, counters, covisit_counts, signals
from insession.serve.config import ClusterConfig
from insession.serve.console.figures import Sample, percentiles_ms
from insession.serve.metrics import cluster_status

# The console asks for a ranking with this budget: long enough that a loaded machine still shows the
# model's answer; a fallback (and its reason) still shows when the model cannot answer at all.
CONSOLE_BUDGET_MS = 1_000.0
TIMELINE_EVENTS = 50  # newest events of each side (session, history) sent to the page


def shopper_view(db: Any, user_id: str, k: int = 10) -> dict[str, Any]:
    """One shopper right now: session and history timelines, every user feature, the explained ranking.

    `inputs[item]` holds the counters (COUNTERS) and signals (SIGNALS) the model head reads for that item.
    """
    features = db.features
    shopper = Shopper.read(features, user_id)
    values, fallbacks = db.query.read_features("user", user_id)
    ranking = db.ranker.rank(RankRequest(user_id=user_id, k=k, explain=True, budget_ms=CONSOLE_BUDGET_MS))
    items = [r.item_id for r in ranking.items]
    inputs: dict[str, dict[str, float]] = {}
    if items:
        if shopper.at_ms < 0:  # nothing ingested yet: the ranker reads at the wall clock too
            shopper.at_ms = int(time.time() * 1000)
        covisit = covisit_counts(features, shopper.session, db.ranker.config.quotas.session)
        c = counters(features, user_id, items)
        s = signals(db.catalog, shopper, covisit, items)
        for j, item in enumerate(items):
            inputs[item] = {
                **{n: round(float(v), 4) for n, v in zip(COUNTERS, c[j], strict=True)},
                **{n: round(float(v), 4) for n, v in zip(SIGNALS, s[j], strict=True)},
            }
    return {
        "user_id": user_id,
        "watermark_ms": features.watermark,
        "session": shopper.session[-TIMELINE_EVENTS:],
        "session_events": len(shopper.session),
        "history": shopper.history[-TIMELINE_EVENTS:],
        "history_events": len(shopper.history),
        "features": values,
        "feature_fallbacks": fallbacks,
        "ranking": msgspec.to_builtins(ranking),
        "counter_names": list(COUNTERS),
        "signal_names": list(SIGNALS),
        "inputs": inputs,
    }


def features_view(db: Any, now: Sample) -> dict[str, Any]:
    """Every declaration (its CREATE FEATURE form, window, tiles), freshness, lateness and hygiene drops."""
    engine = db.features
    drops: dict[str, dict[str, int]] = {}
    for key, v in now.values.get("insession_feature_hygiene_drops_total", {}).items():
        d = dict(key)
        drops.setdefault(d.get("feature", ""), {})[d.get("reason", "")] = int(v)
    rows = []
    for f in engine.registry:
        w = f.window
        rows.append({
            "name": f.name,
            "entity": f.entity,
            "agg": f.agg,
            "window": {"kind": w.kind, "length_ms": w.length_ms, "tile_ms": w.tile_ms,
                       "tiles": w.tiles if w.kind == "sliding" else 0},
            "sql": to_sql(f),
            "hygiene_drops": drops.get(f.name, {}),
        })
    return {
        "features": rows,
        "feature_hash": pinned_hash(engine.registry),
        "watermark_ms": engine.watermark,
        "late_events": engine.too_late,
        "lateness_ms": engine.registry.lateness_ms,
        "session_gap_ms": engine.registry.session_gap_ms,
        # since the server started: the live window is on the overview
        "freshness_ms": percentiles_ms(now, Sample(now.at), "insession_event_to_feature_seconds"),
        # drops counted under another name than a declaration (the ranking's list hygiene: "rank")
        "hygiene_drops_other": {k: v for k, v in drops.items() if k not in engine.registry},
    }


def cluster_view(db: Any, cluster: ClusterConfig) -> dict[str, Any]:
    """The cluster page: `{replicated: false}` on the embedded log, else this node's `cluster_status` (the
    figures /metrics and /readyz show: servers, leader, quorum, stale, per-partition and consumer lag), with
    the nodes holding each partition (`holders`, empty when no `[cluster]` nodes are configured)."""
    status = cluster_status(db)
    if status is None:
        return {"replicated": False}
    view = {"replicated": True, "node": cluster.node, **msgspec.to_builtins(status)}
    for p in view["partitions"]:
        p["holders"] = cluster.holders(p["partition"])
    return view


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_versions(model_dir: Path | None) -> list[Path]:
    """Artefact version directories under `model_dir`, newest first (`model_dir` itself when it is one)."""
    if model_dir is None:
        return []
    try:
        return versions(model_dir)
    except FileNotFoundError:
        return []


def models_view(db: Any) -> dict[str, Any]:
    """Artefact versions (metrics, feature hash, curve), the serving one, and whether each fits the features."""
    ranker = db.ranker
    active = ranker.model
    running_hash = pinned_hash(db.features.registry)
    versions = []
    for path in model_versions(ranker.model_dir):
        feature_hash = _read_json(path / FEATURES).get("feature_hash")
        versions.append({
            "version": path.name,
            "created_ms": int(path.stat().st_mtime * 1000),
            "metrics": _read_json(path / METRICS),
            "feature_hash": feature_hash,
            "fits_features": feature_hash == running_hash,
            "has_curve": (path / CURVE).exists(),
            "active": active is not None and Path(active.path).resolve() == path.resolve(),
        })
    return {
        "model_dir": str(ranker.model_dir) if ranker.model_dir is not None else None,
        "active": msgspec.to_builtins(active) if active is not None else None,
        "running_feature_hash": running_hash,
        "last_reload_error": ranker.last_reload_error,
        "skipped": active.skipped if active is not None else {},
        "versions": versions,
    }
