"""The candidate stage: about 60 items worth reranking for a shopper right now, from six sources.

Sources, in priority order, each with a quota (unused quota passes down to the next source, except the
search source's: see 2):

1. items of the current session, most recent first;
2. the session's searches: for each search event of the session (most recent first), the items of the
   subcategory of the result it showed, most popular (28 days) first, round-robin across searches. A search
   log names one result, not the item the shopper goes on to pick; on the realistic shop only 3 of 15
   search-surface add-to-carts were proposed without this source. Its unused quota is dropped, not passed
   down, so a session without a search gets exactly the lists it got before the source existed (Taobao's
   sample has no searches);
3. co-visitation neighbours of the session's items (most recent session item first, neighbours
   interleaved round-robin so every recent item contributes);
4. items of the shopper's history before this session, most recent first (shoppers come back for what
   they looked at days ago: on Taobao these lift the stage's recall from 14.7 % to 18.5 %);
5. popular items (28 days) of the shopper's categories: the session's categories, most recent first,
   then the top categories of the last 15 days;
6. global trending (2 hours), then global popularity (28 days), until `n` items are proposed.

Every proposal passes an eligibility predicate (the hygiene rules for existing, available,
not-already-purchased items), so nothing is proposed that could not be served. `propose` is a pure
function of its inputs: the online service feeds it from the feature engine, and offline evaluation can
feed it from point-in-time features, so both use the same candidate stage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from insession.features import FeatureEngine
from insession.features.engine import yield_rest
from insession.log.catalog import Catalog
from insession.rank.inputs import item_counts

# Items whose counts the popular lists' rebuild reads per lock hold. The whole 50,000-item catalogue read
# under one hold kept the item unit locked ~300 ms: every ranking (read on the event loop) and every ingest
# (its writer step reaches the item units) waited, a spike of every request each rebuild (bench_mixed).
REFRESH_CHUNK = 1_000
# A background rebuild's share of the time between chunks: it is ~220 ms of Python at 50,000 items, and run
# flat out it took the GIL from requests for that long, still a ~400 ms spike every rebuild in bench_mixed.
REFRESH_DUTY = 0.25


@dataclass(frozen=True)
class CandidateQuotas:
    """How many proposals each source may contribute at most (the total is `n`)."""

    n: int = 60
    session: int = 15
    search: int = 10
    covisit: int = 20
    history: int = 15
    category: int = 10


@dataclass
class CandidateSources:
    """What the candidate stage reads; every list is best (most recent / most frequent) first."""

    session_items: Sequence[str] = ()  # the session's items, most recent first (repeats allowed)
    searched: Sequence[Sequence[str]] = ()  # per search of the session, most recent first: its subcategory's items
    covisit: Mapping[str, Sequence[str]] = field(default_factory=dict)  # item -> co-visited items
    history_items: Sequence[str] = ()  # the shopper's items before this session, most recent first (distinct)
    categories: Sequence[str] = ()  # the shopper's categories, most relevant first
    category_popular: Mapping[str, Sequence[str]] = field(default_factory=dict)  # category -> items
    trending: Sequence[str] = ()
    popular: Sequence[str] = ()


def sources_for(
    session: Sequence[Mapping[str, Any]],
    top_categories: Sequence[str],
    covisit: Callable[[str], Sequence[str]],
    category_popular: Mapping[str, Sequence[str]],
    trending: Sequence[str],
    popular: Sequence[str],
    quotas: CandidateQuotas = CandidateQuotas(),
    *,
    history: Sequence[str] = (),
    search_results: Callable[[str], Sequence[str]] = lambda _: (),
) -> CandidateSources:
    """The sources for one shopper from feature values: `session` is `session_seq` (oldest first),
    `history` the item ids of `history_seq` (oldest first), `top_categories` is `top_categories_15d`,
    `covisit(item)` the `covisit` neighbours of an item (read for the `quotas.session` most recent distinct
    session items only), `search_results(item)` the items of the subcategory of a search event's item, most
    popular first (asked once per distinct searched item, most recent first)."""
    session_items = [e["item_id"] for e in reversed(session)]
    recent = list(dict.fromkeys(session_items))[: quotas.session]
    session_categories = [e["category"] for e in reversed(session) if e["category"]]
    searches = dict.fromkeys(e["item_id"] for e in reversed(session) if e["action"] == "search")
    return CandidateSources(
        session_items=session_items,
        searched=[search_results(i) for i in searches] if quotas.search else [],
        covisit={i: covisit(i) for i in recent},
        history_items=list(dict.fromkeys(reversed(history))),
        categories=list(dict.fromkeys([*session_categories, *top_categories])),
        category_popular=category_popular,
        trending=trending,
        popular=popular,
    )


def _round_robin(lists: Iterable[Sequence[str]]) -> Iterable[str]:
    """a1, b1, c1, a2, b2, ... over lists of different lengths."""
    for row in zip_longest(*lists):
        yield from (x for x in row if x is not None)


def propose(
    sources: CandidateSources, eligible: Callable[[str], bool], quotas: CandidateQuotas = CandidateQuotas()
) -> list[str]:
    """Up to `quotas.n` distinct eligible item ids, in source priority order."""
    out: list[str] = []
    seen: set[str] = set()

    def take(items: Iterable[str], limit: int) -> int:
        """Append up to `limit` new eligible items; returns the unused part of the limit."""
        for item in items:
            if len(out) >= quotas.n or limit <= 0:
                break
            if item in seen:
                continue
            seen.add(item)
            if eligible(item):
                out.append(item)
                limit -= 1
        return limit

    session = list(dict.fromkeys(sources.session_items))  # distinct, most recent first
    left = take(session, quotas.session)
    take(_round_robin(sources.searched), quotas.search)  # its unused quota is dropped: see the module docstring
    left = take(_round_robin(sources.covisit.get(i, ()) for i in session), quotas.covisit + left)
    left = take(sources.history_items, quotas.history + left)
    categories = _round_robin(sources.category_popular.get(c, ()) for c in sources.categories)
    take(categories, quotas.category + left)
    take(chain(sources.trending, sources.popular), quotas.n)
    return out


class PopularLists(NamedTuple):
    """The popular lists, most popular (28 days) first: per category the items counted at least once, per
    subcategory every available item (counted or not: a search's results), and the global top."""

    per_category: dict[str, list[str]]
    per_subcategory: dict[str, list[str]]
    top: list[str]


class PopularItems:
    """Per-category, per-subcategory and global lists of available items by 28-day count, rebuilt when older
    than `ttl_s`.

    The first `get` builds the lists in the caller; later rebuilds run on a background thread while
    requests keep using the previous lists, so no request pays for a rebuild after the first.
    """

    def __init__(self, features: FeatureEngine, catalog: Catalog, per_category: int = 30, top: int = 200,
                 ttl_s: float = 10.0) -> None:
        self.features = features
        self.catalog = catalog
        self.per_category = per_category
        self.top = top
        self.ttl_s = ttl_s
        self._lists = PopularLists({}, {}, [])
        self._built_at: float | None = None
        self._lock = threading.Lock()

    def cached(self) -> PopularLists:
        """The current lists without building anything (empty before the first build)."""
        return self._lists

    def get(self) -> PopularLists:
        """The lists, rebuilt in the background when older than `ttl_s`."""
        if self._built_at is None:
            self.refresh()
        elif time.monotonic() - self._built_at > self.ttl_s and not self._lock.locked():
            threading.Thread(target=self.refresh, args=(REFRESH_DUTY,), name="insession-popular", daemon=True).start()
        return self._lists

    def search_results(self, item_id: str) -> list[str]:
        """A search's results for the candidate stage: the items of `item_id`'s subcategory, most popular first."""
        item = self.catalog.get(item_id)
        return [] if item is None else self._lists.per_subcategory.get(item.subcategory, [])

    def refresh(self, duty: float = 1.0) -> None:
        """Rebuild the lists; `duty` < 1 pauses after each chunk of counts (1 / duty - 1) times as long as the
        chunk took (the first build, which a ranking waits for, runs flat out)."""
        if not self._lock.acquire(blocking=False):
            return  # a rebuild is already running
        try:
            table = self.catalog.to_arrow().filter(pc.field("available"))
            ids = table["item_id"].to_pylist()
            count: list[float] = []
            for start in range(0, len(ids), REFRESH_CHUNK):  # the item unit's lock is held per chunk
                began = time.perf_counter()
                count += item_counts(self.features, "item_count_28d", ids[start : start + REFRESH_CHUNK])
                yield_rest(began, duty)
            ranked = table.select(["item_id", "category", "subcategory"]).append_column(
                "n", pa.array(count, pa.float64())).sort_by([("n", "descending"), ("item_id", "ascending")])
            per_category: dict[str, list[str]] = {}
            per_subcategory: dict[str, list[str]] = {}
            top: list[str] = []
            cap = self.per_category
            for item, category, subcategory, n in zip(*(ranked[c].to_pylist() for c in ranked.column_names),
                                                       strict=True):
                bucket = per_subcategory.setdefault(subcategory, [])
                if len(bucket) < cap:
                    bucket.append(item)
                if n > 0:
                    bucket = per_category.setdefault(category, [])
                    if len(bucket) < cap:
                        bucket.append(item)
                    if len(top) < self.top:
                        top.append(item)
            self._lists = PopularLists(per_category, per_subcategory, top)
            self._built_at = time.monotonic()
        finally:
            self._lock.release()
