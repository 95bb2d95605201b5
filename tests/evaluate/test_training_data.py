"""The reranker trains on what it is served: the candidate stage's lists, with the repeat signals intact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from insession.evaluate.data import Dataset
from insession.evaluate.split import TimeSplit, before
from insession.model import SIGNALS, signal_rows
from insession.model.reranker import QUERIES
from insession.train.build import BuildConfig, TrainingData, build
from insession.train.replay import build_candidates, stage_proposer

SESSION_COUNT = SIGNALS.index("session_count")


@pytest.fixture(scope="module")
def fitted(shop: Dataset, split: TimeSplit) -> tuple[pa.Table, TrainingData]:
    events = before(shop.events, split.test_start)
    proposer = stage_proposer(events, shop.items, progress=False)
    return events, build(events, BuildConfig(seed=0), progress=False, proposer=proposer)


def test_groups_hold_the_stage_proposals_and_their_signals(
    shop: Dataset, fitted: tuple[pa.Table, TrainingData]
) -> None:
    events, data = fitted
    meta = data.train_requests
    req = pa.table(
        {
            "g": pa.array(np.arange(meta.num_rows), pa.int64()),
            "user_id": meta["user_id"],
            "item_id": meta["item_id"],
            "ts": meta["ts"],
            "offset": pc.subtract(meta["offset"], 1),  # the state just before the add-to-cart
        }
    )
    sets = build_candidates(events, shop.items, req, progress=False, with_counters=False)
    assert sets.proposed.all()  # only requests whose positive the stage proposed are trained on
    ex = data.train
    props = sets.proposals().to_pylist()
    cats = dict(
        zip(shop.items["item_id"].to_pylist(), shop.items.select(["category", "subcategory"]).to_pylist(), strict=True)
    )
    for g in range(len(ex)):
        a, b = ex.cand_offsets[g], ex.cand_offsets[g + 1]
        items, labels, signals = ex.cand_items[a:b], ex.cand_labels[a:b], ex.cand_signals[a:b]
        assert labels[0] == 1 and (labels[1:] == 0).all()
        proposed = [p["item_id"] for p in props if p["g"] == g]
        cat = [cats[i]["category"] for i in proposed]
        sub = [cats[i]["subcategory"] for i in proposed]
        want = data.vocab.lookup(
            pa.array(proposed, pa.string()), pa.array(cat, pa.string()), pa.array(sub, pa.string())
        )
        assert set(want.tolist()) <= set(items.tolist())  # every proposal is in the group
        assert len(items) >= len(proposed)
        # signals: the same function serving calls, on the same point-in-time state, by item id
        session, history = sets.state["session_seq"][g].as_py(), sets.state["history_seq"][g].as_py()
        now = int(meta["ts"][g].as_py())
        queries = sets.state[QUERIES][g].as_py() or []
        expected = np.array(
            signal_rows(proposed, cat, session, history, sets.covisit[g], now, sub, queries), np.float32)
        pos = proposed.index(meta["item_id"][g].as_py())
        np.testing.assert_allclose(signals[0], expected[pos], rtol=1e-6)
        got = sorted(map(tuple, np.round(signals[1:], 5).tolist()))
        for row in np.round(np.delete(expected, pos, 0), 5).tolist():
            assert tuple(row) in got
    # on this shop every carted item was viewed just before: the positive's session signal is never zeroed
    firsts = ex.cand_signals[ex.cand_offsets[:-1], SESSION_COUNT]
    assert (firsts > 0).all()


def test_validation_groups_are_served_lists_too(fitted: tuple[pa.Table, TrainingData]) -> None:
    _, data = fitted
    sizes = np.diff(data.val.cand_offsets)
    assert len(data.val) > 0 and (sizes >= 30).all()  # the stage's lists, not a handful of hard negatives


def test_sequences_reused_from_the_stage_equal_the_builds_own(fitted: tuple[pa.Table, TrainingData]) -> None:
    """With a proposer the build takes each request's sequences and co-visitation from the stage's replay;
    they match what the build reads itself without one (same groups, by add-to-cart offset)."""
    events, data = fitted
    own = build(events, BuildConfig(seed=0), progress=False)
    at = {o: g for g, o in enumerate(own.train_requests["offset"].to_pylist())}
    mine = [at[o] for o in data.train_requests["offset"].to_pylist()]
    assert len(mine) > 20
    for name in ("hist", "sess"):
        a, b = getattr(data.train, f"{name}_offsets"), getattr(own.train, f"{name}_offsets")
        for g, h in enumerate(mine):
            for col in ("items", "actions", "ts"):
                x, y = getattr(data.train, f"{name}_{col}"), getattr(own.train, f"{name}_{col}")
                assert x[a[g] : a[g + 1]].tolist() == y[b[h] : b[h + 1]].tolist()
    # the positive's SIGNALS (co-visitation included) agree too
    np.testing.assert_allclose(
        data.train.cand_signals[data.train.cand_offsets[:-1]][: len(mine)],
        own.train.cand_signals[own.train.cand_offsets[:-1][mine]],
        rtol=1e-6,
    )
