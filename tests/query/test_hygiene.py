"""Hygiene on served features: unknown and unavailable items filtered, empty lists fall back, all counted."""

from __future__ import annotations

from insession.serve.metrics import Metrics

from .conftest import CATALOGUED, World


def _drops(m: Metrics, feature: str, reason: str) -> float:
    return (
        m.registry.get_sample_value(
            "insession_feature_hygiene_drops_total", {"feature": feature, "reason": reason}
        )
        or 0.0
    )


def _sellable(world: World, item_id: str) -> bool:
    item = world.catalog.get(item_id)
    return item is not None and item.available


def test_trending_items_never_include_unknown_or_unavailable_items(world: World) -> None:
    metrics = Metrics()
    metrics.bind(world.handle())
    raw = world.features.read("trending_items_2h", None)
    bad = [d for d in raw if not _sellable(world, d["item_id"])]
    assert bad, "the fixture has unknown (>= i55) and unavailable (every fifth) items among the trending ones"
    r = world.query.execute(
        "SELECT item_id, count(*) AS n FROM events WHERE ts > now() - INTERVAL 2 HOUR "
        "GROUP BY item_id ORDER BY n DESC LIMIT 50"
    )
    served = [row[0] for row in r.rows]
    assert served == [d["item_id"] for d in raw if _sellable(world, d["item_id"])]
    unknown = sum(1 for d in raw if world.catalog.get(d["item_id"]) is None)
    unavailable = len(bad) - unknown
    assert _drops(metrics, "trending_items_2h", "unknown_item") >= unknown
    assert _drops(metrics, "trending_items_2h", "unavailable_item") >= unavailable


def test_sequences_drop_unknown_items_but_keep_unavailable_ones(world: World) -> None:
    values, fallbacks = world.query.read_features("user", "u1")
    raw = world.features.read("session_seq", "u1")
    assert any(int(e["item_id"][1:]) >= CATALOGUED for e in raw)
    assert values["session_seq"] == [e for e in raw if int(e["item_id"][1:]) < CATALOGUED]
    assert any(not world.catalog.get(e["item_id"]).available for e in values["session_seq"])
    assert "session_seq" not in fallbacks


def test_a_new_shopper_gets_the_documented_fallback(world: World) -> None:
    metrics = Metrics()
    metrics.bind(world.handle())
    r = world.query.execute(
        "SELECT DISTINCT category FROM events WHERE user_id = :user "
        "AND ts > now() - INTERVAL 15 DAY ORDER BY ts DESC LIMIT 5",
        {"user": "nobody"},
    )
    assert r.fallbacks == {"top_categories_15d": "trending_items_2h"}
    expected: list[str] = []
    for d in world.features.read("trending_items_2h", None):
        if _sellable(world, d["item_id"]):
            cat = world.catalog.get(d["item_id"]).category
            if cat not in expected:
                expected.append(cat)
    assert [row[0] for row in r.rows] == expected[:5]
    assert _drops(metrics, "top_categories_15d", "empty_fallback") == 1


def test_a_cold_item_gets_trending_items_as_neighbours(world: World) -> None:
    values, fallbacks = world.query.read_features("item", "brand-new-item")
    assert fallbacks == {"covisit": "trending_items_2h"}
    assert values["covisit"] and all(_sellable(world, d["item_id"]) for d in values["covisit"])
    assert len(values["covisit"]) <= 20
    assert values["item_trending_2h"] == 0  # counters have no fallback: zero is the truth
