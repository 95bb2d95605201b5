"""The ranking service: with and without candidates, empty sides, cold items, every fallback, explanations."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.model import SIGNALS, Batch, Vocab
from insession.rank import HygieneRules, RankConfig, Ranker, RankRequest, RankRequestError, fallback_ranking
from insession.rank.inputs import ItemIndex, Shopper, counters, covisit_counts, item_counts, sequence, signals
from insession.rank.onnx import ONNX_FILE

from .shop import MINUTE, SURFACES, Shop


def scores_of(resp: object) -> dict[str, float]:
    return {it.item_id: it.score for it in resp.items}  # type: ignore[attr-defined]


def assert_servable(shop: Shop, resp: object, purchased: frozenset[str] = frozenset()) -> None:
    got = [it.item_id for it in resp.items]  # type: ignore[attr-defined]
    assert len(got) == len(set(got))
    for i in got:
        item = shop.catalog.get(i)
        assert item is not None and item.available and i not in purchased
    scores = [it.score for it in resp.items]  # type: ignore[attr-defined]
    assert scores == sorted(scores, reverse=True)
    assert all(math.isfinite(s) for s in scores)


def test_rank_given_candidates(shop: Shop, ranker: Ranker) -> None:
    cands = ["i3", "i3", "i20", "i18", "ghost", "i5", "i40", "i61", "i17"]
    resp = ranker.rank(RankRequest("u0", candidates=cands, k=10))
    assert resp.model_version == "v1" and resp.fallback is None and resp.fallback_reason is None
    assert resp.candidate_source == "request" and resp.candidates == 8  # duplicates removed before scoring
    assert set(scores_of(resp)) == {"i3", "i20", "i40", "i61", "i17"}
    assert resp.hygiene_drops == {"purchased": 1, "unknown": 1, "unavailable": 1}
    assert_servable(shop, resp, frozenset({"i18"}))


def test_rank_without_candidates_runs_the_candidate_stage(shop: Shop, ranker: Ranker) -> None:
    resp = ranker.rank(RankRequest("u0", k=12, session_id="u0-now", surface="home"))
    assert resp.candidate_source == "candidate_stage" and resp.fallback is None
    assert 12 < resp.candidates <= ranker.config.quotas.n
    assert len(resp.items) == 12
    assert (resp.session_id, resp.surface) == ("u0-now", "home")
    assert_servable(shop, resp, frozenset({"i18"}))
    cap = ranker.config.hygiene.category_cap(12)
    cats = [it.category for it in resp.items]
    assert max(cats.count(c) for c in cats) <= cap


def test_no_candidates_to_rank_is_an_empty_list(ranker: Ranker) -> None:
    req = RankRequest("u0", candidates=[])
    for resp in (ranker.rank(req), asyncio.run(ranker.arank(req))):
        assert resp.items == [] and resp.fallback is None and resp.model_version == "v1"


def test_async_path_gives_the_same_ranking(ranker: Ranker) -> None:
    req = RankRequest("u0", candidates=["i1", "i20", "i40", "i50"])
    assert asyncio.run(ranker.arank(req)).items == ranker.rank(req).items


def test_empty_history_empty_session_and_both(shop: Shop, ranker: Ranker) -> None:
    t = shop.features.watermark
    shop.add("u7", "i33", "view", t, session="u7-now")  # a session, no history
    shop.add("u8", "i34", "view", t)  # no session id: its session closes 30 minutes later ...
    shop.add("u1", "i35", "view", t + 31 * MINUTE, session="u1-b")  # ... when the watermark moves on
    cands = ["i1", "i20", "i33", "i40", "i60"]
    for user, (n_hist, n_sess) in {"u7": (0, 1), "u8": (1, 0), "u9": (0, 0)}.items():
        shopper = Shopper.read(shop.features, user)
        assert (len(shopper.history), len(shopper.session)) == (n_hist, n_sess)
        resp = ranker.rank(RankRequest(user, candidates=cands, k=5))
        assert resp.fallback is None and len(resp.items) == 5
        assert_servable(shop, resp)
        assert ranker.rank(RankRequest(user, k=5)).fallback is None  # the candidate stage too


def test_cold_items_take_the_subcategory_row(shop: Shop, ranker: Ranker) -> None:
    assert ranker._model is not None
    vocab = ranker._model.artefact.vocab
    index = ItemIndex(vocab, shop.catalog)
    i60, i61, i3 = index(["i60", "i61", "i3"])
    assert i60 == i61 == vocab.n_items + vocab.subcats.index("c3\x1fs7")  # same subcategory, no trained row
    assert 0 < i3 < vocab.n_items
    resp = ranker.rank(RankRequest("u9", candidates=["i60", "i61", "i3"], k=3))
    s = scores_of(resp)
    assert resp.fallback is None and set(s) == {"i60", "i61", "i3"}
    assert s["i60"] == pytest.approx(s["i61"], abs=1e-6)  # no events either: identical inputs


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([f"i{i}" for i in range(70)] + ["new", "i999"]), max_size=30))
def test_the_item_index_is_the_vocabularys_whole_lookup(shop: Shop, ranker: Ranker, items: list[str]) -> None:
    """Trained rows by the dict, the rest by the cold-start chain: the same indices as one `Vocab.lookup` of
    every id with its catalogue entry."""
    assert ranker._model is not None
    vocab = ranker._model.artefact.vocab
    known = [shop.catalog.get(i) for i in items]
    whole = vocab.lookup(pa.array(items, pa.string()),
                         pa.array([k.category if k else None for k in known], pa.string()),
                         pa.array([k.subcategory if k else None for k in known], pa.string()))
    assert ItemIndex(vocab, shop.catalog)(items).tolist() == whole.tolist()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_encode_once_equals_one_full_forward_per_candidate(shop: Shop, ranker: Ranker, backend: str) -> None:
    config = RankConfig(hygiene=HygieneRules(max_category_share=1.0), budget_ms=5_000, backend=backend)
    served_by = Ranker(shop.features, shop.catalog, shop.model_dir, config)
    assert served_by.backend_ready(timeout_s=300) == backend
    assert (shop.model_dir / "v1" / ONNX_FILE).exists() == (backend == "onnx")  # exported once, kept
    cands = ["i1", "i3", "i17", "i20", "i33", "i40", "i48", "i60", "i62"]
    resp = served_by.rank(RankRequest("u0", candidates=cands, k=len(cands), explain=True, surface="cart"))
    served_by.close()
    served = scores_of(resp)
    assert ranker._model is not None and resp.fallback is None and set(served) == set(cands)
    model, index = ranker._model.artefact.model, ranker._model.index
    shopper = Shopper.read(shop.features, "u0")
    history = sequence(index, shopper.history, model.cfg.max_history)
    session = sequence(index, shopper.session, model.cfg.max_session)
    counts = torch.from_numpy(counters(shop.features, "u0", cands))
    covisit = covisit_counts(shop.features, shopper.session, served_by.config.quotas.session)
    sigs = torch.from_numpy(signals(shop.catalog, shopper, covisit, cands))
    assert sigs.abs().sum() > 0  # the session's repeat and co-visitation signals reach the model
    # the surface and the session's query reach the model, as training's examples build them
    assert shopper.queries == ["s2 sneakers"]
    match = sigs[:, SIGNALS.index("query_match")].tolist()  # "s2" names the subcategory of i17, i20 (s2)
    assert match == [0.5 if item in ("i17", "i20") else 0.0 for item in cands]
    surface = torch.from_numpy(ranker._model.artefact.vocab.surface_index(["cart"]))
    queries = torch.from_numpy(Vocab.query_rows(shopper.queries)).unsqueeze(0)
    assert int(surface) == 1 + sorted(SURFACES).index("cart")
    with torch.inference_mode():
        for c, item in enumerate(cands):
            batch = Batch(history, session, torch.tensor([shopper.at_ms]),
                          torch.from_numpy(index([item])).view(1, 1), counts[c].view(1, 1, -1),
                          torch.zeros(1, 1), sigs[c].view(1, 1, -1), surface, queries)
            naive = float(model(batch)[0, 0])
            assert served[item] == pytest.approx(naive, abs=1e-5)
            home = float(model(replace(batch, surface=surface - 1))[0, 0])
            assert home != pytest.approx(naive, abs=1e-4)  # another surface scores otherwise
    # the explanations (attention weights, gate) agree between the backends too
    eager = ranker.rank(RankRequest("u0", candidates=cands, k=len(cands), explain=True, surface="cart")).explanations
    assert resp.explanations is not None and eager is not None
    for a, b in zip(resp.explanations, eager, strict=True):
        assert a.item_id == b.item_id and a.session_weight == pytest.approx(b.session_weight, abs=1e-5)
        assert [e.weight for e in a.history] == pytest.approx([e.weight for e in b.history], abs=1e-5)


def test_explanations_point_at_the_events_attended_to(shop: Shop, ranker: Ranker) -> None:
    resp = ranker.rank(RankRequest("u0", k=6, explain=True))
    assert resp.explanations is not None
    top = [it.item_id for it in resp.items][: ranker.config.explain_items]
    assert [e.item_id for e in resp.explanations] == top
    shopper = Shopper.read(shop.features, "u0")
    history = {(e["item_id"], e["ts"]) for e in shopper.history}
    session = {(e["item_id"], e["ts"]) for e in shopper.session}
    for ex in resp.explanations:
        assert 0.0 <= ex.session_weight <= 1.0
        for events, seen in ((ex.history, history), (ex.session, session)):
            assert 0 < len(events) <= ranker.config.explain_events
            weights = [e.weight for e in events]
            assert weights == sorted(weights, reverse=True) and all(0 < w <= 1 for w in weights)
            assert all((e.item_id, e.ts) in seen for e in events)
    assert ranker.rank(RankRequest("u0", k=6)).explanations is None


def trending_order(shop: Shop, items: list[str]) -> list[str]:
    trend = item_counts(shop.features, "item_trending_2h", items)
    pop = item_counts(shop.features, "item_count_28d", items)
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (-trend[i], -pop[i], i))]


CANDS = ["i1", "i16", "i20", "i40", "i48", "i49", "i60"]


def test_no_model_answers_with_the_trending_fallback(shop: Shop) -> None:
    r = Ranker(shop.features, shop.catalog, None, RankConfig(hygiene=HygieneRules(max_category_share=1.0)))
    resp = r.rank(RankRequest("u0", candidates=CANDS, k=len(CANDS)))
    r.close()
    assert (resp.fallback, resp.fallback_reason, resp.model_version) == ("trending", "no_model", None)
    assert [it.item_id for it in resp.items] == trending_order(shop, CANDS)
    assert_servable(shop, resp)


@pytest.fixture
def faulty(ranker: Ranker) -> Iterator[Ranker]:
    ranker.config = RankConfig(hygiene=HygieneRules(max_category_share=1.0), budget_ms=5_000)
    yield ranker
    ranker.fault = None


def test_model_error_falls_back(faulty: Ranker) -> None:
    def boom(stage: str) -> None:
        if stage == "model":
            raise RuntimeError("forced model error")

    faulty.fault = boom
    resp = faulty.rank(RankRequest("u0", candidates=CANDS, k=5))
    assert (resp.fallback, resp.fallback_reason, resp.model_version) == ("trending", "model_error", None)
    assert len(resp.items) == 5


@pytest.mark.parametrize("stage", ["model", "features"])
def test_blown_budget_falls_back_on_time(faulty: Ranker, stage: str) -> None:
    def slow(s: str) -> None:
        if s == stage:
            time.sleep(0.3)

    faulty.fault = slow
    t = time.perf_counter()
    resp = faulty.rank(RankRequest("u0", candidates=CANDS, k=5, budget_ms=40))
    elapsed = time.perf_counter() - t
    assert (resp.fallback, resp.fallback_reason) == ("trending", "timeout")
    if stage == "model":  # the deadline abandons the model pass: the answer comes at the budget
        assert elapsed < 0.25
    faulty.fault = None
    assert faulty.rank(RankRequest("u0", candidates=CANDS, k=5)).fallback is None  # and it recovers


def test_async_deadline_too(faulty: Ranker) -> None:
    faulty.fault = lambda s: time.sleep(0.3) if s == "model" else None
    resp = asyncio.run(faulty.arank(RankRequest("u0", candidates=CANDS, k=5, budget_ms=40)))
    assert resp.fallback_reason == "timeout"


def test_feature_error_falls_back_with_and_without_candidates(shop: Shop, faulty: Ranker) -> None:
    def broken(stage: str) -> None:
        if stage == "features":
            raise KeyError("forced feature lookup error")

    faulty.popular.refresh()
    faulty.fault = broken
    resp = faulty.rank(RankRequest("u0", candidates=CANDS, k=len(CANDS)))
    assert (resp.fallback, resp.fallback_reason) == ("trending", "feature_error")
    assert [it.item_id for it in resp.items] == trending_order(shop, CANDS)
    resp = faulty.rank(RankRequest("u0", k=5))
    assert resp.fallback_reason == "feature_error" and resp.candidate_source == "candidate_stage"
    assert [it.item_id for it in resp.items] == faulty.popular.cached().top[:5]


def test_fallback_chain_trending_then_popularity_then_input_order() -> None:
    items = ["a", "b", "c"]

    def fail(_: object) -> list[float]:
        raise RuntimeError("unreadable")

    assert fallback_ranking(items, lambda _: [0, 2, 1], lambda _: [9, 0, 0]) == (
        "trending", [("b", 2.0), ("c", 1.0), ("a", 0.0)])
    assert fallback_ranking(items, lambda _: [1, 0, 1], lambda _: [0, 5, 3])[1][0] == ("c", 1.0)  # tie -> pop
    assert fallback_ranking(items, fail, lambda _: [1, 3, 2])[0] == "popularity"
    assert fallback_ranking(items, lambda _: [0, 0, 0], lambda _: [1, 3, 2]) == (
        "popularity", [("b", 3.0), ("c", 2.0), ("a", 1.0)])
    assert fallback_ranking(items, fail, fail) == ("input_order", [("a", 0.0), ("b", 0.0), ("c", 0.0)])


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (RankRequest("u0", candidates=[f"i{n}" for n in range(501)]), "at most 500"),
        (RankRequest("u0", k=0), "k must be"),
        (RankRequest("u0", budget_ms=0), "budget_ms"),
        (RankRequest(""), "user_id"),
    ],
)
def test_bad_requests_are_refused(ranker: Ranker, req: RankRequest, message: str) -> None:
    with pytest.raises(RankRequestError, match=message):
        ranker.rank(req)


def test_counters_follow_the_model_order(shop: Shop) -> None:
    c = counters(shop.features, "u0", ["i17", "ghost"])
    assert c.shape == (2, 3) and c.dtype == np.float32
    assert c[0, 0] == 2  # u0 viewed and carted i17 in the session
    assert c[1].tolist() == [0.0, 0.0, 0.0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cands=st.lists(st.sampled_from([f"i{n}" for n in range(64)] + ["ghost"]), max_size=40),
    k=st.integers(1, 30),
    user=st.sampled_from(["u0", "u1", "u9"]),
)
def test_every_response_is_servable(shop: Shop, ranker: Ranker, cands: list[str], k: int, user: str) -> None:
    resp = ranker.rank(RankRequest(user, candidates=cands, k=k))
    assert resp.fallback is None and len(resp.items) <= k
    assert {it.item_id for it in resp.items} <= set(cands)
    assert_servable(shop, resp, frozenset(Shopper.read(shop.features, user).purchased))
    cats = [it.category for it in resp.items]
    assert all(cats.count(c) <= ranker.config.hygiene.category_cap(k) for c in cats)
