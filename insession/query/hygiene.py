"""Hygiene checks on feature values before they are served, with a documented fallback for empty lists.

Rules (each drop is counted by feature and reason):

- Item lists (distinct_topk/topk_count over `item_id`, covisit, last over `item_id`): items the
  catalogue does not know (`unknown_item`) or marks unavailable (`unavailable_item`) are removed; a
  list must not recommend what cannot be sold.
- Event sequences (last_n): events of items the catalogue does not know are removed (`unknown_item`);
  unavailable items stay, because what the shopper did is still true.
- Category lists (distinct_topk over `category`/`subcategory`): missing categories (events of unknown
  items) are removed (`unknown_category`).
- Fallback: an item or category list that is empty after the checks (a new shopper, a cold item) is
  replaced by the global trending list (the first declared global topk_count over `item_id`,
  e.g. `trending_items_2h`, itself cleaned): its items, or the distinct categories of its items, in
  trending order, at most the declared k. The answer names the fallback; it is counted as
  `empty_fallback`, or `empty` when there is nothing to fall back on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ReportDrop = Callable[[str, str, int], None]  # feature, reason, count


class Hygiene:
    """Cleans values of declared features. `item(item_id)` looks an item up in the catalogue (None: unknown);
    `read_global(name)` reads a global feature (for the fallback)."""

    def __init__(
        self,
        item: Callable[[str], Any],
        read_global: Callable[[str], Any],
        features: Callable[[], list[Any]],
        report: ReportDrop,
    ) -> None:
        self._item = item
        self._read_global = read_global
        self._features = features
        self._report = report

    def fallback_feature(self) -> Any:
        """The global trending list the fallback reads, or None if none is declared."""
        for f in self._features():
            if f.entity == "global" and f.agg == "topk_count" and f.field == "item_id":
                return f
        return None

    def _sellable(self, feature: str, items: list[Any], item_of: Callable[[Any], str]) -> list[Any]:
        unknown = unavailable = 0
        kept = []
        for x in items:
            it = self._item(item_of(x))
            if it is None:
                unknown += 1
            elif not it.available:
                unavailable += 1
            else:
                kept.append(x)
        if unknown:
            self._report(feature, "unknown_item", unknown)
        if unavailable:
            self._report(feature, "unavailable_item", unavailable)
        return kept

    def clean(self, f: Any, value: Any) -> tuple[Any, str | None]:
        """The value fit to serve, and the name of the feature it fell back to (or None)."""
        kind = _list_kind(f)
        if f.agg == "last_n":
            known = [e for e in value if self._item(e["item_id"]) is not None]
            if len(known) < len(value):
                self._report(f.name, "unknown_item", len(value) - len(known))
            return known, None
        if f.agg == "last" and f.field == "item_id":
            if value is not None and not self._sellable(f.name, [value], str):
                return None, None
            return value, None
        if kind is None:
            return value, None
        if kind == "category":
            cleaned = [c for c in value if c]
            if len(cleaned) < len(value):
                self._report(f.name, "unknown_category", len(value) - len(cleaned))
        elif f.agg == "distinct_topk":
            cleaned = self._sellable(f.name, value, str)
        else:
            cleaned = self._sellable(f.name, value, lambda d: d["item_id"])
        if cleaned:
            return cleaned, None
        return self._fallback(f, kind)

    def _fallback(self, f: Any, kind: str) -> tuple[Any, str | None]:
        trend = self.fallback_feature()
        if trend is None or trend.name == f.name:
            self._report(f.name, "empty", 1)
            return [], None
        top = self._sellable(trend.name, self._read_global(trend.name), lambda d: d["item_id"])
        if kind == "category":
            out: list[Any] = []
            for d in top:
                cat = getattr(self._item(d["item_id"]), f.field)
                if cat and cat not in out:
                    out.append(cat)
        elif f.agg == "distinct_topk":
            out = [d["item_id"] for d in top]
        else:
            out = [{"item_id": d["item_id"], "count": d["count"]} for d in top]
        out = out[: f.k] if f.k else out
        self._report(f.name, "empty_fallback" if out else "empty", 1)
        return out, (trend.name if out else None)


def _list_kind(f: Any) -> str | None:
    """ "item" or "category" for the list-valued features the rules above clean; None otherwise."""
    if f.agg == "covisit" or (f.agg in ("distinct_topk", "topk_count") and f.field == "item_id"):
        return "item"
    if f.agg == "distinct_topk" and f.field in ("category", "subcategory"):
        return "category"
    return None
