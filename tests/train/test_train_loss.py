"""The hybrid loss on hand-made cases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from insession.train.loss import inbatch_softmax_loss, listwise_loss, weighted_bce


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


def test_inbatch_softmax_targets_the_diagonal_and_masks_same_item_collisions() -> None:
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 2.0, 0.0], [5.0, 0.0, 2.0]])
    items = torch.tensor([7, 8, 9])
    expected = F.cross_entropy(logits, torch.arange(3))
    assert math.isclose(float(inbatch_softmax_loss(logits, items)), float(expected), rel_tol=1e-6)
    # groups 0 and 2 carted the same item: the other's positive is not a negative for either
    same = torch.tensor([7, 8, 7])
    masked = inbatch_softmax_loss(logits, same)
    manual = (
        -F.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
        - F.log_softmax(logits[1], 0)[1]
        - F.log_softmax(torch.tensor([0.0, 2.0]), 0)[1]
    ) / 3
    assert math.isclose(float(masked), float(manual), rel_tol=1e-6)


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
