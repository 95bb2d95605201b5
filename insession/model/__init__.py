"""The Dual Sequence ReRanker model and its item vocabulary."""

from insession.model.reranker import (
    COUNTERS,
    Batch,
    DualSequenceReranker,
    Encoded,
    Explanation,
    RerankerConfig,
    Sequence,
    calendar_fields,
    counter_row,
)
from insession.model.vocab import Vocab

__all__ = [
    "COUNTERS", "Batch", "DualSequenceReranker", "Encoded", "Explanation", "RerankerConfig", "Sequence",
    "Vocab", "calendar_fields", "counter_row",
]
