"""The model artefact format moved to `insession.model.artefact`; re-exported for callers of the old path."""

from insession.model.artefact import (
    CONFIG,
    CURVE,
    FEATURES,
    METRICS,
    VOCAB,
    WEIGHTS,
    Artefact,
    latest_version,
    load_artefact,
    new_version,
    save_artefact,
    versions,
)

__all__ = [
    "CONFIG",
    "CURVE",
    "FEATURES",
    "METRICS",
    "VOCAB",
    "WEIGHTS",
    "Artefact",
    "latest_version",
    "load_artefact",
    "new_version",
    "save_artefact",
    "versions",
]
