"""Routing: queries shaped like a declared feature are answered from online state, the rest by analytics."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from insession.features import Feature
from insession.query import QueryError

from .conftest import World, make_world

TOP_CATS = (
    "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
    "ORDER BY ts DESC LIMIT 5"
)


@pytest.mark.parametrize(
    ("sql", "feature"),
    [
        (TOP_CATS, "top_categories_15d"),
        (
            "SELECT DISTINCT category FROM events WHERE action = 'view' AND user_id = :user "
            "AND ts >= now() - INTERVAL 360 HOUR ORDER BY ts DESC LIMIT 3",
            "top_categories_15d",
        ),
        (
            "select distinct e.category from events e where now() - interval '15 days' < e.ts "
            "and e.user_id = :user "
            "order by e.ts desc limit 5",
            "top_categories_15d",
        ),
        (
            "SELECT DISTINCT category FROM events WHERE user_id = :user AND action IN ('view') "
            "AND ts > current_timestamp - INTERVAL 15 DAY ORDER BY ts DESC LIMIT 5",
            "top_categories_15d",
        ),
        (
            "SELECT count(*) FROM events WHERE item_id = :item AND ts > now() - INTERVAL 2 HOUR",
            "item_trending_2h",
        ),
        (
            "SELECT action, count(*) FROM events WHERE item_id = :item AND ts > now() - INTERVAL 28 DAY "
            "GROUP BY action",
            "item_count_28d",
        ),
        (
            "SELECT count(*) AS n, action FROM events WHERE user_id = :user AND item_id = :item "
            "AND ts > now() - INTERVAL 28 DAY GROUP BY action",
            "user_item_count_28d",
        ),
        (
            "SELECT item_id, count(*) AS n FROM events WHERE ts > now() - INTERVAL 2 HOUR GROUP BY item_id "
            "ORDER BY n DESC LIMIT 10",
            "trending_items_2h",
        ),
    ],
)
def test_declared_feature_shapes_go_to_the_serving_lane(world: World, sql: str, feature: str) -> None:
    params = {p: ("u1" if p == "user" else "i7") for p in ("user", "item") if f":{p}" in sql}
    result = world.query.execute(sql, params)
    assert result.lane == "serving"
    assert result.feature == feature
    ex = world.query.explain(sql, params)
    assert (ex.lane, ex.feature) == ("serving", feature)


@pytest.mark.parametrize(
    "sql",
    [
        # another window, k beyond the declared 5, no LIMIT, another order, another action, an extra condition
        TOP_CATS.replace("15 DAY", "14 DAY"),
        TOP_CATS.replace("LIMIT 5", "LIMIT 6"),
        TOP_CATS.replace(" LIMIT 5", ""),
        TOP_CATS.replace("ts DESC", "ts ASC"),
        TOP_CATS.replace("WHERE", "WHERE action = 'purchase' AND"),
        TOP_CATS.replace("WHERE", "WHERE surface = 'home' AND"),
        TOP_CATS.replace("user_id = :user", "user_id <> :user"),
        TOP_CATS.replace("DISTINCT category", "DISTINCT subcategory"),
        TOP_CATS.replace("FROM events", "FROM events JOIN items USING (item_id, category)"),
        "SELECT count(*) FROM events WHERE item_id = :user AND ts > now() - INTERVAL 3 HOUR",
        "SELECT count(*) FROM events WHERE item_id = :user",
        "SELECT count(DISTINCT user_id) FROM events WHERE item_id = :user AND ts > now() - INTERVAL 2 HOUR",
        "SELECT action, count(*) FROM events WHERE user_id = :user AND ts > now() - INTERVAL 28 DAY "
        "GROUP BY action",
        "SELECT item_id, count(*) AS n FROM events WHERE ts > now() - INTERVAL 2 HOUR GROUP BY item_id "
        "ORDER BY n DESC LIMIT 51",
        "WITH t AS (SELECT * FROM events) SELECT DISTINCT category FROM t WHERE user_id = :user "
        "ORDER BY ts DESC LIMIT 5",
    ],
)
def test_other_queries_go_to_analytics(world: World, sql: str) -> None:
    plan = world.query.plan(sql)
    assert plan.lane == "analytics"
    ex = world.query.explain(sql, {"user": "u1"} if ":user" in sql else {})
    assert ex.lane == "analytics" and ex.feature is None and ex.plan


def test_serving_answer_is_the_feature_value(world: World) -> None:
    for user in ("u0", "u1", "u2"):
        value = world.features.read("top_categories_15d", user)
        assert value, "the fixture gives every user some views"
        r = world.query.execute(TOP_CATS, {"user": user})
        assert r.columns == ["category"]
        assert r.rows == [[c] for c in value]
        r3 = world.query.execute(TOP_CATS.replace("LIMIT 5", "LIMIT 3"), {"user": user})
        assert r3.rows == [[c] for c in value[:3]]


def test_serving_agrees_with_analytics_on_the_same_question(world: World) -> None:
    """Views only, ordered by the latest view: the analytics lane computes it exactly from the events."""
    exact = world.query.execute(
        "SELECT category FROM events WHERE user_id = :user AND action = 'view' AND category IS NOT NULL "
        "AND ts > now() - INTERVAL 15 DAY GROUP BY category ORDER BY max(ts) DESC LIMIT 5",
        {"user": "u3"},
    )
    assert exact.lane == "analytics"
    served = world.query.execute(TOP_CATS, {"user": "u3"})
    assert served.rows == exact.rows


def test_trending_rows_and_counts(world: World) -> None:
    value = world.features.read("trending_items_2h", None)
    r = world.query.execute(
        "SELECT count(*) AS n, item_id FROM events WHERE ts > now() - INTERVAL 2 HOUR "
        "GROUP BY item_id ORDER BY n DESC LIMIT 3"
    )
    assert r.lane == "serving" and r.columns == ["n", "item_id"]
    sellable = [
        d for d in value if world.catalog.get(d["item_id"]) and world.catalog.get(d["item_id"]).available
    ]
    assert r.rows == [[d["count"], d["item_id"]] for d in sellable[:3]]


def test_literal_keys_work_like_parameters(world: World) -> None:
    r = world.query.execute(TOP_CATS.replace(":user", "'u1'"))
    assert r.lane == "serving"
    assert r.rows == world.query.execute(TOP_CATS, {"user": "u1"}).rows


def test_features_table_reads_every_feature_of_a_key(world: World) -> None:
    r = world.query.execute("SELECT * FROM features WHERE user_id = :user", {"user": "u2"})
    assert r.lane == "serving" and r.feature is None
    names = [f.name for f in world.features.registry.of_entity("user")]
    assert r.columns == ["user_id", *names]
    assert r.rows[0][0] == "u2"
    row = dict(zip(r.columns, r.rows[0], strict=True))
    assert row["session_length"] == world.features.read("session_length", "u2")
    r2 = world.query.execute("SELECT session_length, top_categories_15d FROM features WHERE user_id = 'u2'")
    assert r2.columns == ["user_id", "session_length", "top_categories_15d"]
    both = world.query.execute(
        "SELECT * FROM features WHERE item_id = :i AND user_id = :u", {"u": "u1", "i": "i3"}
    )
    assert both.columns == ["user_id", "item_id", "user_item_count_28d"]
    glob = world.query.execute("SELECT * FROM features")
    assert glob.columns == ["trending_items_2h"]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM features WHERE user_id = :user AND top_categories_15d IS NULL",
        "SELECT * FROM features WHERE user_id LIKE :user",
        "SELECT count(*) FROM features",
        "SELECT * FROM features f JOIN events e USING (user_id)",
        "SELECT * FROM features WHERE user_id = :user ORDER BY 1",
    ],
)
def test_features_table_only_reads_by_key(world: World, sql: str) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute(sql, {"user": "u1"})
    assert info.value.status == 400 and info.value.code == "bad_features_query"


def test_unknown_feature_column(world: World) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute("SELECT favourite_colour FROM features WHERE user_id = :user", {"user": "u1"})
    assert info.value.code == "unknown_column" and (info.value.line, info.value.col) == (1, 8)


def test_explain_through_execute_returns_a_row(world: World) -> None:
    r = world.query.execute("EXPLAIN " + TOP_CATS, {"user": "u1"})
    assert r.columns == ["lane", "feature", "plan"]
    lane, feature, plan = r.rows[0]
    assert (lane, feature) == ("serving", "top_categories_15d")
    assert "watermark" in plan and "view" in plan


def test_last_n_shape_reads_the_newest_events_first(tmp_path: Path) -> None:
    """A declared unbounded last_n answers `... ORDER BY ts DESC LIMIT n` from online state."""
    w = make_world(tmp_path, n=120)
    try:
        w.features.add_feature(Feature("recent_events", "user", "last_n", k=20), w.log.read(0))
        r = w.query.execute(
            "SELECT item_id, ts FROM events WHERE user_id = :user ORDER BY ts DESC LIMIT 4", {"user": "u5"}
        )
        assert (r.lane, r.feature) == ("serving", "recent_events")
        exact = w.query.execute(
            "SELECT item_id, ts FROM events WHERE user_id = :user AND item_id IN "
            '(SELECT item_id FROM items) ORDER BY ts DESC, "offset" DESC LIMIT 4',
            {"user": "u5"},
        )
        assert exact.lane == "analytics"
        assert r.rows == exact.rows
        assert isinstance(r.rows[0][1], datetime) and r.rows[0][1].tzinfo is None
        assert r.rows[0][1] <= datetime.now(UTC).replace(tzinfo=None)
    finally:
        w.close()
