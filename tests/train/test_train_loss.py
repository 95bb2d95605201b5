"""The hybrid loss on hand-made cases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from insession.model.reranker import COUNTERS, Batch, DualSequenceReranker, RerankerConfig, Sequence
from insession.train.loss import inbatch_logits, inbatch_softmax_loss, listwise_loss, weighted_bce


def test_listwise_is_softmax_cross_entropy_over_valid_candidates() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0, 99.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # the 99 is padding and must not count
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    assert math.isclose(float(listwise_loss(scores, labels, mask)), expected, rel_tol=1e-6)


def test_listwise_prefers_positive_on_top_and_skips_groups_without_negatives() -> None:
    mask = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    good = listwise_loss(torch.tensor([[0.0, 3.0, 0.0]]), labels, mask)
    bad = listwise_loss(torch.tensor([[3.0, 0.0, 0.0]]), labels, mask)
    assert good < bad
    only_positive = torch.tensor([[1.0, 0.0, 0.0]])
    lone = torch.tensor([[True, False, False]])
    assert float(listwise_loss(torch.tensor([[5.0, 0.0, 0.0]]), only_positive, lone)) == 0.0


def test_listwise_averages_over_several_positives() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    got = listwise_loss(scores, labels, torch.ones(1, 4, dtype=torch.bool))
    assert math.isclose(float(got), math.log(4), rel_tol=1e-6)


def test_inbatch_softmax_targets_the_own_positive_and_masks_same_item_collisions() -> None:
    logits = torch.tensor([[2.0, 0.0, 5.0], [2.0, 0.0, 0.0]])
    items = torch.tensor([[7, 8, 9], [8, 9, 7]])
    expected = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert math.isclose(float(inbatch_softmax_loss(logits, items)), float(expected), rel_tol=1e-6)
    # request 0's second sampled item is its own positive again (another user carted it): not a negative
    same = torch.tensor([[7, 8, 7], [8, 9, 7]])
    manual = (-F.log_softmax(torch.tensor([2.0, 0.0]), 0)[0] - F.log_softmax(logits[1], 0)[0]) / 2
    assert math.isclose(float(inbatch_softmax_loss(logits, same)), float(manual), rel_tol=1e-6)


def test_inbatch_logits_pair_each_request_with_other_groups_positives() -> None:
    b = 6
    cfg = RerankerConfig(n_items=20, dim=8, n_heads=2, dropout=0.0)
    model = DualSequenceReranker(cfg).eval()
    seq = Sequence(
        torch.randint(1, 20, (b, 3)), torch.ones(b, 3, dtype=torch.long), torch.zeros(b, 3, dtype=torch.long)
    )
    cands = torch.tensor([[11 + g, 1] for g in range(b)])
    batch = Batch(
        seq, seq, torch.full((b,), 3_600_000), cands, torch.ones(b, 2, len(COUNTERS)), torch.tensor([[1.0, 0.0]] * b)
    )
    enc = model.encode(batch.history, batch.session, batch.request_ts)
    logits, items = inbatch_logits(model, enc, batch, k=3)
    assert logits.shape == items.shape == (b, 4)
    assert items[:, 0].tolist() == [11 + g for g in range(b)]  # column 0: the own positive
    for row in items.tolist():
        assert len(set(row)) == 4 and all(11 <= i < 11 + b for i in row)  # k distinct other positives
    own = model.score(enc, items[:, :1], torch.tensor([[[0.0, 1.0, 1.0]]] * b))  # user-item counter zeroed
    torch.testing.assert_close(logits[:, :1], own)


def test_weighted_bce_upweights_repeated_positives() -> None:
    scores = torch.tensor([[-1.0, 0.0]])  # a badly scored positive and a neutral negative
    labels = torch.tensor([[1.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    fresh = weighted_bce(scores, labels, mask, torch.tensor([[0.0, 0.0]]), alpha=1.0)
    repeated = weighted_bce(scores, labels, mask, torch.tensor([[20.0, 0.0]]), alpha=1.0)
    plain = F.binary_cross_entropy_with_logits(scores, labels)
    assert math.isclose(float(fresh), float(plain), rel_tol=1e-6)  # no repeats: ordinary BCE
    assert repeated > fresh  # the positive's (larger) error counts more
    w = 1 + math.log1p(20)
    pos_loss, neg_loss = math.log1p(math.exp(1.0)), math.log(2)
    assert math.isclose(float(repeated), (w * pos_loss + neg_loss) / (w + 1), rel_tol=1e-6)
    # the repeat count of a negative does not matter
    neg_rep = weighted_bce(scores, labels, mask, torch.tensor([[0.0, 50.0]]), alpha=1.0)
    assert math.isclose(float(neg_rep), float(fresh), rel_tol=1e-6)
