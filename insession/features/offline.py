"""The offline feature engine: the same declarations, point-in-time correct, computed in DuckDB.

`compute(features, events, spine)` answers, for each spine row (entity keys, ts, [offset]), every feature as
the online engine would have answered it when it had applied the log up to `offset` and was read at `ts`:
only events with offset <= that offset and ts <= ts count, and the lateness rule drops exactly the events
the online engine dropped (each event's watermark at arrival is a window function over offset order).
Without an `offset` column a row sees what arrived while the stream's watermark was <= ts.

Work per spine row is bounded by its window, never by a key's whole history: count and counts_by_action
over sliding or unbounded windows add up running per-tile counts and read only the few minutes of events
around the row's cut one by one (see `_tiled`); topk_count and covisit over sliding windows count a
shortlist of values per row from running counts per (key, value) (see `_top_sliding`); other sliding
windows join on (key, window-length bucket); session windows on (user, session number); last_n over
unbounded and before-session windows read a rank range found with ASOF joins (the k latest events of a
prefix of the log in offset order lie within [min ts of its last k events, max ts], which bounded lateness
keeps narrow). Unbounded sum/last/distinct/topk windows read the key's whole history (no default feature
uses one). `sessions(registry, events)` gives the accepted events with their session numbers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from insession.features.declare import ENTITY_KEYS, MINUTE_MS, Feature, FeatureRegistry, Window
from insession.schema import ACTIONS, event_columns_sql

EventsLike = duckdb.DuckDBPyRelation | pa.Table | str | Path
_SEQ_TYPE = "STRUCT(item_id VARCHAR, action VARCHAR, ts BIGINT, category VARCHAR)[]"
MEMORY_LIMIT = "4GB"  # per connection of `compute` / `sessions` (the caller's process needs memory too)
_SPILL = Path(tempfile.gettempdir()) / "insession-duckdb"


def connect() -> duckdb.DuckDBPyConnection:
    """A connection that spills to a temporary directory beyond MEMORY_LIMIT rather than grow further."""
    return duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": str(_SPILL)})


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _events_sql(con: duckdb.DuckDBPyConnection, events: EventsLike) -> str:
    if isinstance(events, str | Path):
        return f"read_parquet({_lit(str(events))}, hive_partitioning = true, union_by_name = true)"
    con.register("__events_in", events)
    return "__events_in"


def _prepare(con: duckdb.DuckDBPyConnection, source: str, reg: FeatureRegistry) -> None:
    """ev: every event's offset and watermark after arrival; acc: accepted events with session numbers."""
    present = con.sql(f"SELECT * FROM {source} LIMIT 0").columns
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE ev AS
        SELECT "offset" AS off, user_id, item_id, action, ts, session_id, surface, properties, category,
               subcategory, brand, price, price_band,
               max(ts) OVER (ORDER BY "offset" ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS wm_prev,
               max(ts) OVER (ORDER BY "offset" ROWS UNBOUNDED PRECEDING) AS wm_after
        FROM (SELECT {event_columns_sql(present)} FROM {source})""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE acc AS
        WITH a AS (
            SELECT *,
                row_number() OVER (PARTITION BY user_id ORDER BY off) AS urn,
                lag(session_id) OVER (PARTITION BY user_id ORDER BY off) AS prev_sid,
                max(ts) OVER (PARTITION BY user_id ORDER BY off
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
            FROM ev WHERE wm_prev IS NULL OR ts >= wm_prev - {reg.lateness_ms}
        )
        SELECT * EXCLUDE (urn, prev_sid, prev_max),
            sum(CASE WHEN urn = 1 OR session_id IS DISTINCT FROM prev_sid
                      OR (session_id IS NULL AND ts - prev_max > {reg.session_gap_ms}) THEN 1 ELSE 0 END)
                OVER (PARTITION BY user_id ORDER BY off ROWS UNBOUNDED PRECEDING) - 1 AS sess,
            max(ts) OVER (PARTITION BY user_id ORDER BY off ROWS UNBOUNDED PRECEDING) AS user_max
        FROM a""")
    con.execute("CREATE OR REPLACE TEMP TABLE ev AS SELECT off, wm_after FROM ev")


def _prepare_spine(con: duckdb.DuckDBPyConnection, spine: pa.Table, reg: FeatureRegistry) -> None:
    """sp: spine rows with rid, t, o and m (the watermark once offset o had arrived); plus, when a feature
    reads sessions, the user's current session (open or not)."""
    spine = spine.append_column("__rid", pa.array(range(spine.num_rows), pa.int64()))
    con.register("__spine_in", spine)
    keys = ", ".join(c for c in ("user_id", "item_id") if c in spine.column_names)
    keys = keys + "," if keys else ""
    if "offset" in spine.column_names:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE sp0 AS
            SELECT s.__rid AS rid, {keys} s.ts AS t, s."offset" AS o, e.wm_after AS m
            FROM __spine_in s ASOF LEFT JOIN (SELECT off, wm_after FROM ev) e ON s."offset" >= e.off""")
    else:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE sp0 AS
            WITH marks AS (SELECT wm_after, max(off) AS off FROM ev GROUP BY wm_after)
            SELECT s.__rid AS rid, {keys} s.ts AS t, coalesce(m.off, -1) AS o, m.wm_after AS m
            FROM __spine_in s ASOF LEFT JOIN marks m ON s.ts >= m.wm_after""")
    if any(f.window.kind in ("session", "before_session") for f in reg):
        con.execute(f"""CREATE OR REPLACE TEMP TABLE sp AS
            SELECT s.*, a.sess AS cur_sess,
                   a.off IS NOT NULL
                       AND (a.session_id IS NOT NULL OR s.t - a.user_max <= {reg.session_gap_ms})
                       AS is_open,
                   f.first_off
            FROM sp0 s
            ASOF LEFT JOIN acc a ON s.user_id = a.user_id AND s.o >= a.off
            LEFT JOIN (SELECT user_id, sess, min(off) AS first_off FROM acc GROUP BY ALL) f
                   ON f.user_id = s.user_id AND f.sess = a.sess""")
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE sp AS SELECT * FROM sp0")


def _value_sql(f: Feature) -> str:
    """The SQL twin of `Feature.value` / `Feature.number` (the parity tests hold them equal)."""
    if f.field is None:
        return "NULL::VARCHAR"
    prop = f.property_name
    if prop is None:
        return _q(f.field)
    path = _lit("$." + prop)
    if f.reads_number:
        return (
            f"CASE WHEN json_type(properties, {path}) IN ('BIGINT', 'UBIGINT', 'DOUBLE') "
            f"THEN CAST(json_extract(properties, {path}) AS DOUBLE) END"
        )
    return f"CASE WHEN json_type(properties, {path}) = 'VARCHAR' THEN json_extract_string(properties, {path}) END"


def _source(con: duckdb.DuckDBPyConnection, f: Feature, table: str) -> None:
    """The events (or, for covisit, the item pairs) one feature aggregates: keys, value, ts, off, ..."""
    where = "TRUE" if f.actions is None else f"action IN ({', '.join(_lit(a) for a in f.actions)})"
    if f.agg != "covisit":
        value = _value_sql(f)
        has_value = "TRUE" if f.field is None else f"({value}) IS NOT NULL"
        con.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS
            SELECT user_id, item_id, ts, off, sess, action, category, {value} AS value
            FROM acc WHERE {where} AND {has_value}""")
        return
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS
        WITH f AS (
            SELECT user_id, sess, item_id, ts, off,
                   row_number() OVER (PARTITION BY user_id, sess ORDER BY off) AS rn
            FROM acc WHERE {where}
        ),
        e AS (SELECT *, unnest(range(greatest(rn - {f.span}, 1), rn)) AS prn FROM f),
        pairs AS (
            SELECT e.item_id AS a, p.item_id AS b, e.ts, e.off
            FROM e JOIN f p ON p.user_id = e.user_id AND p.sess = e.sess AND p.rn = e.prn
            WHERE p.item_id <> e.item_id AND abs(p.ts - e.ts) <= {f.gap_ms}
        )
        SELECT NULL::VARCHAR AS user_id, a AS item_id, ts, off, NULL::BIGINT AS sess, NULL::VARCHAR AS action,
               NULL::VARCHAR AS category, b AS value FROM pairs
        UNION ALL
        SELECT NULL, b, ts, off, NULL, NULL, NULL, a FROM pairs""")


def _window_start(w: Window) -> str:
    """SQL for `Window.start(t)` of a sliding window, on the spine's column t."""
    return f"(t // {w.tile_ms} - {w.tiles - 1}) * {w.tile_ms}"


def _candidates(
    con: duckdb.DuckDBPyConnection,
    f: Feature,
    src: str,
    cand: str,
    spine: str = "sp",
    span: tuple[str, str, int] | None = None,
) -> None:
    """(rid, event) pairs: the events of the row's key inside its window, arrived by its offset.

    `span` = (lo, hi, width): SQL bounds on the spine's columns with hi - lo < width; only events with
    lo <= ts <= hi are read (a sliding window's own span by default)."""
    keys = ENTITY_KEYS["item" if f.agg == "covisit" else f.entity]
    on = [f"s.{k} = x.{k}" for k in keys] + ["x.off <= s.o", "x.ts <= s.t"]
    w = f.window
    if span is None and w.kind == "sliding":
        span = (_window_start(w), "t", w.length_ms)
    if span is not None:  # buckets as wide as the span: it lies in at most two of them
        lo, hi, width = span
        buckets = f"list_distinct([({lo}) // {width}, ({hi}) // {width}])"
        spine = f"(SELECT *, {lo} AS lo, unnest({buckets}) AS b FROM {spine})"
        on += ["x.ts >= s.lo", f"x.ts // {width} = s.b"]
    elif w.kind == "session":
        on += ["s.is_open", "x.sess = s.cur_sess"]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand} AS
        SELECT s.rid, x.item_id, x.ts, x.off, x.action, x.category, x.value
        FROM {spine} s JOIN {src} x ON {" AND ".join(on)}""")


def _counts(f: Feature) -> list[tuple[str, str]]:
    """(name, condition) of each count a count / counts_by_action value adds up."""
    if f.agg == "count":
        return [("n", "TRUE")]
    return [(a, f"action = {_lit(a)}") for a in ACTIONS]


def _tile_g(f: Feature) -> int:
    """The tile size of `_tiled`'s running counts: g = gcd(tile, 1 min), so window edges fall on tiles."""
    return math.gcd(f.window.tile_ms, MINUTE_MS)


def _tile_counts(con: duckdb.DuckDBPyConnection, f: Feature, src: str) -> None:
    """`_tiled`'s index: running counts per (key, tile of g)."""
    keys = ENTITY_KEYS[f.entity]
    g = _tile_g(f)
    by = f"PARTITION BY {', '.join(keys)} " if keys else ""
    counts = _counts(f)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_tiles AS
        SELECT {"".join(k + ", " for k in keys)} g,
               {", ".join(f"(sum({_q(c)}) OVER ({by}ORDER BY g))::BIGINT AS {_q(c)}" for c, _ in counts)}
        FROM (SELECT {"".join(k + ", " for k in keys)} ts // {g} AS g,
                     {", ".join(f"count(*) FILTER (WHERE {cond}) AS {_q(c)}" for c, cond in counts)}
              FROM {src} GROUP BY ALL)""")


def _tiled(con: duckdb.DuckDBPyConnection, f: Feature, reg: FeatureRegistry, src: str, cand: str) -> str:
    """count / counts_by_action over a sliding or unbounded window from running per-tile counts.

    An accepted event that arrived after offset o has ts >= m - lateness (m: the watermark once o had
    arrived), so every accepted event with ts < cut = min(t + 1, m - lateness) is visible to the row. The
    tiles (of g = gcd(tile, 1 min), so window edges fall on them) wholly before the cut come from running
    counts per key (two ASOF joins); only the events from the cut's tile to min(t, m), a span shorter than
    lateness + g, are read one by one. Returns the SELECT rid, v of the feature."""
    keys = ENTITY_KEYS[f.entity]
    counts = _counts(f)
    g = _tile_g(f)
    start = _window_start(f.window) if f.window.kind == "sliding" else "0"
    cut = f"least(t + 1, m - {reg.lateness_ms})"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_sp AS
        SELECT *, CASE WHEN m IS NULL THEN lo_tile ELSE greatest(greatest({cut}, 0) // {g}, lo_tile) END AS hi_tile
        FROM (SELECT *, greatest({start}, 0) // {g} AS lo_tile FROM sp)""")
    _candidates(con, f, src, cand, f"{cand}_sp", (f"hi_tile * {g}", "least(t, m)", reg.lateness_ms + g))
    on = "".join(f"x.{k} = s.{k} AND " for k in keys)
    on_lo = on.replace("x.", "y.")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_tiles AS
        SELECT s.rid, {", ".join(f"x.{_q(c)} - coalesce(y.{_q(c)}, 0) AS {_q(c)}" for c, _ in counts)}
        FROM {cand}_sp s ASOF JOIN {src}_tiles x ON {on}s.hi_tile > x.g
        ASOF LEFT JOIN {src}_tiles y ON {on_lo}s.lo_tile > y.g""")
    total = {c: f"(coalesce(e.{_q(c)}, 0) + coalesce(p.{_q(c)}, 0))::BIGINT" for c, _ in counts}
    v = total["n"] if f.agg == "count" else f"struct_pack({', '.join(f'{_q(c)} := {x}' for c, x in total.items())})"
    return f"""SELECT sp.rid, {v} AS v FROM sp
        LEFT JOIN (SELECT rid, {", ".join(f"count(*) FILTER (WHERE {cond}) AS {_q(c)}" for c, cond in counts)}
                   FROM {cand} GROUP BY rid) e USING (rid)
        LEFT JOIN {cand}_tiles p USING (rid)"""


def _value_keys(f: Feature) -> tuple[str, ...]:
    return ENTITY_KEYS["item" if f.agg == "covisit" else f.entity]


def _block(f: Feature) -> int:
    """`_top_sliding`'s block: about 1/24 of the window, a whole number of tiles."""
    return f.window.tile_ms * max(1, f.window.tiles // 24)


def _value_counts(con: duckdb.DuckDBPyConnection, f: Feature, src: str) -> None:
    """`_top_sliding`'s index: an integer id per (key, value) (`{src}_ids`: pid, and vr, the value's rank by
    name), running counts per pid in time order and in arrival order, and counts per (key, pid, block)."""
    kc = "".join(k + ", " for k in _value_keys(f))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_ids AS
        SELECT {kc} value, row_number() OVER () AS pid, dense_rank() OVER (ORDER BY value) AS vr
        FROM (SELECT DISTINCT {kc} value FROM {src})""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_n AS
        SELECT i.pid, x.ts, x.off, count(*) AS n FROM {src} x JOIN {src}_ids i USING ({kc} value) GROUP BY ALL""")
    for order in ("ts", "off"):
        con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_{order} AS
            SELECT pid, {order}, (sum(n) OVER (PARTITION BY pid ORDER BY {order}))::BIGINT AS cum
            FROM (SELECT pid, {order}, sum(n) AS n FROM {src}_n GROUP BY ALL)""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_b AS
        SELECT {kc} i.pid, x.b, x.n FROM {src}_ids i
        JOIN (SELECT pid, ts // {_block(f)} AS b, sum(n)::BIGINT AS n FROM {src}_n GROUP BY ALL) x USING (pid)""")
    con.execute(f"DROP TABLE {src}_n")


def _top_sliding(con: duckdb.DuckDBPyConnection, f: Feature, reg: FeatureRegistry, src: str, cand: str) -> str:
    """topk_count / covisit over a sliding window from running counts per (key, value) and a shortlist of
    values shared by rows alike, never reading a row's window event by event.

    A value's count for a row is exact from running counts: with cut = max(start, min(t + 1, m - lateness)),
    every accepted event with start <= ts < cut is visible (see `_tiled`), so the count is (ts < cut) -
    (ts < start) plus the events from the cut to min(t, m) read one by one (a span of at most the lateness).
    A settled row (t >= m, start <= m - lateness: everything arrived by o happened by t, and every event
    before the start had arrived) needs no events: its count is (arrived by offset o) - (ts < start).
    Only a shortlist per row is counted. Rows with the same key and the same blocks (of about 1/24 of the
    window) share one: L(v) counts v in the blocks wholly inside [start, cut) (visible to every such row),
    U(v) in the blocks that meet [start, min(t, m)] (at least v's count in every such row); a value with
    U(v) below the k-th largest L is outcounted by k values in each row, so the shortlist is the values with
    U(v) >= that k-th L. Returns the SELECT rid, v of the feature."""
    keys = _value_keys(f)
    kc = "".join(k + ", " for k in keys)
    lat, block = reg.lateness_ms, _block(f)

    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_sp AS
        SELECT *, (s + {block - 1}) // {block} AS bl_lo, c0 // {block} AS bl_hi, s // {block} AS bu_lo,
               (least(t, m) + {block}) // {block} AS bu_hi
        FROM (SELECT rid, {kc} t, o, m, s, greatest(s, least(t + 1, m - {lat})) AS c0,
                     t >= m AND s <= m - {lat} AS settled
              FROM (SELECT *, greatest({_window_start(f.window)}, 0) AS s FROM sp) WHERE m IS NOT NULL)""")
    group = f"{kc}bl_lo, bl_hi, bu_lo, bu_hi"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_e AS
        WITH c AS (
            SELECT gr.*, x.pid, sum(x.n) AS up,
                   coalesce(sum(x.n) FILTER (WHERE x.b >= gr.bl_lo AND x.b < gr.bl_hi), 0) AS low
            FROM (SELECT DISTINCT {group} FROM {cand}_sp) gr
            JOIN {src}_b x ON {"".join(f"x.{k} = gr.{k} AND " for k in keys)}x.b >= gr.bu_lo AND x.b < gr.bu_hi
            GROUP BY ALL)
        SELECT {group}, pid FROM c
        QUALIFY up >= coalesce(nth_value(low, {f.k}) OVER (PARTITION BY {group} ORDER BY low DESC
                                ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING), 0)""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_pv AS
        SELECT s.rid, e.pid, s.s, s.c0, s.o, s.settled FROM {cand}_sp s JOIN {cand}_e e USING ({group})""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_lo AS
        SELECT d.*, coalesce(r.cum, 0) AS lo FROM (SELECT DISTINCT pid, s FROM {cand}_pv) d
        ASOF LEFT JOIN {src}_ts r ON r.pid = d.pid AND d.s > r.ts""")
    unsettled = f"(SELECT * FROM {cand}_sp WHERE NOT settled)"
    _candidates(con, f, src, f"{cand}_tail", unsettled, ("c0", "least(t, m)", lat + 1))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand}_n AS
        SELECT * FROM (
            SELECT p.rid, p.pid, coalesce(q.cum, 0) - d.lo AS n
            FROM (SELECT * FROM {cand}_pv WHERE settled) p JOIN {cand}_lo d USING (pid, s)
            ASOF LEFT JOIN {src}_off q ON q.pid = p.pid AND p.o >= q.off
            UNION ALL
            SELECT p.rid, p.pid, coalesce(r.cum, 0) - d.lo + coalesce(x.n, 0)
            FROM (SELECT * FROM {cand}_pv WHERE NOT settled) p JOIN {cand}_lo d USING (pid, s)
            ASOF LEFT JOIN {src}_ts r ON r.pid = p.pid AND p.c0 > r.ts
            LEFT JOIN (SELECT x.rid, i.pid, count(*) AS n FROM {cand}_tail x JOIN {cand}_sp s USING (rid)
                       JOIN {src}_ids i ON {"".join(f"i.{k} = s.{k} AND " for k in keys)}i.value = x.value
                       GROUP BY ALL) x USING (rid, pid))
        WHERE n > 0""")
    return _top_counts(
        f,
        f"""SELECT c.rid, i.value, c.n FROM {cand}_n c JOIN {src}_ids i USING (pid)
            QUALIFY row_number() OVER (PARTITION BY c.rid ORDER BY c.n DESC, i.vr) <= {f.k}""",
    )


def _ranked(con: duckdb.DuckDBPyConnection, f: Feature, src: str) -> None:
    """`_prefix_last_n`'s index: per user event, its rank by (ts, offset), the count of events ranked at or
    before its ts, and over its last k events in offset order their count and ts range."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {src}_r AS
        SELECT *, max(rk) OVER (PARTITION BY user_id, ts) AS cnt_le FROM (
            SELECT *,
                count(*) OVER w AS cnt_k, min(ts) OVER w AS lb, max(ts) OVER w AS mx,
                max(ts) OVER (PARTITION BY user_id ORDER BY off ROWS UNBOUNDED PRECEDING) AS runmax,
                row_number() OVER (PARTITION BY user_id ORDER BY ts, off) AS rk
            FROM {src}
            WINDOW w AS (PARTITION BY user_id ORDER BY off
                         ROWS BETWEEN {f.k - 1} PRECEDING AND CURRENT ROW))""")


def _prefix_last_n(con: duckdb.DuckDBPyConnection, f: Feature, src: str, cand: str) -> None:
    """last_n over a prefix of the user's log (offset <= p): before-session or unbounded windows."""
    k = f.k
    p = "s.o" if f.window.kind == "unbounded" else "CASE WHEN s.is_open THEN s.first_off - 1 ELSE s.o END"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {cand} AS
        WITH b AS (
            SELECT s.rid, s.user_id, s.t, {p} AS p,
                   CASE WHEN r.cnt_k = {k} AND r.mx <= s.t THEN r.lb END AS lo_ts,
                   least(s.t, r.runmax) AS hi_ts
            FROM sp s ASOF JOIN {src}_r r ON s.user_id = r.user_id AND {p} >= r.off
        ),
        lo AS (
            SELECT b.*, coalesce(r.cnt_le, 0) + 1 AS rank_lo
            FROM b ASOF LEFT JOIN {src}_r r ON b.user_id = r.user_id AND b.lo_ts > r.ts
        ),
        hi AS (
            SELECT lo.*, coalesce(r.cnt_le, 0) AS rank_hi
            FROM lo ASOF LEFT JOIN {src}_r r ON lo.user_id = r.user_id AND lo.hi_ts >= r.ts
        ),
        ranks AS (SELECT rid, user_id, t, p, unnest(range(rank_lo, rank_hi + 1)) AS rk FROM hi)
        SELECT ranks.rid, x.item_id, x.ts, x.off, x.action, x.category, x.value
        FROM ranks JOIN {src}_r x ON x.user_id = ranks.user_id AND x.rk = ranks.rk
        WHERE x.off <= ranks.p AND x.ts <= ranks.t""")


def _aggregate(f: Feature, cand: str) -> str:
    """SELECT rid, value for every spine row (empty windows give the online engine's empty value)."""
    frm = f"sp LEFT JOIN {cand} c USING (rid)"
    if f.agg == "count":
        return f"SELECT sp.rid, count(c.off) AS v FROM {frm} GROUP BY sp.rid"
    if f.agg == "sum":
        return f"SELECT sp.rid, coalesce(sum(c.value), 0)::DOUBLE AS v FROM {frm} GROUP BY sp.rid"
    if f.agg == "age":
        return f"SELECT sp.rid, sp.t - min(c.ts) AS v FROM {frm} GROUP BY sp.rid, sp.t"
    if f.agg == "counts_by_action":
        parts = ", ".join(f"{_q(a)} := count(c.off) FILTER (WHERE c.action = {_lit(a)})" for a in ACTIONS)
        return f"SELECT sp.rid, struct_pack({parts}) AS v FROM {frm} GROUP BY sp.rid"
    if f.agg == "last":
        return (
            "SELECT sp.rid, (list(c.value ORDER BY c.ts DESC, c.off DESC)"
            " FILTER (WHERE c.off IS NOT NULL))[1]"
            f" AS v FROM {frm} GROUP BY sp.rid"
        )
    if f.agg == "last_n":
        elem = "struct_pack(item_id := c.item_id, action := c.action, ts := c.ts, category := c.category)"
        return (
            f"SELECT sp.rid, coalesce(list_reverse((list({elem} ORDER BY c.ts DESC, c.off DESC) "
            f"FILTER (WHERE c.off IS NOT NULL))[1:{f.k}]), []::{_SEQ_TYPE}) AS v FROM {frm} GROUP BY sp.rid"
        )
    if f.agg == "distinct_topk":
        return f"""SELECT sp.rid, coalesce((list(g.value ORDER BY g.m DESC, g.value ASC)
                        FILTER (WHERE g.value IS NOT NULL))[1:{f.k}], []::VARCHAR[]) AS v
                   FROM sp LEFT JOIN (SELECT rid, value, max(ts) AS m FROM {cand} GROUP BY rid, value) g
                   USING (rid) GROUP BY sp.rid"""
    return _top_counts(f, f"SELECT rid, value, count(*) AS n FROM {cand} GROUP BY rid, value")


def _top_counts(f: Feature, counts: str) -> str:
    """topk_count / covisit: the k largest of `counts` (SELECT rid, value, n with n > 0), ties by name."""
    name = f.field or "item_id"
    return f"""SELECT sp.rid, coalesce((list(struct_pack({_q(name)} := g.value, count := g.n)
                    ORDER BY g.n DESC, g.value ASC) FILTER (WHERE g.value IS NOT NULL))[1:{f.k}],
                    []::STRUCT({_q(name)} VARCHAR, count BIGINT)[]) AS v
               FROM sp LEFT JOIN ({counts}) g USING (rid) GROUP BY sp.rid"""


def _method(f: Feature) -> str:
    """How `compute` answers a feature: "tiled", "top", "prefix" or "window" (see the module docstring)."""
    if f.agg in ("count", "counts_by_action") and f.window.kind in ("unbounded", "sliding"):
        return "tiled"
    if f.agg in ("topk_count", "covisit") and f.window.kind == "sliding":
        return "top"
    if f.agg == "last_n" and f.window.kind in ("unbounded", "before_session"):
        return "prefix"
    return "window"


def _index(con: duckdb.DuckDBPyConnection, f: Feature, src: str) -> None:
    """What a feature reads that does not depend on the spine, built once per `compute`: its source and
    its method's index."""
    _source(con, f, src)
    index = {"tiled": _tile_counts, "top": _value_counts, "prefix": _ranked}.get(_method(f))
    if index is not None:
        index(con, f, src)


def _answer(con: duckdb.DuckDBPyConnection, f: Feature, reg: FeatureRegistry, src: str, cand: str) -> str:
    """The SELECT rid, v of a feature for the spine rows in `sp`."""
    method = _method(f)
    if method == "tiled":
        return _tiled(con, f, reg, src, cand)
    if method == "top":
        return _top_sliding(con, f, reg, src, cand)
    if method == "prefix":
        _prefix_last_n(con, f, src, cand)
    else:
        _candidates(con, f, src, cand)
    return _aggregate(f, cand)


def sessions(
    registry: FeatureRegistry, events: EventsLike, *, con: duckdb.DuckDBPyConnection | None = None
) -> duckdb.DuckDBPyRelation:
    """The events the engines accept under `registry`'s lateness rule, in offset order, each with its
    session number under the session rule: columns `offset, user_id, item_id, action, ts, session_id,
    surface, properties, category, subcategory, brand, price, price_band, sess` (sess: 0, 1, ... per user,
    in arrival order).
    Materialised on `con` as the temp table `accepted_sessions` (replaced by the next call on `con`)."""
    con = con or connect()
    _prepare(con, _events_sql(con, events), registry)
    con.execute("""CREATE OR REPLACE TEMP TABLE accepted_sessions AS
        SELECT off AS "offset", * EXCLUDE (off, wm_prev, wm_after, user_max) FROM acc ORDER BY off""")
    return con.table("accepted_sessions")


def compute_chunks(
    features: FeatureRegistry | Iterable[Feature],
    events: EventsLike,
    spine: pa.Table,
    *,
    con: duckdb.DuckDBPyConnection | None = None,
    chunk_rows: int = 1_000_000,
) -> Iterator[pa.Table]:
    """`compute`, one table per `chunk_rows` spine rows (at least one), each yielded as soon as it is
    answered: a caller that reduces each chunk holds one chunk of feature values at a time."""
    reg = features if isinstance(features, FeatureRegistry) else FeatureRegistry.of(features)
    missing = {k for f in reg for k in f.keys} - set(spine.column_names)
    if "ts" not in spine.column_names or missing:
        raise ValueError(f"the spine needs columns ts and {sorted(missing)}")
    con = con or connect()
    con.execute("SET preserve_insertion_order = true")
    _prepare(con, _events_sql(con, events), reg)
    for n, f in enumerate(reg):
        _index(con, f, f"src_{n}")
    selects = ", ".join(f"r{n}.v AS {_q(f.name)}" for n, f in enumerate(reg))
    joins = " ".join(f"LEFT JOIN res_{n} r{n} ON r{n}.rid = s.__rid" for n in range(len(reg.features)))
    for lo in range(0, max(spine.num_rows, 1), chunk_rows):
        _prepare_spine(con, spine.slice(lo, chunk_rows), reg)
        for n, f in enumerate(reg):
            con.execute(f"CREATE OR REPLACE TEMP TABLE res_{n} AS {_answer(con, f, reg, f'src_{n}', f'cand_{n}')}")
        yield con.sql(
            f"SELECT s.* EXCLUDE (__rid), {selects} FROM __spine_in s {joins} ORDER BY s.__rid"
        ).to_arrow_table()


def compute(
    features: FeatureRegistry | Iterable[Feature],
    events: EventsLike,
    spine: pa.Table,
    *,
    con: duckdb.DuckDBPyConnection | None = None,
    chunk_rows: int = 1_000_000,
) -> pa.Table:
    """Point-in-time feature values: the spine's columns plus one column per feature, in spine order.

    `events`: an Arrow table, a DuckDB relation or a Parquet path/glob with `EVENT_ARROW_SCHEMA`, holding
    the log from offset 0 (the lateness rule needs every earlier event). `spine`: columns `ts` plus the
    entity keys the features need (`user_id`, `item_id`), optionally `offset`. The events are indexed once;
    the spine is answered `chunk_rows` rows at a time (memory bounded by the chunk, not the spine).
    """
    return pa.concat_tables(list(compute_chunks(features, events, spine, con=con, chunk_rows=chunk_rows)))
