"""Non-neural baselines scoring the same candidate lists: popularity, trending, session recency, shopper
recency, S-POP, P-TopFreq, session kNN and item co-visitation, each with a small grid tuned on validation.

Each baseline turns per-candidate signals into a score; a tiny popularity term (weight `tie`, tuned over
{0, 1e-3}) may break its ties, which is how these methods are used in published comparisons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from insession.model.reranker import SIGNALS, signal_rows
from insession.train.replay import CandidateSets

Params = dict[str, Any]


@dataclass
class Signals:
    """Per flat candidate row (see `CandidateSets.flat`) the point-in-time signals the baselines read."""

    offsets: np.ndarray  # request i's rows are offsets[i]:offsets[i+1]
    items: list[str]
    pop: np.ndarray  # 28-day event count of the item
    trend: np.ndarray  # 2-hour event count
    user_buy: np.ndarray  # the user's add-to-carts + purchases of the item (28 days, before the request)
    user_all: np.ndarray  # the user's events on the item (28 days)
    sess_count: np.ndarray  # events on the item in the current session
    sess_recency: np.ndarray  # 1 / (1 + events since the item's last session event); 0 when not in session
    touch_recency: np.ndarray  # 1 / (1 + log1p(hours since the shopper's latest event on it)); 0 if none

    def split(self, values: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        return [values[self.offsets[i] : self.offsets[i + 1]] for i in rows]


def _total(d: dict | None) -> float:
    return float(sum(d.values())) if d else 0.0


def signals(sets: CandidateSets) -> Signals:
    """The baselines' signals; the shopper's own ones through the reranker's `signal_rows` (one definition)."""
    c = sets.counters.to_pylist()
    uic = [r["user_item_count_28d"] or {} for r in c]
    sessions = sets.state["session_seq"].to_pylist()
    histories = sets.state["history_seq"].to_pylist()
    now = sets.requests["ts"].to_pylist()
    own = np.array(
        [
            row
            for i, lst in enumerate(sets.lists)
            for row in signal_rows(lst, [None] * len(lst), sessions[i] or [], histories[i] or [], {}, now[i])
        ],
        np.float64,
    ).reshape(-1, len(SIGNALS))
    col = {name: own[:, SIGNALS.index(name)] for name in ("session_count", "session_recency", "touch_recency")}
    return Signals(
        offsets=sets.row_offsets(),
        items=[i for lst in sets.lists for i in lst],
        pop=np.array([_total(r["item_count_28d"]) for r in c]),
        trend=np.array([float(r["item_trending_2h"] or 0) for r in c]),
        user_buy=np.array([float(u.get("add_to_cart", 0) + u.get("purchase", 0)) for u in uic]),
        user_all=np.array([_total(u) for u in uic]),
        sess_count=np.rint(np.expm1(col["session_count"])),  # the signal is log1p(a count)
        sess_recency=col["session_recency"],
        touch_recency=col["touch_recency"],
    )


class SessionKNN:
    """SKNN (Jannach & Ludewig 2017): the k most similar past sessions (cosine on item sets, among the
    `sample` most recent sessions sharing an item) vote for the candidates they contain."""

    def __init__(self, events: pa.Table, sample: int = 1000) -> None:
        con = duckdb.connect()
        con.register("ev", events.select(["user_id", "session_id", "item_id", "ts"]))
        rows = con.sql("""
            WITH s AS (SELECT *, sum(CASE WHEN prev IS NULL OR ts - prev > 1800000 THEN 1 ELSE 0 END)
                                 OVER (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING) AS gap_sess
                       FROM (SELECT *, lag(ts) OVER (PARTITION BY user_id ORDER BY ts) AS prev FROM ev))
            SELECT coalesce(session_id, user_id || '#' || gap_sess) AS sid, list(DISTINCT item_id) AS items,
                   max(ts) AS last_ts
            FROM s GROUP BY 1 ORDER BY last_ts, sid""").fetchall()
        self.sessions = [set(items) for _, items, _ in rows]
        self.sample = sample
        self.by_item: dict[str, list[int]] = {}
        for s, items in enumerate(self.sessions):  # session numbers ascend with recency
            for item in items:
                self.by_item.setdefault(item, []).append(s)

    def scores(self, query: list[str], candidates: list[str], k: int) -> np.ndarray:
        q = set(query)
        if not q:
            return np.zeros(len(candidates))
        pool: set[int] = set()
        for item in q:
            pool.update(self.by_item.get(item, ())[-self.sample :])
        recent = sorted(pool)[-self.sample :]
        sims = [(len(q & self.sessions[s]) / np.sqrt(len(q) * len(self.sessions[s])), s) for s in recent]
        sims.sort(reverse=True)
        votes: Counter[str] = Counter()
        for sim, s in sims[:k]:
            for item in self.sessions[s]:
                votes[item] += sim
        return np.array([votes.get(c, 0.0) for c in candidates])


def covisit_scores(sets: CandidateSets, i: int, decay: float) -> np.ndarray:
    """Sum over the session's distinct items (most recent first, weight decay^j) of their co-visitation
    count with each candidate (the point-in-time `covisit` feature)."""
    out = np.zeros(len(sets.lists[i]))
    pos = {item: j for j, item in enumerate(sets.lists[i])}
    for j, (_, nbrs) in enumerate(sets.covisit[i].items()):
        for nbr, n in nbrs.items():
            if nbr in pos:
                out[pos[nbr]] += decay**j * n
    return out


Scorer = Callable[[CandidateSets, Signals, np.ndarray, Params], list[np.ndarray]]


def _simple(primary: Callable[[Signals], np.ndarray]) -> Scorer:
    def score(sets: CandidateSets, sig: Signals, rows: np.ndarray, p: Params) -> list[np.ndarray]:
        return sig.split(primary(sig) + p["tie"] * np.log1p(sig.pop), rows)

    return score


def _sknn(knn_by_period: dict[str, SessionKNN]) -> Scorer:
    def score(sets: CandidateSets, sig: Signals, rows: np.ndarray, p: Params) -> list[np.ndarray]:
        sessions = sets.state["session_seq"].to_pylist()
        history = sets.state["history_seq"].to_pylist()
        periods = sets.requests["period"].to_pylist()
        tie = sig.split(p["tie"] * np.log1p(sig.pop), rows)
        out = []
        for i, t in zip(rows.tolist(), tie, strict=True):
            query = [e["item_id"] for e in sessions[i]]
            if not query and p["history"]:
                query = [e["item_id"] for e in history[i][-10:]]
            out.append(knn_by_period[periods[i]].scores(query, sets.lists[i], p["k"]) + t)
        return out

    return score


def _covisit(sets: CandidateSets, sig: Signals, rows: np.ndarray, p: Params) -> list[np.ndarray]:
    tie = sig.split(p["tie"] * np.log1p(sig.pop), rows)
    return [covisit_scores(sets, i, p["decay"]) + t for i, t in zip(rows.tolist(), tie, strict=True)]


TIES = (0.0, 1e-3)


def baselines(knn_by_period: dict[str, SessionKNN]) -> dict[str, tuple[Scorer, list[Params]]]:
    """name -> (scorer, validation grid)."""
    return {
        "popularity_28d": (_simple(lambda s: np.zeros_like(s.pop)), [{"tie": 1.0}]),
        "trending_2h": (_simple(lambda s: s.trend), [{"tie": t} for t in TIES]),
        "session_recency": (_simple(lambda s: s.sess_recency), [{"tie": t} for t in TIES]),
        "shopper_recency": (_simple(lambda s: s.touch_recency), [{"tie": t} for t in TIES]),
        "s_pop": (_simple(lambda s: s.sess_count), [{"tie": t} for t in TIES]),
        "p_topfreq": (_simple(lambda s: s.user_buy), [{"tie": t} for t in TIES]),
        "p_topfreq_all_actions": (_simple(lambda s: s.user_all), [{"tie": t} for t in TIES]),
        "sknn": (
            _sknn(knn_by_period),
            [{"k": k, "history": h, "tie": t} for k in (50, 100, 500) for h in (False, True) for t in TIES],
        ),
        "covisit": (_covisit, [{"decay": d, "tie": t} for d in (1.0, 0.7, 0.4) for t in TIES]),
    }
