"""A tiny seeded shop for the ranking tests: catalogue, online features fed with events, model artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from insession.features import FeatureEngine
from insession.log.catalog import Catalog
from insession.model import DualSequenceReranker, Vocab
from insession.model.artefact import save_artefact
from insession.schema import Event, Item

T0 = 1_763_800_000_000  # 2025-11-22 in epoch ms
MINUTE = 60_000
HOUR = 60 * MINUTE
N_CATS, SUBCATS_PER_CAT, ITEMS_PER_SUBCAT = 4, 2, 8
COLD = ("i60", "i61", "i62", "i63")  # in the catalogue, never in a model vocabulary (new items)
UNAVAILABLE = ("i5",)
SURFACES = ("home", "search", "pdp", "cart")  # the surfaces a model of the shop knows


def category_of(n: int) -> tuple[str, str]:
    sub = n // ITEMS_PER_SUBCAT
    return f"c{sub // SUBCATS_PER_CAT}", f"s{sub}"


def items() -> list[Item]:
    out = []
    for n in range(N_CATS * SUBCATS_PER_CAT * ITEMS_PER_SUBCAT):
        cat, sub = category_of(n)
        out.append(Item(f"i{n}", cat, sub, 1.0 + n, f"i{n}" not in UNAVAILABLE))
    return out


@dataclass
class Shop:
    catalog: Catalog
    features: FeatureEngine
    model_dir: Path
    offset: int = 0

    def add(self, user: str, item: str, action: str, ts: int, session: str | None = None,
            query: str | None = None) -> None:
        cat, sub = category_of(int(item[1:]))
        ev = Event(user, item, action, ts, session_id=session, category=cat, subcategory=sub,
                   ingest_ts=ts, offset=self.offset, properties=None if query is None else {"query": query})
        self.offset += 1
        self.features.update_many([ev])

    def artefact(self, name: str, seed: int, feature_hash: str | None = None) -> Path:
        """A randomly initialised (seeded) tiny model saved as a versioned artefact."""
        known = [it for it in items() if it.item_id not in COLD]
        vocab = Vocab.build(
            pa.array([it.item_id for it in known]),
            pa.array([it.category for it in known]),
            pa.array([it.subcategory for it in known]),
            SURFACES,
        )
        torch.manual_seed(seed)
        cfg = vocab.config(dim=32, n_heads=2, n_layers=1, dropout=0.0, max_history=50, max_session=20,
                           use_queries=True)  # every input the serving path can feed, the query tokens too
        model = DualSequenceReranker(cfg).eval()
        with torch.no_grad():  # the surface adapters start at zero: give them weights the tests can see
            for table in (model.adapter_wide, model.adapter_out):
                assert table is not None
                table.weight.normal_(0, 0.5)
        digest = feature_hash or self.features.registry.hash()
        return save_artefact(self.model_dir / name, model, vocab, digest, {"seed": seed})


def fill(shop: Shop) -> None:
    """u0: a long history (c0/c1), then a current session browsing c2 with a cart and a purchase.
    u0's session holds a search ("s2 sneakers").
    u1..u5: sessions that make c3 items popular and co-visit i16 with i40; u9 has no events at all."""
    t = T0
    for n in range(60):  # u0's history, in several old sessions
        t += 5 * MINUTE
        shop.add("u0", f"i{n % 16}", "add_to_cart" if n % 7 == 0 else "view", t, session=f"u0-h{n // 10}")
    for u in range(1, 6):
        for n in range(8):
            t += MINUTE
            shop.add(f"u{u}", f"i{48 + n % 4}", "view", t, session=f"u{u}-a")
        t += MINUTE
        shop.add(f"u{u}", "i16", "view", t, session=f"u{u}-b")
        t += MINUTE
        shop.add(f"u{u}", "i40", "view", t, session=f"u{u}-b")
    for item, action in (("i19", "search"), ("i16", "view"), ("i17", "view"), ("i17", "add_to_cart"),
                         ("i18", "view"), ("i18", "purchase"), ("i62", "view")):
        t += MINUTE
        shop.add("u0", item, action, t, session="u0-now", query="s2 sneakers" if action == "search" else None)


