"""The Dual Sequence ReRanker model and its item vocabulary."""

from insession.model.reranker import (
    COUNTERS,
    SIGNALS,
    Batch,
    DualSequenceReranker,
    Encoded,
    Explanation,
    RerankerConfig,
    Sequence,
    calendar_fields,
    counter_value,
    signal_rows,
)
from insession.model.vocab import Vocab

__all__ = [
    "COUNTERS",
    "SIGNALS",
    "Batch",
    "DualSequenceReranker",
    "Encoded",
    "Explanation",
    "RerankerConfig",
    "Sequence",
    "Vocab",
    "calendar_fields",
    "counter_value",
    "signal_rows",
]
