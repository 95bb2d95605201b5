"""Hygiene rules on served lists: duplicates, unknown/unavailable items, session purchases, category share."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.log.catalog import Catalog
from insession.rank import HygieneRules, apply_hygiene
from insession.schema import Item

from .shop import items


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    c = Catalog(Path(tmp_path_factory.mktemp("hygiene")) / "catalog.sqlite")
    c.upsert(items())
    return c


def test_each_rule_drops_and_counts(catalog: Catalog) -> None:
    ranked = [("i1", 9.0), ("i1", 8.0), ("nope", 7.0), ("i5", 6.0), ("i2", 5.0), ("i3", 4.0), ("i20", 3.0)]
    kept, drops = apply_hygiene(ranked, 10, catalog, {"i2"}, HygieneRules(max_category_share=1.0))
    assert kept == [("i1", 9.0), ("i3", 4.0), ("i20", 3.0)]  # first occurrence wins, order kept
    assert drops == Counter(duplicate=1, unknown=1, unavailable=1, purchased=1)


def test_replenishable_categories_may_repeat_a_purchase(catalog: Catalog) -> None:
    ranked = [("i2", 2.0), ("i40", 1.0)]  # i2 is in c0, i40 in c2; both bought in the session
    rules = HygieneRules(max_category_share=1.0, replenishable=frozenset({"c0"}))
    kept, drops = apply_hygiene(ranked, 10, catalog, {"i2", "i40"}, rules)
    assert kept == [("i2", 2.0)]
    assert drops == Counter(purchased=1)
    by_subcategory = HygieneRules(max_category_share=1.0, replenishable=frozenset({"s5"}))  # i40 is in s5
    assert apply_hygiene(ranked, 10, catalog, {"i2", "i40"}, by_subcategory)[0] == [("i40", 1.0)]


def test_category_cap_lets_other_categories_move_up(catalog: Catalog) -> None:
    ranked = [(f"i{n}", float(100 - n)) for n in (0, 1, 2, 3, 16, 4, 17, 32)]  # c0 c0 c0 c0 c1 c0 c1 c2
    kept, drops = apply_hygiene(ranked, 4, catalog, set(), HygieneRules(max_category_share=0.5))
    assert [i for i, _ in kept] == ["i0", "i1", "i16", "i17"]  # at most ceil(0.5 * 4) = 2 from c0
    assert drops["category_cap"] == 3


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="max_category_share"):
        HygieneRules(max_category_share=0.0)


ids = st.sampled_from([f"i{n}" for n in range(64)] + ["ghost", "i5"])


@settings(max_examples=150, deadline=None)
@given(
    ranked=st.lists(st.tuples(ids, st.floats(-5, 5, allow_nan=False)), max_size=80),
    k=st.integers(1, 30),
    share=st.sampled_from([0.2, 0.34, 0.5, 1.0]),
    purchased=st.sets(ids, max_size=6),
    replenishable=st.sets(st.sampled_from(["c0", "c1", "c2", "c3", "s0", "s3", "s7"]), max_size=3),
)
def test_served_lists_always_satisfy_every_rule(
    catalog: Catalog, ranked: list[tuple[str, float]], k: int, share: float, purchased: set[str],
    replenishable: set[str],
) -> None:
    rules = HygieneRules(share, frozenset(replenishable))
    kept, drops = apply_hygiene(ranked, k, catalog, purchased, rules)
    got = [i for i, _ in kept]
    assert len(got) == len(set(got)) <= k
    for item_id in got:
        item: Item | None = catalog.get(item_id)
        assert item is not None and item.available
        assert item_id not in purchased or {item.category, item.subcategory} & replenishable
    per_cat = Counter(catalog.get(i).category for i in got)  # type: ignore[union-attr]
    assert max(per_cat.values(), default=0) <= rules.category_cap(k)
    # kept items keep their rank order, and nothing eligible was dropped while the list had room
    positions = [next(p for p, (i, _) in enumerate(ranked) if i == g) for g in got]
    assert positions == sorted(positions)
    if len(got) < k:
        assert sum(drops.values()) == len(ranked) - len(got)
