"""Shop statistics: one definition, measured alike on a real sample and on a synthetic shop.

`measure(events)` takes events as an Arrow table with `user_id`, `item_id`, `action`, `ts` (epoch ms) and
`category` (the item's leaf category, the catalogue's `subcategory`: Taobao's flat category id, REES46's
full path, the synthetic shop's subcategory; null when unknown) and returns named numbers (`ShopStats`). Sessions are
cut here, never taken from the input: a shopper's session ends after 30 minutes without an event, the
rule of the real samples' `session_id` and of the feature store's default `session_gap_ms`, so a
generator's own session ids cannot flatter it. Ties at equal `ts` keep the input's order (a view
logged before an add-to-cart of the same second counts as earlier).

What each number means (the names are the keys of `ShopStats.values`):

- `events`, `users`, `items`, `days`: the size; `share_<action>`: the action mix.
- `session_len_p25/p50/p75/p90/p99`, `session_len_mean`: events per session.
- `sessions_per_user_day`: sessions per shopper and day of the span (at least one day).
- `cart_viewed_in_session`: share of add-to-carts whose item the shopper viewed earlier in the same
  session; `cart_viewed_in_history`: not in the session but in an earlier one; `cart_never_viewed`:
  neither (the three add up to 1). `cart_last_view`: the carted item is the session's latest view before
  the cart (what made the old generator trivial for session recency); `cart_category_in_session`: the
  carted item's category was viewed earlier in the session (the context a ranker can use).
- `session_recency_ndcg10`: NDCG@10 over add-to-carts of ranking the session's distinct earlier views
  latest first (one relevant item, 0 when it is not among them): a ceiling check, not the evaluation's
  protocol (which ranks a candidate set).
- `leaf_popularity_ndcg10`: the same for ranking the items of the leaf category of the session's latest
  event before the cart by their events so far: a context baseline, to check the shop is neither noise nor
  easier than the real sample.
- `repeat_purchase_item`: share of purchases of an item the shopper bought before (an earlier day);
  `repeat_purchase_category`: of a category the shopper bought before (an earlier day);
  `repeat_cart_item`: share of add-to-carts of an item the shopper carted in an earlier session.
- `category_switch_rate`: share of consecutive event pairs within a session whose categories differ;
  `sessions_multi_category`: share of sessions of 2+ events touching 2+ categories.
- `top1pct_share`, `top10pct_share`: share of events on the most popular 1% / 10% of the items that
  have an event; `gini_items`: Gini coefficient of events per item (items with an event);
  `singleton_items`: share of those items with exactly one event.
- `top100_overlap_daily`: mean share of a day's 100 most frequent items that were also among the
  previous day's 100 (full days only).
- `hour_share_00_04` .. `hour_share_20_24`: share of events in each 4-hour band of the UTC day;
  `hour_peak_trough`: ratio of the busiest to the quietest UTC hour; `dow_rate_mon` .. `dow_rate_sun`:
  events on a calendar day (UTC) of that weekday over events on an average day of the span (first and
  last days count even when partial; nan for a weekday the span lacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from insession.datasets.imports import Imported
from insession.datasets.synthetic import Shop

SESSION_GAP_MS = 30 * 60_000  # the samples' session rule; also the feature store's default session_gap_ms
DAY_MS = 86_400_000
TOP_DAILY = 100
DOW_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MEASURED_ACTIONS = ("view", "add_to_cart", "favorite", "purchase", "search")  # remove_from_cart: none real
REQUIRED = ("user_id", "item_id", "action", "ts", "category")


@dataclass
class ShopStats:
    """Named statistics of one event set, in a fixed order (see the module docstring for each name)."""

    name: str
    values: dict[str, float] = field(default_factory=dict)


_SESSIONS_SQL = f"""
CREATE TEMP TABLE s AS
WITH o AS (
    SELECT *, row_number() OVER () AS rn FROM ev
), g AS (
    SELECT *, CASE WHEN ts - lag(ts) OVER w > {SESSION_GAP_MS} OR lag(ts) OVER w IS NULL THEN 1 ELSE 0 END
              AS starts
    FROM o WINDOW w AS (PARTITION BY user_id ORDER BY ts, rn)
)
SELECT user_id, item_id, action, ts, category, rn,
       sum(starts) OVER (PARTITION BY user_id ORDER BY ts, rn ROWS UNBOUNDED PRECEDING) AS sess
FROM g
"""


def measure(events: pa.Table, name: str = "") -> ShopStats:
    """The statistics of `events` (columns `REQUIRED`; other columns ignored). Raises ValueError naming a
    missing column or an empty table."""
    missing = [c for c in REQUIRED if c not in events.schema.names]
    if missing:
        raise ValueError(f"measure({name or 'events'}): missing columns {missing}; need {list(REQUIRED)} "
                         "(ts in epoch ms, category the item's category)")
    if events.num_rows == 0:
        raise ValueError(f"measure({name or 'events'}): no events to measure")
    con = duckdb.connect()
    con.register("ev", events.select(list(REQUIRED)))
    con.execute(_SESSIONS_SQL)
    v: dict[str, float] = {}

    def one(sql: str) -> tuple:
        return con.execute(sql).fetchone()

    n, v["users"], v["items"], t0, t1 = one(
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id), min(ts), max(ts) FROM s")
    v["events"] = n
    v["days"] = round((t1 - t0) / DAY_MS, 2)
    mix = dict(con.execute("SELECT action, count(*) FROM s GROUP BY 1").fetchall())
    for a in MEASURED_ACTIONS:
        v[f"share_{a}"] = mix.get(a, 0) / n
    # Session lengths.
    lens = np.array([r[0] for r in con.execute("SELECT count(*) FROM s GROUP BY user_id, sess").fetchall()])
    for q in (25, 50, 75, 90, 99):
        v[f"session_len_p{q}"] = float(np.percentile(lens, q))
    v["session_len_mean"] = float(lens.mean())
    v["sessions_per_user_day"] = len(lens) / v["users"] / max(v["days"], 1.0)
    # Where an add-to-cart's item was seen before.
    in_sess, in_hist, last_view, cat_sess = one("""
        WITH c AS (SELECT * FROM s WHERE action = 'add_to_cart'),
        cats AS (
            SELECT c.rn, count(v.rn) > 0 AS cat_sess
            FROM c LEFT JOIN s v ON v.user_id = c.user_id AND v.sess = c.sess AND v.action = 'view'
                                 AND v.category = c.category AND (v.ts < c.ts OR (v.ts = c.ts AND v.rn < c.rn))
            GROUP BY c.rn
        ),
        flags AS (
            SELECT c.rn,
                   bool_or(v.sess = c.sess) AS in_sess,
                   bool_or(v.sess < c.sess) AS in_hist
            FROM c LEFT JOIN s v ON v.user_id = c.user_id AND v.item_id = c.item_id AND v.action = 'view'
                                 AND (v.ts < c.ts OR (v.ts = c.ts AND v.rn < c.rn))
            GROUP BY c.rn
        ),
        last AS (
            SELECT c.rn, arg_max(v.item_id, (v.ts, v.rn)) = any_value(c.item_id) AS is_last
            FROM c JOIN s v ON v.user_id = c.user_id AND v.sess = c.sess AND v.action = 'view'
                           AND (v.ts < c.ts OR (v.ts = c.ts AND v.rn < c.rn))
            GROUP BY c.rn
        )
        SELECT avg(coalesce(in_sess, false)::INT), avg((NOT coalesce(in_sess, false)
               AND coalesce(in_hist, false))::INT), avg(coalesce(is_last, false)::INT), avg(cat_sess::INT)
        FROM flags LEFT JOIN last USING (rn) JOIN cats USING (rn)""")
    v["cart_viewed_in_session"] = in_sess or 0.0
    v["cart_viewed_in_history"] = in_hist or 0.0
    v["cart_never_viewed"] = 1.0 - v["cart_viewed_in_session"] - v["cart_viewed_in_history"]
    v["cart_last_view"] = last_view or 0.0
    v["cart_category_in_session"] = cat_sess or 0.0
    # Session recency as a ranker: the session's distinct earlier views, latest first.
    (v["session_recency_ndcg10"],) = one("""
        WITH c AS (SELECT * FROM s WHERE action = 'add_to_cart'),
        seen AS (
            SELECT c.rn, v.item_id, max((v.ts, v.rn)) AS last, any_value(c.item_id) AS target
            FROM c JOIN s v ON v.user_id = c.user_id AND v.sess = c.sess AND v.action = 'view'
                           AND (v.ts < c.ts OR (v.ts = c.ts AND v.rn < c.rn))
            GROUP BY c.rn, v.item_id
        ),
        ranked AS (SELECT rn, item_id = target AS hit,
                          row_number() OVER (PARTITION BY rn ORDER BY last DESC) AS r FROM seen)
        SELECT coalesce(sum(CASE WHEN hit AND r <= 10 THEN 1 / log2(r + 1) END), 0)
               / (SELECT count(*) FROM c) FROM ranked""")
    # Popularity in context as a ranker: the items of the leaf category of the session's latest event before
    # the cart, by their events so far (ties by item id).
    (v["leaf_popularity_ndcg10"],) = one("""
        WITH c AS (SELECT * FROM s WHERE action = 'add_to_cart'),
        ctx AS (
            SELECT c.rn, any_value(c.item_id) AS target, any_value(c.ts) AS ts,
                   arg_max(v.category, (v.ts, v.rn)) AS leaf
            FROM c JOIN s v ON v.user_id = c.user_id AND v.sess = c.sess
                           AND (v.ts < c.ts OR (v.ts = c.ts AND v.rn < c.rn))
            GROUP BY c.rn
        ),
        counts AS (
            SELECT ctx.rn, e.item_id, count(*) AS n, any_value(ctx.target) AS target
            FROM ctx JOIN s e ON e.category = ctx.leaf AND e.ts < ctx.ts GROUP BY ctx.rn, e.item_id
        ),
        ranked AS (SELECT rn, item_id = target AS hit,
                          row_number() OVER (PARTITION BY rn ORDER BY n DESC, item_id) AS r FROM counts)
        SELECT coalesce(sum(CASE WHEN hit AND r <= 10 THEN 1 / log2(r + 1) END), 0)
               / (SELECT count(*) FROM c) FROM ranked""")
    # Repeats: purchases on an earlier day, carts in an earlier session.
    rep_item, rep_cat = one(f"""
        WITH p AS (SELECT user_id, item_id, category, ts // {DAY_MS} AS day FROM s WHERE action = 'purchase'),
        first_item AS (SELECT user_id, item_id, min(day) AS d FROM p GROUP BY ALL),
        first_cat AS (SELECT user_id, category, min(day) AS d FROM p WHERE category IS NOT NULL GROUP BY ALL)
        SELECT avg((p.day > fi.d)::INT), avg((p.day > fc.d)::INT)
        FROM p JOIN first_item fi USING (user_id, item_id) LEFT JOIN first_cat fc USING (user_id, category)""")
    v["repeat_purchase_item"] = rep_item or 0.0
    v["repeat_purchase_category"] = rep_cat or 0.0
    (v["repeat_cart_item"],) = one("""
        WITH c AS (SELECT user_id, item_id, sess FROM s WHERE action = 'add_to_cart')
        SELECT coalesce(avg((sess > first)::INT), 0)
        FROM c JOIN (SELECT user_id, item_id, min(sess) AS first FROM c GROUP BY ALL) USING (user_id, item_id)""")
    # Category switches within sessions.
    switch, multi = one("""
        WITH p AS (SELECT category, lag(category) OVER w AS prev, row_number() OVER w AS k FROM s
                   WINDOW w AS (PARTITION BY user_id, sess ORDER BY ts, rn)),
        per AS (SELECT count(*) AS n, count(DISTINCT category) AS cats FROM s GROUP BY user_id, sess)
        SELECT (SELECT avg((category IS DISTINCT FROM prev)::INT) FROM p WHERE k > 1),
               (SELECT avg((cats >= 2)::INT) FROM per WHERE n >= 2)""")
    v["category_switch_rate"] = switch or 0.0
    v["sessions_multi_category"] = multi or 0.0
    # Popularity: the long tail and its churn from day to day.
    counts = np.sort(np.array([r[0] for r in con.execute("SELECT count(*) FROM s GROUP BY item_id").fetchall()]))
    desc = counts[::-1]
    v["top1pct_share"] = desc[: max(1, len(desc) // 100)].sum() / n
    v["top10pct_share"] = desc[: max(1, len(desc) // 10)].sum() / n
    cum = np.cumsum(counts)
    v["gini_items"] = float((len(counts) + 1 - 2 * (cum.sum() / cum[-1])) / len(counts))
    v["singleton_items"] = float((counts == 1).mean())
    overlap = con.execute(f"""
        WITH d AS (SELECT ts // {DAY_MS} AS day, item_id, count(*) AS c FROM s GROUP BY ALL),
        full_days AS (SELECT day FROM d GROUP BY day
                      HAVING day > (SELECT min(ts) // {DAY_MS} FROM s) AND day < (SELECT max(ts) // {DAY_MS} FROM s)),
        top AS (SELECT day, item_id FROM d WHERE day IN (SELECT day FROM full_days)
                QUALIFY row_number() OVER (PARTITION BY day ORDER BY c DESC, item_id) <= {TOP_DAILY})
        SELECT a.day, count(b.item_id) / {TOP_DAILY} FROM top a LEFT JOIN top b ON b.day = a.day - 1
               AND b.item_id = a.item_id
        WHERE a.day - 1 IN (SELECT day FROM full_days) GROUP BY a.day""").fetchall()
    v["top100_overlap_daily"] = float(np.mean([o for _, o in overlap])) if overlap else float("nan")
    # Time of day (UTC) and day of week.
    hours = hour_profile(events)
    for b in range(0, 24, 4):
        v[f"hour_share_{b:02d}_{b + 4:02d}"] = float(hours[b:b + 4].sum())
    v["hour_peak_trough"] = float(hours.max() / max(hours.min(), 1 / n))
    per_day = con.execute(f"SELECT ts // {DAY_MS} AS day, count(*) FROM s GROUP BY 1").fetchall()
    mean_day = n / len(per_day)
    for k, d in enumerate(DOW_NAMES):
        days = [c for day, c in per_day if (day + 3) % 7 == k]  # 1970-01-01 was a Thursday
        v[f"dow_rate_{d}"] = float(np.mean(days) / mean_day) if days else float("nan")
    return ShopStats(name, v)


def hour_profile(events: pa.Table) -> np.ndarray:
    """Share of events in each UTC hour (24 values summing to 1)."""
    ts = events.column("ts").to_numpy()
    return np.bincount((ts % DAY_MS) // 3_600_000, minlength=24) / len(ts)


def real_events(path: Path) -> pa.Table:
    """A normalised real sample (e.g. ../shared/data/taobao_userbehavior_head84k.parquet) read through the
    importer, with each event's item leaf category (the catalogue's subcategory): the input `measure` takes."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such sample; pass --data with the directory of the normalised "
                                "samples (../shared/data beside the checkout)")
    with Imported("normalised", path) as imported:
        items = pa.Table.from_pylist([{"item_id": r["item_id"], "category": r.get("subcategory") or r["category"]}
                                      for r in imported.item_rows()])
        events = pa.Table.from_batches(list(imported.event_batches()))
    return _with_category(events, items)


def _with_category(events: pa.Table, items: pa.Table) -> pa.Table:
    con = duckdb.connect()
    con.register("e", events.select(["user_id", "item_id", "action", "ts"]))
    con.register("i", items.select(["item_id", "category"]))
    return con.sql("SELECT e.user_id, e.item_id, e.action, e.ts, i.category FROM "
                   "(SELECT *, row_number() OVER () AS rn FROM e) e LEFT JOIN i USING (item_id) "
                   "ORDER BY e.rn").to_arrow_table()



def shop_events(shop: Shop) -> pa.Table:
    """A generated shop's events with each item's leaf category (its subcategory): the input `measure` takes."""
    events = pa.concat_tables(t.select(["user_id", "item_id", "action", "ts"]) for t in shop.iter_event_tables())
    items = pa.table({"item_id": shop.item_ids, "category": [shop.subcategories[k] for k in shop.item_sub]})
    return _with_category(events, items)
