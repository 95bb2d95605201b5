"""Declared features computed three ways: incrementally online, point-in-time offline (DuckDB), and in SQL.

See docs/features.md for the window/tile, session and lateness rules shared by both engines.
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

__all__ = [
    "BEFORE_SESSION",
    "SESSION",
    "UNBOUNDED",
    "Feature",
    "FeatureEngine",
    "FeatureRegistry",
    "Window",
    "default_features",
    "default_registry",
    "sliding",
]
