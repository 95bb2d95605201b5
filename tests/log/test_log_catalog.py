"""The item catalogue: durable upserts, enrichment on ingest, restart."""

from __future__ import annotations

from pathlib import Path

from conftest import make_event

from insession.log.catalog import Catalog
from insession.schema import ITEM_ARROW_SCHEMA, Item, price_band


def test_upsert_get_enrich_and_restart(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.sqlite")
    assert len(cat) == 0
    items = [Item(f"i{n}", f"c{n % 3}", f"sc{n % 6}", 1.5 * n, n % 2 == 0, "acme", f"thing {n}", 10)
             for n in range(10)]
    assert cat.upsert(items) == 10
    assert cat.get("i4") == items[4]
    assert cat.get("nope") is None
    updated = Item("i4", "c9", "sc9", None, False, None, None, 20)
    assert cat.upsert([updated]) == 1
    assert len(cat) == 10
    events = [make_event(4), make_event(5), make_event(200)]  # i4, i5 and an unknown item i99
    for e in events:
        e.category = e.subcategory = None
    assert cat.enrich(events) == 1
    assert [(e.category, e.subcategory) for e in events] == [("c9", "sc9"), ("c2", "sc5"), (None, None)]
    assert [(e.brand, e.price, e.price_band) for e in events] == [
        (None, None, None), ("acme", 7.5, "<10"), (None, None, None)]
    table = cat.to_arrow()
    assert table.schema.equals(ITEM_ARROW_SCHEMA)
    assert table.num_rows == 10
    cat.close()
    again = Catalog(tmp_path / "catalog.sqlite")  # durable: the reopened catalogue is the same
    assert len(again) == 10
    assert again.get("i4") == updated
    assert again.get("i3") == items[3]
    assert again.to_arrow().sort_by("item_id").equals(table.sort_by("item_id"))
    again.close()


def test_price_bands_cover_every_price_once() -> None:
    assert [price_band(p) for p in (None, 0.0, 9.99, 10, 24.5, 99, 100, 999.99, 1000, 1e9)] == [
        None, "<10", "<10", "10-25", "10-25", "50-100", "100-250", "500-1000", "1000+", "1000+"]
