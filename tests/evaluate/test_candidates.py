"""The candidate stage replayed offline: service quotas, only items seen before the request, both views."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from insession.evaluate.data import Dataset
from insession.evaluate.split import TimeSplit, requests
from insession.rank.candidates import CandidateQuotas
from insession.train.replay import CandidateSets, build_candidates


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
