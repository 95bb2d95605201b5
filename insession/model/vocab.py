"""Item vocabulary: item ids to the model's item index, with the cold-start chain for unknown items."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from insession.model.reranker import QUERY_BUCKETS, RerankerConfig

_SEP = "\x1f"
QUERY_GRAMS = 32  # hashed n-grams kept per query (words first, then character trigrams)
_WORD = re.compile(r"[^\W_]+")
SMALL_LOOKUP = 4096  # up to this many ids, items are looked up in a dict: a 30-id lookup in a 50k-item vocab
# took 1.3 ms through Arrow (a hash table of every item per call), 82 us in all this way (measured)


def _strings(values: object) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks().cast(pa.string())
    return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _positions(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each value in value_set, -1 when absent or null."""
    return pc.fill_null(pc.index_in(values, value_set=value_set), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _subcat_key(category: pa.Array, subcategory: pa.Array) -> pa.Array:
    sub = pc.coalesce(subcategory, category)  # an item without a subcategory sits directly under its category
    return pc.binary_join_element_wise(category, sub, _SEP)


@dataclass
class Vocab:
    """Index layout (insession.model.reranker): 0 pad, 1..N items, then subcategories, categories, global."""

    items: list[str]
    item_subcat: list[int]  # per item, index into subcats, -1 when the category is unknown
    subcats: list[str]  # "category<US>subcategory"
    subcat_cat: list[int]  # per subcategory, index into cats
    cats: list[str]
    surfaces: list[str] = field(default_factory=list)  # the surfaces of the training requests, sorted

    def __post_init__(self) -> None:
        self._surface_pos = {s: i + 1 for i, s in enumerate(self.surfaces)}
        self._items = pa.array(self.items, pa.string())
        self._item_pos = {item: i for i, item in enumerate(self.items)}
        self._subcats = pa.array(self.subcats, pa.string())
        self._cats = pa.array(self.cats, pa.string())

    @property
    def n_items(self) -> int:
        """Rows of the trained item table, padding included."""
        return len(self.items) + 1

    @property
    def unknown(self) -> int:
        """The index of the global-average row."""
        return self.n_items + len(self.subcats) + len(self.cats)

    def subcategory_name(self, j: int) -> str:
        """The subcategory name of row j of `subcats` (the entries are "category<US>subcategory")."""
        return self.subcats[j].split(_SEP, 1)[1]

    def surface_index(self, surfaces: Iterable[str | None]) -> np.ndarray:
        """Surface names -> int64 model indices: 1 + position in `surfaces`; 0 for a surface the training
        data never had, or none."""
        pos = self._surface_pos
        return np.array([pos.get(s, 0) if s is not None else 0 for s in surfaces], np.int64)

    @staticmethod
    def query_grams(query: str) -> list[int]:
        """A query's hashed n-gram rows in [1, QUERY_BUCKETS): its lower-cased words, then the character trigrams
        of each word padded with '#', at most QUERY_GRAMS (crc32: the same rows in every process). A query
        without a word has none."""
        words = _WORD.findall(query.lower())
        grams = [*words, *(f"#{w}#"[i : i + 3] for w in words for i in range(len(w)))]
        return [1 + zlib.crc32(g.encode()) % (QUERY_BUCKETS - 1) for g in grams[:QUERY_GRAMS]]

    @classmethod
    def query_rows(cls, queries: Iterable[str]) -> np.ndarray:
        """[Q, QUERY_GRAMS] int64: each query's `query_grams`, right-padded with 0 (the model's query input)."""
        rows = [cls.query_grams(q) for q in queries]
        out = np.zeros((len(rows), QUERY_GRAMS), np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    @classmethod
    def build(
        cls, item_id: pa.Array, category: pa.Array, subcategory: pa.Array, surfaces: Iterable[str | None] = ()
    ) -> Vocab:
        """From parallel arrays (e.g. the training period's events; `surfaces`: the training requests'
        surfaces); an item's last seen category wins."""
        t = pa.table({"item": item_id, "cat": category, "sub": subcategory}).filter(pc.is_valid(item_id))
        t = t.append_column("key", _subcat_key(t["cat"], t["sub"]))
        last = {i: (c, k) for i, c, k in zip(*(t[n].to_pylist() for n in ("item", "cat", "key")), strict=True)}
        items = sorted(last)
        cats = sorted({c for c, _ in last.values() if c is not None})
        subcats = sorted({k for _, k in last.values() if k is not None})
        cat_pos = {c: i for i, c in enumerate(cats)}
        sub_pos = {k: i for i, k in enumerate(subcats)}
        return cls(
            items=items,
            item_subcat=[sub_pos.get(last[i][1], -1) if last[i][1] is not None else -1 for i in items],
            subcats=subcats,
            subcat_cat=[cat_pos[k.split(_SEP, 1)[0]] for k in subcats],
            cats=cats,
            surfaces=sorted({s for s in surfaces if s is not None}),
        )

    def item_rows(self, item_ids: Sequence[str | None]) -> np.ndarray:
        """The trained row of each item id, 0 where it has none (an unknown or null id): a dict lookup per
        id, what serving needs for a request's few dozen ids (`lookup` adds the cold-start chain)."""
        pos = self._item_pos
        return np.fromiter((pos.get(i, -1) if i is not None else -1 for i in item_ids), np.int64, len(item_ids)) + 1

    def lookup(
        self,
        item_id: pa.Array,
        category: pa.Array | None = None,
        subcategory: pa.Array | None = None,
    ) -> np.ndarray:
        """Item ids (with their category/subcategory when known) -> int64 indices; null item ids -> 0.

        Unknown item -> its subcategory's row -> its category's row -> the global-average row.
        """
        item_id = _strings(item_id)
        n = len(item_id)
        # a request's few ids: a dict, not an Arrow hash table of every item per call
        out = self.item_rows(item_id.to_pylist()) if n <= SMALL_LOOKUP else _positions(item_id, self._items) + 1
        cat = _strings(category if category is not None else pa.nulls(n, pa.string()))
        sub = _strings(subcategory if subcategory is not None else pa.nulls(n, pa.string()))
        s = _positions(_subcat_key(cat, sub), self._subcats)
        c = _positions(cat, self._cats)
        fallback = np.where(
            s >= 0, self.n_items + s, np.where(c >= 0, self.n_items + len(self.subcats) + c, self.unknown)
        )
        out = np.where(out > 0, out, fallback)
        return np.where(pc.is_null(item_id).to_numpy(zero_copy_only=False), 0, out)

    def category_of(self, idx: np.ndarray) -> list[str | None]:
        """The category each index stands for (an item's or a cold row's); None: padding, the global row."""
        n, s = self.n_items, len(self.subcats)
        sub_of = np.array([-1, *self.item_subcat], np.int64)
        cat_of_sub = np.array(self.subcat_cat, np.int64)
        out: list[str | None] = []
        for i in np.asarray(idx).tolist():
            if 0 < i < n:
                sub = sub_of[i]
                out.append(self.cats[cat_of_sub[sub]] if sub >= 0 else None)
            elif n <= i < n + s:
                out.append(self.cats[cat_of_sub[i - n]])
            elif n + s <= i < self.unknown:
                out.append(self.cats[i - n - s])
            else:
                out.append(None)
        return out

    def config(self, **overrides: object) -> RerankerConfig:
        """A model config sized for this vocabulary."""
        return RerankerConfig(
            n_items=self.n_items,
            n_subcats=len(self.subcats),
            n_cats=len(self.cats),
            item_subcat=[-1, *self.item_subcat],
            subcat_cat=list(self.subcat_cat),
            n_surfaces=len(self.surfaces),
            **overrides,  # type: ignore[arg-type]
        )

    def save(self, path: Path) -> None:
        doc = {
            "items": self.items,
            "item_subcat": self.item_subcat,
            "subcats": self.subcats,
            "subcat_cat": self.subcat_cat,
            "cats": self.cats,
            "surfaces": self.surfaces,
        }
        path.write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        return cls(**json.loads(path.read_text()))
