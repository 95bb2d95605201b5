"""The candidate stage replayed offline: service quotas, only items seen before the request, both views."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from insession.evaluate.data import Dataset
from insession.evaluate.split import TimeSplit, requests
from insession.features import default_registry
from insession.features.declare import DAY_MS
from insession.rank.candidates import CandidateQuotas
from insession.train.replay import CandidateSets, _search_snapshots, build_candidates


def test_lists_follow_the_stage(shop: Dataset, sets: CandidateSets) -> None:
    first_seen: dict[str, int] = {}
    for item, ts in zip(shop.events["item_id"].to_pylist(), shop.events["ts"].to_pylist(), strict=True):
        first_seen.setdefault(item, ts)
    positives = sets.requests["item_id"].to_pylist()
    for i, lst in enumerate(sets.lists):
        assert len(lst) == len(set(lst)) <= 60
        assert lst[sets.positive[i]] == positives[i]
        assert sets.proposed[i] == (sets.proposal_rank[i] >= 0)
        if sets.proposed[i]:
            assert sets.proposal_rank[i] == sets.positive[i]
        t = sets.requests["ts"][i].as_py()
        # every proposal existed (was seen in the log) before the request; only the forced positive may not
        others = [x for j, x in enumerate(lst) if j != sets.positive[i] or sets.proposed[i]]
        assert all(first_seen[x] < t for x in others)
    assert 0 < sets.proposed.mean() <= 1
    assert sets.counters.num_rows == sum(len(x) for x in sets.lists) == sets.flat().num_rows
    assert pc.sum(sets.flat()["label"]).as_py() == len(sets.lists)


def test_forced_view_replaces_the_last_proposal(shop: Dataset, split: TimeSplit) -> None:
    quotas = CandidateQuotas(n=4, session=0, covisit=1, category=1)  # no session items: misses
    small = build_candidates(shop.events, shop.items, requests(shop.events, split).slice(0, 40), quotas, progress=False)
    missed = np.flatnonzero(~small.proposed)
    assert len(missed) > 0
    for i in missed:
        n = small.n_proposed[i]
        assert small.positive[i] == (n - 1 if n >= quotas.n else n)
        assert len(small.lists[i]) == max(n, min(n + 1, quotas.n))


def test_search_lists_rank_the_subcategory_as_of_the_hour() -> None:
    h = 100 * DAY_MS
    items = pa.table({"item_id": ["a", "b", "c", "d", "e", "f", "g"],
                      "subcategory": ["s", "s", "s", "s", "t", "s", "s"],
                      "available": [True, True, True, False, True, True, True]})
    seen = [("a", h - 1), ("a", h - 2), ("b", h - 3), ("g", h - 3), ("c", h + 1), ("d", h - 1), ("e", h - 1),
            ("f", h - 40 * DAY_MS), ("a", h + 5)]
    events = pa.table({"item_id": [i for i, _ in seen], "ts": pa.array([t for _, t in seen], pa.int64())})
    got = _search_snapshots(events, items, {(h, "s"), (h, "t")}, default_registry())
    # by 28-day count at h (a 2; b, g 1 each: by id), then f (seen 40 days before: counted 0); c is first seen
    # after h (not in the catalogue yet), d is unavailable
    assert got == {(h, "s"): ["a", "b", "g", "f"], (h, "t"): ["e"]}
    assert _search_snapshots(events, items, set(), default_registry()) == {}
