"""Baselines on hand-made cases: session kNN votes and the tuned scorers on the shared candidate lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from insession.evaluate.baselines import SessionKNN, baselines, signals
from insession.train.replay import CandidateSets

MIN = 60_000


def _events(rows: list[tuple[str, str, str, int]]) -> pa.Table:
    users, sessions, items, ts = zip(*rows, strict=True)
    return pa.table(
        {
            "user_id": list(users),
            "session_id": list(sessions),
            "item_id": list(items),
            "ts": pa.array(ts, pa.int64()),
        }
    )


def test_session_knn_by_hand() -> None:
    knn = SessionKNN(
        _events(
            [
                ("u1", "s1", "a", 0),
                ("u1", "s1", "b", MIN),
                ("u2", "s2", "a", 2 * MIN),
                ("u2", "s2", "c", 3 * MIN),
                ("u2", "s2", "e", 3 * MIN),
                ("u3", "s3", "d", 4 * MIN),
            ]
        )
    )
    s = knn.scores(["a"], ["b", "c", "d", "zz"], k=10)
    # cos({a}, {a,b}) = 1/sqrt(2) > cos({a}, {a,c,e}) = 1/sqrt(3); s3 shares nothing
    assert s[0] == pytest.approx(1 / np.sqrt(2)) and s[1] == pytest.approx(1 / np.sqrt(3))
    assert s[2] == 0.0 and s[3] == 0.0
    only_best = knn.scores(["a"], ["b", "c"], k=1)
    assert only_best[1] == 0.0 and only_best[0] > 0
    assert knn.scores([], ["b"], k=10)[0] == 0.0


def test_session_knn_cuts_sessions_at_inactivity_without_ids() -> None:
    ev = _events([("u", None, "a", 0), ("u", None, "b", MIN), ("u", None, "c", 40 * MIN)])  # type: ignore[list-item]
    knn = SessionKNN(ev)
    assert sorted(map(sorted, knn.sessions)) == [["a", "b"], ["c"]]


def test_scorers_rank_the_shared_lists(sets: CandidateSets) -> None:
    sig = signals(sets)
    rows = np.arange(len(sets.lists))
    for name, (scorer, grid) in baselines({}).items():
        if name == "sknn":  # needs fitted indexes; covered above
            continue
        scores = scorer(sets, sig, rows, grid[0])
        assert [len(s) for s in scores] == [len(x) for x in sets.lists], name
    # S-POP scores are the session counts: an item never in the session scores 0 (without a tie-breaker)
    spop, _ = baselines({})["s_pop"]
    s = spop(sets, sig, rows, {"tie": 0.0})
    sessions = sets.state["session_seq"].to_pylist()
    for i in rows[:20]:
        seen = [e["item_id"] for e in sessions[i]]
        assert all(score == seen.count(item) for item, score in zip(sets.lists[i], s[i], strict=True))


def test_shopper_recency_scores_the_latest_touch(sets: CandidateSets) -> None:
    """Shopper recency: 0 for an item the shopper never touched (session or history), else decreasing in the
    hours since the latest touch: the most recently touched item of a list scores highest."""
    sig = signals(sets)
    rows = np.arange(len(sets.lists))
    recency, _ = baselines({})["shopper_recency"]
    s = recency(sets, sig, rows, {"tie": 0.0})
    state = sets.state.to_pylist()
    now = sets.requests["ts"].to_pylist()
    checked = 0
    for i in rows:
        latest: dict[str, int] = {}
        for e in (*(state[i]["history_seq"] or []), *(state[i]["session_seq"] or [])):
            latest[e["item_id"]] = max(latest.get(e["item_id"], e["ts"]), e["ts"])
        for item, score in zip(sets.lists[i], s[i], strict=True):
            hours = (now[i] - latest[item]) / 3_600_000 if item in latest else None
            assert score == (0.0 if hours is None else pytest.approx(1 / (1 + np.log1p(hours)))), (i, item)
        touched = [item for item in sets.lists[i] if item in latest]
        if len(touched) > 1:
            best = sets.lists[i][int(np.argmax(s[i]))]
            assert latest[best] == max(latest[t] for t in touched)
            checked += 1
    assert checked > 0
