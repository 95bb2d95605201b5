"""The synthetic shop: reproducible, valid wire-form events, and the realism the model's tests rely on."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.datasets import DEFAULT_START_MS, generate_shop
from insession.datasets.synthetic import DAY_MS, TAXONOMY
from insession.schema import MAX_BATCH, validate_events, validate_items


@pytest.fixture(scope="module")
def shop():
    return generate_shop(300, 600, 14, 7)


@pytest.fixture(scope="module")
def con(shop):
    """DuckDB over the shop: `e` (events joined with their item's category), `s` (sessions)."""
    c = duckdb.connect()
    events = pa.concat_tables(list(shop.iter_event_tables()))
    items = pa.Table.from_pylist(shop.items)
    sessions = shop.sessions
    c.register("events", events)
    c.register("items", items)
    c.register("s", sessions)
    c.execute("CREATE VIEW e AS SELECT events.*, items.category AS cat, items.subcategory AS sub "
              "FROM events JOIN items USING (item_id)")
    return c


def q(con, sql):
    return con.execute(sql).fetchall()


def _validate_all(events: list[dict]) -> None:
    now = max(e["ts"] for e in events) + 1
    for i in range(0, len(events), MAX_BATCH):
        validate_events(events[i:i + MAX_BATCH], now_ms=now)


def test_same_seed_same_shop():
    a, b, c = generate_shop(80, 300, 5, 11), generate_shop(80, 300, 5, 11), generate_shop(80, 300, 5, 12)
    assert a.items == b.items
    ta, tb = pa.concat_tables(list(a.iter_event_tables())), pa.concat_tables(list(b.iter_event_tables()))
    assert ta.equals(tb)
    assert a.sessions.equals(b.sessions)
    assert list(a.iter_events()) == list(b.iter_events())  # and reading twice gives the same again
    assert not ta.equals(pa.concat_tables(list(c.iter_event_tables())))


def test_events_and_items_validate_and_are_consistent(shop, con):
    events = list(shop.iter_events())
    _validate_all(events)
    assert len(validate_items(shop.items, now_ms=0)) == len(shop.items)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert len({e["event_id"] for e in events}) == len(events)
    assert min(ts) >= DEFAULT_START_MS
    catalogue = {i["item_id"] for i in shop.items}
    assert {e["item_id"] for e in events} <= catalogue
    # Every event carries its session's intent, and its session is in the side table.
    assert all(e["properties"]["intent"] for e in events)
    assert q(con, "SELECT count(*) FROM events LEFT JOIN s USING (session_id) WHERE s.session_id IS NULL "
                  "OR s.intent_category <> events.intent OR s.intent_subcategory <> events.intent_subcategory"
             ) == [(0,)]
    searches = [e for e in events if e["action"] == "search"]
    assert searches and all(e["properties"]["query"] for e in searches)


def test_funnel_is_ordered(con):
    counts = dict(q(con, "SELECT action, count(*) FROM e GROUP BY action"))
    assert counts["view"] > 3 * counts["add_to_cart"] > 3 * counts["purchase"] > 0
    assert counts["remove_from_cart"] > 0 and counts["favorite"] > 0 and counts["search"] > 0
    # Every purchase and removal follows an add_to_cart of the same item in the same session.
    for later in ("purchase", "remove_from_cart"):
        assert q(con, f"""
            SELECT count(*) FROM e AS p WHERE p.action = '{later}' AND NOT EXISTS (
              SELECT 1 FROM e AS c WHERE c.action = 'add_to_cart' AND c.session_id = p.session_id
              AND c.item_id = p.item_id AND c.ts <= p.ts)""") == [(0,)]


def test_item_popularity_has_a_long_tail(shop, con):
    views = np.array([c for (c,) in q(con, "SELECT count(*) AS c FROM e WHERE action = 'view' "
                                           "GROUP BY item_id ORDER BY c DESC")])
    n = len(shop.items)
    assert views[: n // 10].sum() / views.sum() > 0.4  # the head: a tenth of the items, most of the views
    padded = np.concatenate([views, np.zeros(n - len(views))])
    assert padded[n // 2:].sum() / views.sum() < 0.15  # the tail: half the items, few views
    assert views.max() > 20 * np.median(padded)


def test_replenishable_subcategories_are_rebought(shop, con):
    repl = ", ".join(f"'{s}'" for s in shop.replenishable_subcategories)
    rows = dict((r, (share, n)) for r, share, n in q(con, f"""
        SELECT sub IN ({repl}) AS replenishable, avg((n >= 2)::INT), count(*) FROM (
          SELECT user_id, item_id, any_value(sub) AS sub, count(*) AS n FROM e WHERE action = 'purchase'
          GROUP BY ALL) GROUP BY 1"""))
    assert rows[True][0] > 0.25 and rows[True][1] > 50
    assert rows[True][0] > 2 * rows[False][0]
    # Replenishment sessions buy their staple.
    (bought,) = q(con, """
        SELECT avg((EXISTS (SELECT 1 FROM e WHERE e.session_id = s.session_id AND e.item_id = s.staple_item_id
                            AND e.action = 'purchase'))::INT) FROM s WHERE kind = 'replenish'""")[0]
    assert bought > 0.6


def _intent_share(con, where: str) -> dict[str, float]:
    return dict(q(con, f"SELECT intent_category, count(*) / sum(count(*)) OVER () FROM s WHERE {where} "
                       "GROUP BY 1"))


def test_intent_shifts_with_hour_and_weekday(con):
    morning, night = _intent_share(con, "hour BETWEEN 6 AND 9"), _intent_share(con, "hour BETWEEN 19 AND 22")
    tv = 0.5 * sum(abs(morning.get(k, 0) - night.get(k, 0)) for k in morning.keys() | night.keys())
    assert tv > 0.25
    assert morning["dairy_breakfast"] > 2 * night.get("dairy_breakfast", 0)
    assert night["snacks"] > 2 * morning.get("snacks", 0)
    weekday, weekend = _intent_share(con, "dow < 5 AND kind = 'browse'"), _intent_share(con, "dow >= 5 AND "
                                                                                          "kind = 'browse'")
    busiest = max((c for c in TAXONOMY if c.name in weekend), key=lambda c: c.weekend).name
    assert weekend[busiest] > 1.2 * weekday[busiest]


def test_sessions_follow_their_intent(con):
    ((views_on, sub_on),) = q(con, "SELECT avg((cat = intent)::INT), avg((sub = intent_subcategory)::INT) "
                                   "FROM e WHERE action = 'view'")
    ((carts_on,),) = q(con, "SELECT avg((cat = intent)::INT) FROM e WHERE action = 'add_to_cart'")
    assert views_on > 0.8 and sub_on > 0.5 and carts_on > 0.9


def test_a_shoppers_sessions_never_overlap(con):
    assert q(con, """
        WITH spans AS (SELECT user_id, session_id, min(ts) AS a, max(ts) AS b FROM e GROUP BY ALL)
        SELECT count(*) FROM (SELECT b, lead(a) OVER (PARTITION BY user_id ORDER BY a) AS next_a FROM spans)
        WHERE next_a <= b""") == [(0,)]


def test_new_items_appear_after_day_zero(shop, con):
    created = shop.item_created_ms
    new = {i for i, t in created.items() if t > shop.start_ms}
    assert len(new) > 0.03 * len(created)
    first_seen = dict(q(con, "SELECT item_id, min(ts) FROM e GROUP BY 1"))
    assert all(first_seen[i] >= created[i] for i in new if i in first_seen)
    assert sum(i in first_seen for i in new) > 0.8 * len(new)


def test_target_events_sizes_the_shop():
    shop = generate_shop(2000, 1000, 7, 3, target_events=60_000)
    n = sum(t.num_rows for t in shop.iter_event_tables())
    assert abs(n - 60_000) < 0.1 * 60_000
    assert abs(shop.expected_events - n) < 0.1 * n
    with pytest.raises(ValueError, match="more users"):
        generate_shop(10, 200, 2, 3, target_events=1_000_000)


def test_start_ms_is_overridable():
    start = DEFAULT_START_MS - 30 * DAY_MS
    shop = generate_shop(30, 200, 2, 5, start_ms=start)
    ts = [t for table in shop.iter_event_tables() for t in table["ts"].to_pylist()]
    assert start <= min(ts) and max(ts) < start + 3 * DAY_MS


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(users=st.integers(1, 40), items=st.integers(40, 400), days=st.integers(1, 4),
       seed=st.integers(0, 2**32))
def test_any_small_shop_is_valid(users, items, days, seed):
    shop = generate_shop(users, items, days, seed)
    events = list(shop.iter_events())
    if events:
        _validate_all(events)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert {e["item_id"] for e in events} <= {i["item_id"] for i in shop.items}
    assert len(validate_items(shop.items, now_ms=0)) == len(shop.items)
