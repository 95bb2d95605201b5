"""Columnar examples: collate (padding, truncation), subset, save/load, bucketing, background prefetch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.model import SIGNALS, RerankerConfig
from insession.train.examples import Examples, bucketed_batches, prefetch


def ragged(lengths: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, np.arange(start, start + offsets[-1], dtype=np.int64)


def make_examples(hist: list[int], sess: list[int], cands: list[int], queries: list[int] | None = None) -> Examples:
    ho, hv = ragged(hist, 1)
    so, sv = ragged(sess, 1000)
    co, cv = ragged(cands, 5000)
    qo, qv = ragged(queries or [0] * len(hist), 1)
    labels = np.zeros(len(cv), np.float32)
    labels[co[:-1][np.array(cands) > 0]] = 1
    return Examples(
        request_ts=np.arange(len(hist), dtype=np.int64) * 10 + 1_700_000_000_000,
        hist_offsets=ho,
        hist_items=hv,
        hist_actions=np.ones_like(hv),
        hist_ts=hv * 7,
        sess_offsets=so,
        sess_items=sv,
        sess_actions=np.full_like(sv, 2),
        sess_ts=sv * 7,
        cand_offsets=co,
        cand_items=cv,
        cand_labels=labels,
        cand_counters=np.stack([cv, cv * 2, cv * 3], 1).astype(np.float32),
        cand_signals=np.stack([cv * k for k in range(1, len(SIGNALS) + 1)], 1).astype(np.float32),
        surface=np.arange(len(hist), dtype=np.int64) % 3,
        qry_offsets=qo,
        qry_grams=np.stack([qv, qv + 100, np.zeros_like(qv)], 1) if len(qv) else np.zeros((0, 3), np.int64),
    )


def test_collate_pads_right_and_keeps_the_most_recent() -> None:
    ex = make_examples([3, 0, 7], [1, 2, 0], [2, 3, 1], queries=[2, 0, 1])
    b = ex.collate(np.array([2, 0, 1]), RerankerConfig(max_history=5, max_session=4))
    assert b.surface is not None and b.surface.tolist() == [2, 0, 1]
    # queries: [B, Q, G], every query of a group (no truncation), padded with empty (all-zero) queries
    assert b.queries is not None and b.queries.tolist() == [
        [[3, 103, 0], [0, 0, 0]], [[1, 101, 0], [2, 102, 0]], [[0, 0, 0], [0, 0, 0]]]
    assert b.history.items.tolist() == [[6, 7, 8, 9, 10], [1, 2, 3, 0, 0], [0, 0, 0, 0, 0]]  # last 5 of 7
    assert b.session.items.tolist() == [[0, 0], [1000, 0], [1001, 1002]]
    assert b.history.ts[0].tolist() == [42, 49, 56, 63, 70]
    assert b.candidates.tolist() == [[5005, 0, 0], [5000, 5001, 0], [5002, 5003, 5004]]
    assert b.labels.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert b.counters[1, 1].tolist() == [5001, 10002, 15003]
    assert b.counters[0, 1].tolist() == [0, 0, 0]
    assert b.signals is not None and b.signals[1, 1].tolist() == [5001 * k for k in range(1, len(SIGNALS) + 1)]
    assert b.signals[0, 1].abs().sum() == 0
    assert b.request_ts.tolist() == [1_700_000_000_020, 1_700_000_000_000, 1_700_000_000_010]


def test_subset_and_roundtrip(tmp_path: Path) -> None:
    ex = make_examples([3, 0, 7, 2], [1, 2, 0, 1], [2, 3, 1, 2], queries=[1, 0, 2, 3])
    sub = ex.subset(np.array([3, 1]))
    cfg = RerankerConfig()
    whole = ex.collate(np.array([3, 1]), cfg)
    part = sub.collate(np.array([0, 1]), cfg)
    for a, b in (
        (whole.history.items, part.history.items),
        (whole.candidates, part.candidates),
        (whole.counters, part.counters),
        (whole.signals, part.signals),
        (whole.session.ts, part.session.ts),
        (whole.surface, part.surface),
        (whole.queries, part.queries),
    ):
        assert a.tolist() == b.tolist()
    ex.save(tmp_path / "ex.npz")
    back = Examples.load(tmp_path / "ex.npz")
    assert (
        back.collate(np.arange(4), cfg).history.items.tolist() == ex.collate(np.arange(4), cfg).history.items.tolist()
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=300), st.integers(1, 40), st.integers(0, 5))
def test_bucketed_batches_cover_every_group_once(lengths: list[int], batch_size: int, seed: int) -> None:
    lens = np.array(lengths)
    batches = bucketed_batches(lens, batch_size, np.random.default_rng(seed))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    assert all(len(b) <= batch_size for b in batches)
    # batches are runs of the (noisy, noise < 2) length order, so their spreads add up to the total spread
    spreads = sum(int(lens[b].max() - lens[b].min()) for b in batches)
    assert spreads <= int(lens.max() - lens.min()) + 2 + 2 * len(batches)
    fixed = bucketed_batches(lens, batch_size, None)
    assert all(lens[a].max() <= lens[b].min() for a, b in zip(fixed, fixed[1:], strict=False))


def test_prefetch_yields_in_order_and_raises_producer_errors() -> None:
    ex = make_examples([1] * 10, [1] * 10, [2] * 10)
    batches = [np.array([i]) for i in range(10)]
    got = [int(b.request_ts[0]) for b in prefetch(ex, batches, RerankerConfig(), depth=2)]
    assert got == [int(t) for t in ex.request_ts]
    with pytest.raises(IndexError):
        list(prefetch(ex, [np.array([0]), np.array([99])], RerankerConfig()))
    early = prefetch(ex, batches, RerankerConfig(), depth=1)
    next(early)
    early.close()  # a consumer that stops early does not leave the producer hanging
