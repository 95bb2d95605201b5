"""Hygiene checks on a ranked list before it leaves the service: the rules, and counts of what they drop.

The rules, applied in rank order (the first, highest-scored occurrence of an item wins):

1. duplicates: an item appears at most once;
2. unknown items (not in the catalogue) and unavailable items are dropped;
3. an item purchased in the current session is dropped, unless its category or subcategory is
   replenishable (`HygieneRules.replenishable`: milk, nappies... may be bought again in one visit);
4. at most `max_category_share` of the requested list (`ceil(share * k)`, at least 1) comes from one
   category; an item over its category's cap is dropped, and the next eligible item moves up. The
   list is then shorter than k only when the candidates cannot fill it within the cap.

The candidate stage uses the same `eligible` predicate (rules 2-3), so it never proposes an item
that hygiene would drop.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from insession.log.catalog import Catalog

REASONS: tuple[str, ...] = ("duplicate", "unknown", "unavailable", "purchased", "category_cap")


@dataclass(frozen=True)
class HygieneRules:
    """What a served list must respect (see the module docstring)."""

    max_category_share: float = 0.5
    replenishable: frozenset[str] = field(default_factory=frozenset)  # category or subcategory names

    def __post_init__(self) -> None:
        if not 0.0 < self.max_category_share <= 1.0:
            raise ValueError("max_category_share must be in (0, 1]")

    def category_cap(self, k: int) -> int:
        return max(1, math.ceil(self.max_category_share * k - 1e-9))


def purchased_in(session: Iterable[Mapping[str, Any]]) -> set[str]:
    """Items bought in the session (`session_seq` events): what rule 3 applies to."""
    return {e["item_id"] for e in session if e["action"] == "purchase"}


def ineligible_reason(
    item_id: str, catalog: Catalog, purchased: Collection[str], rules: HygieneRules
) -> str | None:
    """Why `item_id` may not be served (rules 2-3), or None when it may."""
    item = catalog.get(item_id)
    if item is None:
        return "unknown"
    if not item.available:
        return "unavailable"
    if item_id in purchased and item.category not in rules.replenishable \
            and item.subcategory not in rules.replenishable:
        return "purchased"
    return None


def eligible(item_id: str, catalog: Catalog, purchased: Collection[str], rules: HygieneRules) -> bool:
    return ineligible_reason(item_id, catalog, purchased, rules) is None


def apply_hygiene(
    ranked: Iterable[tuple[str, float]],
    k: int,
    catalog: Catalog,
    purchased: Collection[str],
    rules: HygieneRules,
) -> tuple[list[tuple[str, float]], Counter[str]]:
    """The first k (item, score) pairs of `ranked` (best first) that pass every rule, and drops by reason."""
    out: list[tuple[str, float]] = []
    drops: Counter[str] = Counter()
    seen: set[str] = set()
    per_category: Counter[str] = Counter()
    cap = rules.category_cap(k)
    for item_id, score in ranked:
        if len(out) >= k:
            break
        if item_id in seen:
            drops["duplicate"] += 1
            continue
        seen.add(item_id)
        reason = ineligible_reason(item_id, catalog, purchased, rules)
        if reason is not None:
            drops[reason] += 1
            continue
        category = catalog.get(item_id).category  # type: ignore[union-attr]  # eligible means known
        if per_category[category] >= cap:
            drops["category_cap"] += 1
            continue
        per_category[category] += 1
        out.append((item_id, score))
    return out, drops
