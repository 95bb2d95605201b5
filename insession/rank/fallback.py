"""Fallback rankings for when the model cannot answer in time: trending, then popularity, then as given.

The chain: `trending` orders candidates by their 2-hour count, ties broken by 28-day popularity; when
the trending counters cannot be read (or are all zero), `popularity` orders by the 28-day count; when
neither can be read, `input_order` keeps the candidates' order. Scores are the counts used, so the
client can tell a fallback list from a model list by the `fallback` field, not by guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

FALLBACKS: tuple[str, ...] = ("trending", "popularity", "input_order")

Counts = Callable[[Sequence[str]], list[float]]


def _safe(counts: Counts, items: Sequence[str]) -> list[float] | None:
    """The counts, or None when they cannot be read (the next fallback then applies)."""
    try:
        return counts(items)
    except Exception:  # any failure of a feature read moves down the chain
        return None


def fallback_ranking(
    items: Sequence[str], trending: Counts, popularity: Counts
) -> tuple[str, list[tuple[str, float]]]:
    """(which fallback was used, [(item, score)] best first)."""
    pop = _safe(popularity, items)
    trend = _safe(trending, items)
    if trend is not None and any(trend):
        tie = pop or [0.0] * len(items)
        order = sorted(range(len(items)), key=lambda i: (-trend[i], -tie[i], i))
        return "trending", [(items[i], float(trend[i])) for i in order]
    if pop is not None:
        order = sorted(range(len(items)), key=lambda i: (-pop[i], i))
        return "popularity", [(items[i], float(pop[i])) for i in order]
    return "input_order", [(item, 0.0) for item in items]
