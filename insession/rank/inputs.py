"""Online model inputs: a shopper's features read once per request, turned into the reranker's tensors.

The sequences and counters follow the training examples exactly (insession.train.examples): events
oldest -> newest with padding at the end, the most recent `max_history` / `max_session` kept, action
index 1 + ACTIONS.index(action), counters in COUNTERS order through the model's own `counter_value`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from insession.features import FeatureEngine
from insession.log.catalog import Catalog
from insession.model import COUNTERS, Vocab
from insession.model import Sequence as SeqTensors
from insession.model.reranker import QUERIES, SIGNALS, counter_value, signal_rows
from insession.model.vocab import QUERY_GRAMS
from insession.rank.hygiene import purchased_in
from insession.schema import ACTIONS

ACTION_INDEX = {a: i + 1 for i, a in enumerate(ACTIONS)}  # 0 is padding


@dataclass
class Shopper:
    """One read of the shopper's user features (one lock, one watermark)."""

    user_id: str
    history: list[dict[str, Any]]  # history_seq: events before the session, oldest first
    session: list[dict[str, Any]]  # session_seq: the current session's events, oldest first
    top_categories: list[str]  # top_categories_15d, most recent first
    at_ms: int  # the instant the features were read at (the engine's watermark)
    queries: list[str] = field(default_factory=list)  # session_queries: the session's searches, latest first

    @property
    def purchased(self) -> set[str]:
        """Items bought in the current session (the hygiene rule on repeats reads this)."""
        return purchased_in(self.session)

    @classmethod
    def read(cls, features: FeatureEngine, user_id: str) -> Shopper:
        f = features.read_all("user", user_id)
        return cls(user_id, f["history_seq"], f["session_seq"], f["top_categories_15d"], features.watermark,
                   f.get(QUERIES) or [])  # a state declared before `session_queries` existed has none


def item_counts(features: FeatureEngine, feature: str, items: Sequence[str]) -> list[float]:
    """One item-level counter of COUNTERS (a total over actions) for each item, as the model reads it."""
    return [counter_value(v) for v in features.read_many(feature, list(items))]


def counters(features: FeatureEngine, user_id: str, items: Sequence[str]) -> np.ndarray:
    """[C, len(COUNTERS)] float32 for the model head: per-user item count, 28-day and 2-hour counts."""
    columns = [
        [counter_value(v) for v in features.read_many(
            n, [(user_id, i) for i in items] if features.registry[n].entity == "user_item" else list(items))]
        for n in COUNTERS
    ]
    return np.ascontiguousarray(np.array(columns, dtype=np.float32).T)


def covisit_counts(features: FeatureEngine, session: Sequence[dict[str, Any]], n: int) -> dict[str, dict[str, int]]:
    """`covisit` of the session's `n` most recent distinct items, newest first: {item: {neighbour: count}}.

    The candidate stage reads these neighbour lists and the model's SIGNALS read their counts, exactly as
    training does (insession.train.build.session_covisit)."""
    recent = list(dict.fromkeys(e["item_id"] for e in reversed(session)))[:n]
    return {i: {x["item_id"]: int(x["count"]) for x in features.read("covisit", i)} for i in recent}


def signals(catalog: Catalog, shopper: Shopper, covisit: dict[str, dict[str, int]], items: Sequence[str]) -> np.ndarray:
    """[C, len(SIGNALS)] float32: the model's per-candidate repeat and co-visitation signals."""
    known = [catalog.get(i) for i in items]
    rows = signal_rows(items, [it.category if it else None for it in known], shopper.session, shopper.history,
                       covisit, shopper.at_ms, [it.subcategory if it else None for it in known], shopper.queries)
    return np.array(rows, dtype=np.float32).reshape(len(items), len(SIGNALS))


class ItemIndex:
    """Item ids -> vocabulary indices (`Vocab.lookup`): the trained rows by a dict lookup, the cold-start
    chain (subcategory, category, global row, through the item's catalogue entry as it is now: a new item may
    move subcategory) only for items without one. A memo of trained rows filled by first use took 8% of the
    server's samples under bench_mixed's load (py-spy, 2026-11-30): with 50,000 items, ranking kept meeting
    first uses, each paying the Arrow lookups of the cold-start chain.
    """

    def __init__(self, vocab: Vocab, catalog: Catalog) -> None:
        self.vocab = vocab
        self.catalog = catalog

    def __call__(self, items: Sequence[str]) -> np.ndarray:
        out = self.vocab.item_rows(items)
        miss = np.flatnonzero(out == 0)
        if miss.size:
            ids = [items[j] for j in miss]
            known = [self.catalog.get(i) for i in ids]
            out[miss] = self.vocab.lookup(
                pa.array(ids, pa.string()),
                pa.array([it.category if it else None for it in known], pa.string()),
                pa.array([it.subcategory if it else None for it in known], pa.string()),
            )
        return out


def query_tensor(queries: Sequence[str]) -> torch.Tensor:
    """[1, Q, QUERY_GRAMS] hashed n-grams of the session's queries (Q >= 1: none is one padding row), as
    training's `assemble_examples` builds them."""
    rows = Vocab.query_rows(queries)
    return torch.from_numpy(rows if len(rows) else np.zeros((1, QUERY_GRAMS), np.int64)).unsqueeze(0)


def sequence(index: ItemIndex, events: list[dict[str, Any]], max_len: int) -> SeqTensors:
    """[1, L] tensors of the most recent `max_len` events (L >= 1: an empty side is one padding slot)."""
    tail = events[-max_len:] if max_len else []
    width = max(len(tail), 1)
    items = np.zeros((1, width), dtype=np.int64)
    actions = np.zeros((1, width), dtype=np.int64)
    ts = np.zeros((1, width), dtype=np.int64)
    if tail:
        n = len(tail)
        items[0, :n] = index([e["item_id"] for e in tail])
        actions[0, :n] = [ACTION_INDEX[e["action"]] for e in tail]
        ts[0, :n] = [e["ts"] for e in tail]
    return SeqTensors(torch.from_numpy(items), torch.from_numpy(actions), torch.from_numpy(ts))
