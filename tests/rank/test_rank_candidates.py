"""The candidate stage: source priority, quotas, eligibility, and the online stage over real features."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from insession.rank import CandidateQuotas, CandidateSources, PopularItems, Ranker, propose, sources_for
from insession.rank.inputs import Shopper, covisit_counts, item_counts

from .shop import COLD, HOUR, T0, Shop, items

ITEM_IDS = [it.item_id for it in items()]


def test_sources_in_priority_order_with_quotas_passed_down() -> None:
    sources = CandidateSources(
        session_items=["a", "b", "a"],
        covisit={"a": ["a1", "a2", "a3"], "b": ["b1", "a1"]},
        history_items=["h1", "a", "h2", "h3"],
        categories=["x", "y"],
        category_popular={"x": ["x1", "x2"], "y": ["y1"]},
        trending=["t1", "a", "t2"],
        popular=["p1", "p2"],
    )
    quotas = CandidateQuotas(n=13, session=3, covisit=2, history=2, category=2)
    got = propose(sources, lambda i: i != "x2", quotas)
    # session: 2 of 3 (the unused slot passes to covisit); covisit round-robin: 3; history: 2 (skipping "a",
    # already proposed); categories round-robin: 2; then trending and popular fill the rest, skipping what
    # was already proposed
    assert got == ["a", "b", "a1", "b1", "a2", "h1", "h2", "x1", "y1", "t1", "t2", "p1", "p2"]


def test_empty_sources_propose_nothing() -> None:
    assert propose(CandidateSources(), lambda i: True) == []


names = st.text(alphabet="abcdef", min_size=1, max_size=2)
# random sources, items that are not eligible, and a total quota
SOURCES = {
    "session": st.lists(names, max_size=10),
    "covisit": st.dictionaries(names, st.lists(names, max_size=6), max_size=6),
    "popular": st.lists(names, max_size=30),
    "banned": st.sets(names, max_size=5),
    "n": st.integers(1, 40),
}


@settings(max_examples=100, deadline=None)
@given(**SOURCES)
def test_proposals_are_distinct_eligible_and_bounded(
    session: list[str], covisit: dict[str, list[str]], popular: list[str], banned: set[str], n: int
) -> None:
    sources = CandidateSources(session_items=session, covisit=covisit, trending=popular[::2], popular=popular)
    got = propose(sources, lambda i: i not in banned, CandidateQuotas(n=n, session=3, covisit=4, category=2))
    assert len(got) == len(set(got)) <= n
    assert not set(got) & banned
    if len(got) < n:  # the last source (trending, popular) has no quota of its own: all of it got in
        assert set(popular) - banned <= set(got)


def test_online_stage_reads_session_covisit_categories_and_trending(shop: Shop, ranker: Ranker) -> None:
    shopper = Shopper.read(shop.features, "u0")
    got = ranker._propose(shopper, covisit_counts(shop.features, shopper.session, ranker.config.quotas.session))
    session_items = ["i62", "i17", "i16"]  # most recent first; i18 was bought in the session
    assert got[:3] == session_items
    assert "i18" not in got
    assert "i40" in got  # co-visited with i16 by u1..u5
    assert got.index("i11") < got.index("i48")  # u0's most recent history item, before trending / popular
    assert {"i48", "i49", "i50", "i51"} <= set(got)  # trending / popular
    assert "i5" not in got  # unavailable
    assert len(got) == len(set(got)) <= ranker.config.quotas.n
    assert all(shop.catalog.get(i) is not None for i in got)
    assert COLD[2] in got  # a cold (new) item viewed in the session is still a candidate


def test_sources_for_shapes_feature_values_as_the_service_reads_them() -> None:
    session = [{"item_id": i, "category": c, "action": a} for i, c, a in [
        ("a", "x", "view"), ("b", None, "search"), ("a", "x", "search"), ("c", "y", "view"), ("b", None, "search")]]
    asked: list[str] = []
    sources = sources_for(session, ["z", "x"], lambda i: asked.append(i) or [f"{i}1"], {"x": ["x1"]}, ["t"], ["p"],
                          CandidateQuotas(session=2), history=["h1", "h2", "h1", "h3"],
                          search_results=lambda i: [f"{i}-result"])
    assert list(sources.history_items) == ["h3", "h1", "h2"]  # distinct, most recent first
    assert list(sources.session_items) == ["b", "c", "a", "b", "a"]  # most recent first
    assert asked == ["b", "c"] and dict(sources.covisit) == {"b": ["b1"], "c": ["c1"]}  # 2 most recent distinct
    assert list(sources.searched) == [["b-result"], ["a-result"]]  # per distinct search, most recent first
    no_search = sources_for(session, [], lambda i: [], {}, [], [], CandidateQuotas(search=0),
                            search_results=lambda i: [f"{i}-result"])
    assert list(no_search.searched) == []  # a zero quota asks for no results
    assert list(sources.categories) == ["y", "x", "z"]  # session categories first, then the 15-day top


def test_search_results_come_after_the_session_and_keep_their_unused_quota() -> None:
    sources = CandidateSources(
        session_items=["a"],
        searched=[["s1", "a", "s2"], ["r1"]],
        covisit={"a": ["a1", "a2", "a3"]},
        popular=["p1", "p2", "p3"],
    )
    quotas = CandidateQuotas(n=8, session=2, search=5, covisit=2, history=0, category=0)
    got = propose(sources, lambda i: i != "s2", quotas)
    # session: 1 of 2 (one slot passes to covisit); search round-robin: s1, r1 ("a" was proposed, s2 is not
    # eligible), 3 of its 5 slots unused and dropped; covisit 2 + 1; then popular up to n
    assert got == ["a", "s1", "r1", "a1", "a2", "a3", "p1", "p2"]


@settings(max_examples=100, deadline=None)
@given(**SOURCES, history=st.lists(names, max_size=10), search=st.integers(0, 10))
def test_without_a_search_the_search_quota_changes_nothing(
    session: list[str], covisit: dict[str, list[str]], history: list[str], popular: list[str], banned: set[str],
    n: int, search: int,
) -> None:
    sources = CandidateSources(session_items=session, covisit=covisit, history_items=history,
                               trending=popular[::2], popular=popular)

    def lists(q: int) -> list[str]:
        quotas = CandidateQuotas(n=n, session=3, search=q, covisit=4, history=3, category=2)
        return propose(sources, lambda i: i not in banned, quotas)
    assert lists(search) == lists(0)


def test_search_lists_hold_every_available_item_of_the_subcategory_by_popularity(shop: Shop) -> None:
    popular = PopularItems(shop.features, shop.catalog)
    popular.refresh()
    counts = dict(zip(ITEM_IDS, item_counts(shop.features, "item_count_28d", ITEM_IDS), strict=True))
    for sub in {it.subcategory for it in items()}:
        members = [it.item_id for it in items() if it.subcategory == sub and it.available]
        expected = sorted(members, key=lambda i: (-counts[i], i))
        assert popular.cached().per_subcategory[sub] == expected  # unseen items too, last, by id
        assert popular.search_results(members[0]) == expected
    assert any(counts[i] == 0 for i in ITEM_IDS) and any(counts[i] > 0 for i in ITEM_IDS)
    assert popular.search_results("not-in-the-catalogue") == []


def test_online_stage_proposes_a_search_s_results_after_the_session(shop: Shop, ranker: Ranker) -> None:
    shop.add("u-search", "i3", "search", T0 + 100 * HOUR, query="s0 things")
    shopper = Shopper.read(shop.features, "u-search")
    got = ranker._propose(shopper, covisit_counts(shop.features, shopper.session, ranker.config.quotas.session))
    results = ranker.popular.search_results("i3")
    eligible = [i for i in results if i != "i3" and shop.catalog.get(i).available]  # type: ignore[union-attr]
    assert got[0] == "i3" and got[1 : 1 + len(eligible)] == eligible[: ranker.config.quotas.search]
