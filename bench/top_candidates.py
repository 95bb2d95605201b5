"""How many values the Spark engine's global trending list counts per request, against the events of the
edge blocks it read before (issue 15 (b); `SparkEngine._top_by_item`), on bench_offline's synthetic history.

An emulation in DuckDB of `_top_by_item`'s groups and bound, not the engine itself: every add-to-cart is a
request read at its own instant and offset as if in order (t = m, so its cut is t - lateness), 5-minute
blocks, k = 50 (`trending_items_2h`). Per group of requests with the same complete blocks: theta, the k-th
largest count over those blocks, and the candidates, the values whose count over the group's envelope (the
blocks from its least start to its latest t) reaches theta. Prints the mean candidates per request and the
mean events of a request's edge blocks (what `_top` joined each request with).

    python -m bench.top_candidates 1000000 5000000
"""

from __future__ import annotations

import sys

import duckdb

from bench.bench_train import synthetic_history

MIN, K = 60_000, 50
LATENESS = BLOCK = 5 * MIN
START = f"greatest((ts // {MIN} - 119) * {MIN}, 0)"  # a 2-hour window of one-minute tiles


def measure(n: int) -> str:
    events, _ = synthetic_history(n)
    con = duckdb.connect()
    con.register("ev", events)
    con.execute(f"""
        CREATE TABLE blocks AS SELECT item_id AS value, ts // {BLOCK} AS b, count(*) AS n FROM ev GROUP BY 1, 2;
        CREATE TABLE rows AS
            SELECT *, (s + {BLOCK - 1}) // {BLOCK} AS bl_lo, greatest(s, t - {LATENESS}) // {BLOCK} AS bl_hi
            FROM (SELECT ts AS t, {START} AS s FROM ev WHERE action = 'add_to_cart');
        CREATE TABLE grp AS SELECT bl_lo, bl_hi, min(s) // {BLOCK} AS lo, max(t) // {BLOCK} AS hi, count(*) AS requests
            FROM rows GROUP BY 1, 2;
        CREATE TABLE complete AS SELECT g.bl_lo, g.bl_hi, x.value, sum(x.n) AS n
            FROM grp g JOIN blocks x ON x.b >= g.bl_lo AND x.b < g.bl_hi GROUP BY 1, 2, 3;
        CREATE TABLE edge AS SELECT g.bl_lo, g.bl_hi, x.value, sum(x.n) AS n
            FROM grp g JOIN blocks x ON x.b BETWEEN g.lo AND g.hi AND (x.b < g.bl_lo OR x.b >= g.bl_hi)
            GROUP BY 1, 2, 3;
        CREATE TABLE theta AS SELECT bl_lo, bl_hi, IF(count(*) >= {K}, min(n), 0) AS theta FROM (
            SELECT *, row_number() OVER (PARTITION BY bl_lo, bl_hi ORDER BY n DESC, value) AS r FROM complete)
            WHERE r <= {K} GROUP BY 1, 2""")  # fmt: skip
    requests, cands, worst, edge_events, items = con.sql("""
        WITH c AS (SELECT bl_lo, bl_hi, count(*) AS cands
                   FROM (SELECT bl_lo, bl_hi, coalesce(b.n, 0) + coalesce(e.n, 0) AS u
                         FROM complete b FULL JOIN edge e USING (bl_lo, bl_hi, value))
                   LEFT JOIN theta USING (bl_lo, bl_hi) WHERE u >= coalesce(theta, 0) GROUP BY 1, 2),
             e AS (SELECT bl_lo, bl_hi, sum(n) AS edge_events FROM edge GROUP BY 1, 2)
        SELECT sum(requests), sum(requests * cands) / sum(requests), max(cands),
               sum(requests * edge_events) / sum(requests), (SELECT count(DISTINCT item_id) FROM ev)
        FROM grp JOIN c USING (bl_lo, bl_hi) JOIN e USING (bl_lo, bl_hi)""").fetchall()[0]
    return (
        f"{events.num_rows:,} events, {items:,} items: {requests:,} requests, {cands:.0f} candidates per request "
        f"(max {worst} in a group), {edge_events:,.0f} events in a request's edge blocks"
    )


if __name__ == "__main__":
    for size in map(int, sys.argv[1:] or ["1000000"]):
        print(measure(size), flush=True)
