"""Declarations: validation, the persisted registry and its hash, the SQL form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from insession.features import (
    BEFORE_SESSION,
    SESSION,
    Feature,
    FeatureRegistry,
    Window,
    default_features,
    default_registry,
    sliding,
)
from insession.features.declare import DAY_MS, HOUR_MS, MINUTE_MS
from insession.features.sql import FeatureSQLError, parse_feature, to_sql

EXTRA = [
    Feature("spend_1d", "user", "sum", sliding(DAY_MS, HOUR_MS), "properties.price", actions=("purchase",)),
    Feature("last_surface", "user", "last", field="surface"),
    Feature("cart_cats", "user", "distinct_topk", SESSION, "category", 3, actions=("add_to_cart", "purchase")),
    Feature("top_subcats", "global", "topk_count", sliding(2 * HOUR_MS, 5 * MINUTE_MS), "subcategory", 10),
    Feature("views_before", "user", "last_n", BEFORE_SESSION, k=20, actions=("view",)),
]


def test_default_feature_names_are_the_contract() -> None:
    assert set(default_registry().features) == {
        "top_categories_15d",
        "history_seq",
        "session_seq",
        "session_queries",
        "session_length",
        "session_age",
        "user_item_count_28d",
        "item_count_28d",
        "item_trending_2h",
        "trending_items_2h",
        "covisit",
    }
    reg = default_registry()
    assert reg["top_categories_15d"].k == 5 and reg["history_seq"].k == 100 and reg["session_seq"].k == 50
    assert reg["top_categories_15d"].window == sliding(15 * DAY_MS, HOUR_MS)
    assert reg["item_trending_2h"].window.tile_ms == MINUTE_MS


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="x", entity="user", agg="count", window=SESSION, field="category"),
        dict(name="x", entity="user", agg="distinct_topk", field="category"),  # k missing
        dict(name="x", entity="user", agg="distinct_topk", field="price", k=3),
        dict(name="x", entity="item", agg="count", window=SESSION),
        dict(name="x", entity="user", agg="count", window=BEFORE_SESSION),
        dict(name="x", entity="user", agg="count", actions=("click",)),
        dict(name="x", entity="user", agg="covisit", k=3, span=2, gap_ms=1),
        dict(name="x y", entity="user", agg="count"),
        dict(name="x", entity="shop", agg="count"),
    ],
)
def test_invalid_declarations_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Feature(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "window",
    [
        dict(kind="sliding", length_ms=HOUR_MS, tile_ms=7 * MINUTE_MS),
        dict(kind="sliding", length_ms=HOUR_MS),
        dict(kind="session", length_ms=HOUR_MS),
    ],
)
def test_invalid_windows_are_refused(window: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Window(**window)  # type: ignore[arg-type]


def test_registry_round_trips_through_disk_with_the_same_hash(tmp_path: Path) -> None:
    reg = FeatureRegistry.of([*default_features(), *EXTRA])
    reg.save(tmp_path / "r.json")
    back = FeatureRegistry.load(tmp_path / "r.json")
    assert list(back) == list(reg)
    assert back.hash() == reg.hash()
    assert FeatureRegistry.of(reversed(list(reg))).hash() == reg.hash()  # order does not matter


def test_hash_changes_with_any_declaration_change() -> None:
    base = default_registry()
    hashes = {
        base.hash(),
        FeatureRegistry.of(base, lateness_ms=base.lateness_ms + 1).hash(),
        FeatureRegistry.of(base, session_gap_ms=base.session_gap_ms + 1).hash(),
    }
    for f in base:
        changed = dataclasses.replace(f, name=f.name + "_b")
        hashes.add(FeatureRegistry.of([changed if g is f else g for g in base]).hash())
    top = base["top_categories_15d"]
    for variant in (
        dataclasses.replace(top, k=6),
        dataclasses.replace(top, actions=None),
        dataclasses.replace(top, window=sliding(15 * DAY_MS, DAY_MS)),
    ):
        hashes.add(FeatureRegistry.of([variant if g is top else g for g in base]).hash())
    assert len(hashes) == 3 + len(base.features) + 3


def test_duplicate_names_are_refused() -> None:
    reg = default_registry()
    with pytest.raises(ValueError):
        reg.add(reg["covisit"])


@pytest.mark.parametrize("feature", [*default_features(), *EXTRA], ids=lambda f: f.name)
def test_sql_form_round_trips(feature: Feature) -> None:
    assert parse_feature(to_sql(feature)) == feature


def test_sql_form_reads_the_documented_statement() -> None:
    f = parse_feature("""
        CREATE FEATURE top_categories_15d AS
        SELECT user_id, distinct_topk(category, 5) FROM events
        WHERE action = 'view' AND ts > now() - INTERVAL '15 days'
        GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)""")
    assert f == default_registry()["top_categories_15d"]


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x AS SELECT user_id, count(*) FROM events GROUP BY user_id",
        "CREATE FEATURE x AS SELECT user_id, count(*) FROM visits GROUP BY user_id",
        "CREATE FEATURE x AS SELECT user_id, count(*) FROM events WHERE ts > now() - INTERVAL '1' HOUR "
        "GROUP BY user_id",
        "CREATE FEATURE x AS SELECT user_id, median(ts) FROM events GROUP BY user_id",
        "CREATE FEATURE x AS SELECT user_id, count(*) FROM events WHERE surface = 'home' GROUP BY user_id",
        "CREATE FEATURE x AS SELECT shop_id, count(*) FROM events GROUP BY shop_id",
        "CREATE FEATURE x AS SELECT user_id, last_n(10) FROM events WHERE session = current_session() "
        "GROUP BY user_id, item_id",
    ],
)
def test_sql_that_declares_no_feature_is_refused(sql: str) -> None:
    with pytest.raises(FeatureSQLError):
        parse_feature(sql)
