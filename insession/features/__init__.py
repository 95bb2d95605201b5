"""Declared features, computed incrementally online and point-in-time offline (DuckDB), with one set of rules.

- Windows: a sliding window of length L and tile T read at t holds events with
  ts >= (t // T - L/T + 1) * T, i.e. between L - T and L of event time (2 h / 1 min tiles: 119-120 min).
- "Now" is the watermark (max event time applied), never the wall clock.
- Sessions: the client's session_id, else a 30-minute inactivity gap per user in event time, decided in
  arrival order; the current session closes when now - the user's last event time > 30 min (without id).
- Lateness: an event older than watermark - 5 min (at its arrival) is dropped and counted (`too_late`);
  a later-but-allowed one lands in its own tile. The offline engine applies the same rule.

Details and the default feature set: docs/features.md. Entry points: `FeatureEngine` (online),
`offline.compute` (training data), `offline.sessions`
(accepted events with session numbers), `sql.parse_feature` (CREATE FEATURE ... AS SELECT ...).
"""

from insession.features.declare import (
    BEFORE_SESSION,
    SESSION,
    UNBOUNDED,
    Feature,
    FeatureRegistry,
    Window,
    default_features,
    default_registry,
    sliding,
)
from insession.features.engine import FeatureEngine
from insession.features.offline import compute
from insession.features.sql import FeatureSQLError, parse_feature, to_sql

__all__ = [
    "BEFORE_SESSION",
    "SESSION",
    "UNBOUNDED",
    "Feature",
    "FeatureEngine",
    "FeatureRegistry",
    "FeatureSQLError",
    "Window",
    "compute",
    "default_features",
    "default_registry",
    "parse_feature",
    "sliding",
    "to_sql",
]
