"""Metric implementations against hand-computed cases, and the bootstrap's basic guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.evaluate.metrics import (
    bootstrap,
    paired_difference,
    positive_rank,
    request_metrics,
    score_requests,
    truncated_rank_metrics,
)


def test_request_metrics_by_hand() -> None:
    m = request_metrics(np.array([0.9, 0.5, 0.7]), positive=2)  # the positive ranks second of three
    assert m["ndcg10"] == pytest.approx(1 / math.log2(3))
    assert m["hr10"] == 1.0
    assert m["mrr"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(0.5)  # above one of the two negatives
    top = request_metrics(np.array([0.1, 3.0, 0.2]), positive=1)
    assert (top["ndcg10"], top["hr10"], top["mrr"], top["auc"]) == (1.0, 1.0, 1.0, 1.0)


def test_ties_count_against_the_positive() -> None:
    m = request_metrics(np.zeros(5), positive=0)
    assert positive_rank(np.zeros(5), 0) == 4
    assert m["mrr"] == pytest.approx(0.2)
    assert m["auc"] == 0.0


def test_beyond_the_cutoff() -> None:
    scores = np.arange(20, dtype=float)[::-1]  # candidate j has rank j
    assert request_metrics(scores, positive=10)["ndcg10"] == 0.0
    assert request_metrics(scores, positive=10)["hr10"] == 0.0
    assert request_metrics(scores, positive=9)["ndcg10"] == pytest.approx(1 / math.log2(11))
    assert request_metrics(scores, positive=10)["mrr"] == pytest.approx(1 / 11)


def test_full_catalogue_hr_mrr_at_20() -> None:
    m = truncated_rank_metrics(np.array([0, 19, 20, -1]), 20)
    assert m["hr20"] == pytest.approx(0.5)
    assert m["mrr20"] == pytest.approx((1 + 1 / 20) / 4)


def test_gauc_by_hand() -> None:
    # user a, two requests of 3 candidates (positive first): [5, 1, 2] and [3, 4, 0].
    # pooled: positives {5, 3}, negatives {1, 2, 4, 0}; 5 beats all 4, 3 beats 1, 2, 0 -> 7 / 8 pairs.
    # user b: one request [1, 2] (positive 1 loses) -> AUC 0. Weights = impressions: 6 and 2.
    scores = [np.array([5.0, 1, 2]), np.array([3.0, 4, 0]), np.array([1.0, 2])]
    per = score_requests(scores, np.zeros(3, np.int64), np.array(["a", "a", "b"]), np.array(["s1", "s2", "s3"]))
    assert per.point()["gauc"] == pytest.approx((7 / 8 * 6 + 0.0 * 2) / 8)
    assert per.point()["auc"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # per-request AUCs differ from GAUC
    # a tie counts against the positive, as in the per-request metrics
    tie = score_requests([np.array([1.0, 1.0])], np.zeros(1, np.int64), np.array(["u"]), np.array(["s"]))
    assert tie.point()["gauc"] == 0.0
    only_a = per.subset(np.array([True, True, False]))
    assert only_a.point()["gauc"] == pytest.approx(7 / 8)


def _per(values: list[float], sessions: list[str]):  # type: ignore[no-untyped-def]
    scores = [np.array([v, 0.5]) for v in values]  # positive 0 beats 0.5 iff v > 0.5
    return score_requests(scores, np.zeros(len(values), np.int64), np.array(sessions), np.array(sessions))


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    per = _per([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], list("aabbccdd"))
    a, b = bootstrap(per, 300, seed=3), bootstrap(per, 300, seed=3)
    assert str(a["hr10"]) == str(b["hr10"])
    assert a["mrr"].low <= a["mrr"].value <= a["mrr"].high
    assert a["auc"].value == pytest.approx(5 / 8)
    assert a["auc"].low < a["auc"].high


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(0, 1000))
def test_bootstrap_of_a_constant_collapses(n: int, seed: int) -> None:
    per = _per([1.0] * n, [f"s{i % 3}" for i in range(n)])
    est = bootstrap(per, 50, seed=seed)
    assert est["ndcg10"].low == est["ndcg10"].high == est["ndcg10"].value == 1.0


def test_paired_difference() -> None:
    a = _per([1.0, 1.0, 0.0, 1.0], list("abcd"))
    same = paired_difference(a, a, "mrr", 100)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    b = _per([0.0, 0.0, 0.0, 0.0], list("abcd"))
    d = paired_difference(a, b, "mrr", 200)
    assert d.value == pytest.approx(0.75 * 0.5)  # rank 1 (mrr 1) vs rank 2 (mrr 0.5) on 3 of 4 requests
    assert 0 <= d.low <= d.value <= d.high
