"""The Spark offline engine: the same declarations, point-in-time, on Apache Spark (`local[*]` or a cluster).

The rules are the DuckDB engine's (`insession.features.offline`), restated with joins Spark can spread:

- Lateness: an event's watermark at arrival is the running max of ts in offset order. A global running
  window would put the whole log in one task, so the log is cut into blocks of `BLOCK` offsets: the running
  max inside a block plus the max of the blocks before it (a small table).
- As-of joins are sort-based (`_asof`): the spine's rows and the index's rows in one relation, partitioned
  by key and sorted by position, each spine row taking the last index row before it. Spark's window
  operator streams a sorted partition and spills it, so no step holds a key's history in memory.
- count / counts_by_action / sum over sliding or unbounded windows: every accepted event with
  ts < cut = max(start, min(t + 1, m - lateness)) is visible to a row (m: the watermark once its offset had
  arrived; a later arrival has ts >= m - lateness), so the value is a difference of two running sums per
  key found by as-of joins, plus the events from the cut to min(t, m) read one by one: a span of at most
  the lateness, joined on (key, bucket of that width).
- last / last_n over sliding, unbounded and before-session windows: the k latest visible events are among
  the events of that short tail and the k latest with ts < cut, whose ranks (per key, by ts then offset)
  end at the rank an as-of join finds; they are joined on (key, bucket of k ranks).
- Everything else (distinct_topk, topk_count, age, covisit, session windows) joins each row with its
  key's events inside its window: sliding windows on (key, bucket of the window's length, at most two
  per row), session windows on (user, session). Unbounded distinct_topk / topk_count / age read the key's
  whole history (no default feature uses one; the DuckDB engine does the same).

Nothing explodes a history into per-row arrays: the only arrays built are of at most two buckets per row,
the co-visitation span (`span` earlier events), and the at most k values a feature returns.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from insession.features.declare import ENTITY_KEYS, Feature, FeatureRegistry
from insession.offline import (
    ACCEPTED_COLUMNS,
    ACCEPTED_SCHEMA,
    EventsLike,
    OfflineEngine,
    as_registry,
    check_spine,
    value_type,
)
from insession.schema import ACTIONS, EVENT_ARROW_SCHEMA

BLOCK = 1 << 20  # offsets per block of the watermark's running max
_EVENT_COLUMNS = [c for c in ACCEPTED_COLUMNS if c not in ("offset", "sess")]


def spark_session(master: str = "local[*]", *, ui: bool = True, conf: dict[str, str] | None = None):  # noqa: ANN201
    """A SparkSession for the engine (the process's existing one if there is one: Spark allows one per JVM).

    Defaults sized for a 2-core, 24 GiB machine: shuffle partitions = 4 x local cores, 2 GiB of driver heap
    (`INSESSION_SPARK_DRIVER_MEMORY`), UTC, loopback driver for local masters. `conf` overrides any of them
    (a cluster's executors, memory, object-store credentials)."""
    from pyspark.sql import SparkSession

    settings = {
        "spark.app.name": "insession-offline",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(4 * (os.cpu_count() or 2)),
        "spark.driver.memory": os.environ.get("INSESSION_SPARK_DRIVER_MEMORY", "2g"),
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.local.dir": str(Path(tempfile.gettempdir()) / "insession-spark"),
    }
    if master.startswith("local"):
        settings |= {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    settings |= conf or {}
    builder = SparkSession.builder.master(master)
    for k, v in settings.items():
        builder = builder.config(k, v)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value_sql(f: Feature) -> str:
    """The Spark SQL twin of `Feature.value` / `Feature.number`: a property counts only as text (a number
    for sum), told apart through Spark's VARIANT type (a JSON number and a JSON string print alike)."""
    if f.field is None:
        return "CAST(NULL AS STRING)"
    prop = f.property_name
    if prop is None:
        return f"`{f.field}`"
    path = _lit("$." + prop)
    v = f"variant_get(parse_json(properties), {path})"
    if f.reads_number:
        return (
            f"CASE WHEN schema_of_variant({v}) RLIKE '^(TINYINT|SMALLINT|INT|BIGINT|DECIMAL|FLOAT|DOUBLE)' "
            f"THEN variant_get(parse_json(properties), {path}, 'double') END"
        )
    return f"CASE WHEN schema_of_variant({v}) = 'STRING' THEN variant_get(parse_json(properties), {path}, 'string') END"


def _keys(f: Feature) -> list[str]:
    return list(ENTITY_KEYS["item" if f.agg == "covisit" else f.entity])


def _method(f: Feature) -> str:
    if f.agg in ("count", "counts_by_action", "sum") and f.window.kind in ("unbounded", "sliding"):
        return "running"
    if f.agg in ("last", "last_n") and f.window.kind in ("unbounded", "sliding", "before_session"):
        return "latest"
    return "window"


def _start_sql(f: Feature, t: str = "t") -> str | None:
    w = f.window
    return f"({t} DIV {w.tile_ms} - {w.tiles - 1}) * {w.tile_ms}" if w.kind == "sliding" else None


class SparkEngine(OfflineEngine):
    """The offline engine on Spark; `master` any Spark master URL, or pass a `session` already made."""

    name = "spark"

    def __init__(self, master: str = "local[*]", *, session=None, conf: dict[str, str] | None = None) -> None:  # noqa: ANN001
        self._own = session is None
        self.spark = session if session is not None else spark_session(master, conf=conf)
        self._n = 0
        self._views: list[str] = []

    def describe(self) -> str:
        sc = self.spark.sparkContext
        ui = sc.uiWebUrl or "disabled"
        return f"spark {self.spark.version} on {sc.master} (UI: {ui})"

    def close(self) -> None:
        if self._own:
            self.spark.stop()

    # -- inputs ---------------------------------------------------------------------------------------

    def _events(self, events: EventsLike):  # noqa: ANN202
        if isinstance(events, pa.Table):
            return self.spark.createDataFrame(events.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA))
        path = str(events)
        local = Path(path)
        if "://" not in path and local.is_dir() and (local / "history").is_dir():
            path = str(local / "history")
        df = self.spark.read.option("mergeSchema", "true").parquet(path)
        from pyspark.sql import functions as F  # noqa: N812

        for f in EVENT_ARROW_SCHEMA:
            if f.name not in df.columns:
                df = df.withColumn(
                    f.name, F.lit(None).cast({pa.int64(): "bigint", pa.float64(): "double"}.get(f.type, "string"))
                )
        return df

    def _view(self, df, name: str) -> str:  # noqa: ANN001
        self._n += 1
        full = f"__{name}_{self._n}"
        df.createOrReplaceTempView(full)
        self._views.append(full)
        return full

    def _release(self) -> None:
        """Drop the views and cached tables of the last call."""
        for v in self._views:
            self.spark.catalog.dropTempView(v)
        self._views.clear()
        self.spark.catalog.clearCache()

    def _sql(self, text: str):  # noqa: ANN202
        return self.spark.sql(text)

    def _persist(self, df):  # noqa: ANN001, ANN202
        from pyspark import StorageLevel

        return df.persist(StorageLevel.MEMORY_AND_DISK)

    def _prepare(self, events: EventsLike, reg: FeatureRegistry) -> tuple[str, str]:
        """(ev, acc) views: every event's offset and watermark after arrival; the accepted events with
        `sess`, `user_max` (the user's max ts so far) and `wm_prev` (the watermark before it arrived)."""
        raw = self._view(self._events(events), "raw")
        blocks = self._view(
            self._persist(
                self._sql(f"""
            SELECT b, max(bmax) OVER (ORDER BY b ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
            FROM (SELECT `offset` DIV {BLOCK} AS b, max(ts) AS bmax FROM {raw} GROUP BY 1)""")
            ),
            "blocks",
        )
        ev = self._view(
            self._persist(
                self._sql(f"""
            SELECT e.*, greatest(p.before, max(e.ts) OVER (PARTITION BY e.b ORDER BY e.off
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS wm_prev,
                   greatest(p.before, max(e.ts) OVER (PARTITION BY e.b ORDER BY e.off
                                 ROWS UNBOUNDED PRECEDING)) AS wm_after
            FROM (SELECT `offset` AS off, `offset` DIV {BLOCK} AS b, {", ".join(_EVENT_COLUMNS)} FROM {raw}) e
            JOIN {blocks} p ON p.b = e.b""")
            ),
            "ev",
        )
        acc = self._view(
            self._persist(
                self._sql(f"""
            WITH a AS (
                SELECT *,
                    row_number() OVER (PARTITION BY user_id ORDER BY off) AS urn,
                    lag(session_id) OVER (PARTITION BY user_id ORDER BY off) AS prev_sid,
                    max(ts) OVER (PARTITION BY user_id ORDER BY off
                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_max
                FROM {ev} WHERE wm_prev IS NULL OR ts >= wm_prev - {reg.lateness_ms})
            SELECT off, {", ".join(_EVENT_COLUMNS)}, wm_prev,
                sum(CASE WHEN urn = 1 OR session_id IS DISTINCT FROM prev_sid
                          OR (session_id IS NULL AND ts - prev_max > {reg.session_gap_ms}) THEN 1 ELSE 0 END)
                    OVER (PARTITION BY user_id ORDER BY off ROWS UNBOUNDED PRECEDING) - 1 AS sess,
                max(ts) OVER (PARTITION BY user_id ORDER BY off ROWS UNBOUNDED PRECEDING) AS user_max
            FROM a""")
            ),
            "acc",
        )
        return ev, acc

    def _asof(self, left: str, pos: str, right: str, rpos: str, keys: list[str], cols: list[str], strict: bool) -> str:
        """A view of `left`'s rows (rid, keys, ...) with `cols` of the last `right` row of the same keys whose
        `rpos` is before `pos` (< when strict, else <=); NULL when none. `right` holds one row per (keys,
        rpos). Sort-based: both sides in one relation partitioned by keys, ordered by position."""
        lside, rside = (0, 1) if strict else (1, 0)
        kc = "".join(f"{k}, " for k in keys)
        part = f"PARTITION BY {', '.join(keys)} " if keys else ""
        # The right row travels as one struct (NULL only on left rows), so `last(.., true)` takes every column
        # from the same row; per column it would skip a NULL value of the latest row for an older one's.
        packed = "named_struct(" + ", ".join(f"'{c}', {c}" for c in cols) + ")"
        return self._view(
            self._sql(f"""
            SELECT rid, {", ".join(f"r.{c} AS {c}" for c in cols)} FROM (
                SELECT rid, side, last(r, true) OVER w AS r FROM (
                    SELECT rid, {kc}{pos} AS pos, {lside} AS side, NULL AS r FROM {left}
                    UNION ALL
                    SELECT NULL, {kc}{rpos}, {rside}, {packed} FROM {right})
                WINDOW w AS ({part}ORDER BY pos, side ROWS UNBOUNDED PRECEDING))
            WHERE side = {lside}"""),
            "asof",
        )

    def _prepare_spine(self, spine: pa.Table, reg: FeatureRegistry, ev: str, acc: str) -> str:
        """The view sp: rid, keys, t, o, m (the watermark once offset o had arrived) and, when a feature
        reads sessions, the user's current session (cur_sess, is_open, first_off, m_first: the watermark
        before the session's first event)."""
        keys = [c for c in ("user_id", "item_id") if c in spine.column_names]
        kc = "".join(f"{k}, " for k in keys)
        cols = [spine[k] for k in keys] + [spine["ts"]]
        names = [*keys, "t"]
        if "offset" in spine.column_names:
            cols.append(spine["offset"])
            names.append("o")
        cols.append(pa.array(range(spine.num_rows), pa.int64()))
        names.append("rid")
        s_in = self._view(self.spark.createDataFrame(pa.table(cols, names=names)), "spine_in")
        if "o" in names:
            blocks_m = self._view(self._sql(f"SELECT off DIV {BLOCK} AS b, max(ts) AS bmax FROM {ev} GROUP BY 1"), "bm")
            inner = self._asof(
                f"(SELECT rid, o DIV {BLOCK} AS b, o FROM {s_in})",
                "o",
                f"(SELECT b, off, wm_after FROM {ev})",
                "off",
                ["b"],
                ["wm_after"],
                strict=False,
            )
            before = self._view(
                self._sql(f"""
                SELECT s.rid, max(x.bmax) AS before FROM {s_in} s JOIN {blocks_m} x ON x.b < s.o DIV {BLOCK}
                GROUP BY s.rid"""),
                "before",
            )
            sp0 = self._sql(f"""
                SELECT s.rid, {kc}s.t, s.o,
                       CASE WHEN s.o >= 0 THEN greatest(i.wm_after, b.before) END AS m
                FROM {s_in} s JOIN {inner} i USING (rid) LEFT JOIN {before} b USING (rid)""")
        else:
            marks = self._view(self._sql(f"SELECT wm_after, max(off) AS off FROM {ev} GROUP BY wm_after"), "marks")
            found = self._asof(s_in, "t", marks, "wm_after", [], ["wm_after", "off"], strict=False)
            sp0 = self._sql(f"""SELECT s.rid, {kc}s.t, coalesce(a.off, -1) AS o, a.wm_after AS m
                                FROM {s_in} s JOIN {found} a USING (rid)""")
        if not any(f.window.kind in ("session", "before_session") for f in reg):
            return self._view(self._persist(sp0), "sp")
        sp0v = self._view(sp0, "sp0")
        cur = self._asof(
            sp0v,
            "o",
            f"(SELECT user_id, off, sess, session_id, user_max FROM {acc})",
            "off",
            ["user_id"],
            ["off", "sess", "session_id", "user_max"],
            strict=False,
        )
        first = (
            f"(SELECT user_id, sess, min(off) AS first_off, min_by(wm_prev, off) AS m_first FROM {acc} GROUP BY 1, 2)"
        )
        return self._view(
            self._persist(
                self._sql(f"""
            SELECT s.*, a.sess AS cur_sess,
                   coalesce(a.off IS NOT NULL
                            AND (a.session_id IS NOT NULL OR s.t - a.user_max <= {reg.session_gap_ms}), false)
                       AS is_open,
                   f.first_off, f.m_first
            FROM {sp0v} s JOIN {cur} a USING (rid)
            LEFT JOIN {first} f ON f.user_id = s.user_id AND f.sess = a.sess""")
            ),
            "sp",
        )

    # -- per feature ----------------------------------------------------------------------------------

    def _source(self, f: Feature, acc: str) -> str:
        """The events (for covisit, the item pairs) a feature aggregates: keys, ts, off, sess, action,
        item_id, category, value."""
        where = "TRUE" if f.actions is None else f"action IN ({', '.join(_lit(a) for a in f.actions)})"
        if f.agg != "covisit":
            value = _value_sql(f)
            has = "TRUE" if f.field is None else f"({value}) IS NOT NULL"
            return self._view(
                self._persist(
                    self._sql(f"""
                SELECT user_id, item_id, ts, off, sess, action, category, {value} AS value
                FROM {acc} WHERE {where} AND {has}""")
                ),
                "src",
            )
        return self._view(
            self._persist(
                self._sql(f"""
            WITH f AS (
                SELECT user_id, sess, item_id, ts, off,
                       row_number() OVER (PARTITION BY user_id, sess ORDER BY off) AS rn
                FROM {acc} WHERE {where}),
            e AS (SELECT *, explode(sequence(greatest(rn - {f.span}, 1), rn)) AS prn FROM f),
            pairs AS (
                SELECT e.item_id AS a, p.item_id AS b, e.ts, e.off
                FROM e JOIN f p ON p.user_id = e.user_id AND p.sess = e.sess AND p.rn = e.prn
                WHERE e.prn < e.rn AND p.item_id <> e.item_id AND abs(p.ts - e.ts) <= {f.gap_ms})
            SELECT CAST(NULL AS STRING) AS user_id, a AS item_id, ts, off, CAST(NULL AS BIGINT) AS sess,
                   CAST(NULL AS STRING) AS action, CAST(NULL AS STRING) AS category, b AS value FROM pairs
            UNION ALL
            SELECT NULL, b, ts, off, NULL, NULL, NULL, a FROM pairs""")
            ),
            "src",
        )

    def _metrics(self, f: Feature) -> list[tuple[str, str]]:
        """(name, per-event SQL) of the running sums a `running` feature adds up."""
        if f.agg == "count":
            return [("n", "1")]
        if f.agg == "sum":
            return [("n", "value")]
        return [(f"n_{a}", f"CASE WHEN action = {_lit(a)} THEN 1 ELSE 0 END") for a in ACTIONS]

    def _index(self, f: Feature, src: str) -> str | None:
        """The spine-independent index of a feature's method: running sums per (key, ts), or per-key ranks
        (by ts, offset) with the count of events at or before each ts."""
        keys = _keys(f)
        kc = "".join(f"{k}, " for k in keys)
        part = f"PARTITION BY {', '.join(keys)} " if keys else ""
        method = _method(f)
        if method == "running":
            ms = self._metrics(f)
            return self._view(
                self._persist(
                    self._sql(f"""
                SELECT {kc}ts, {", ".join(f"sum({c}) OVER w AS {c}" for c, _ in ms)} FROM (
                    SELECT {kc}ts, {", ".join(f"sum({e}) AS {c}" for c, e in ms)} FROM {src} GROUP BY {kc}ts)
                WINDOW w AS ({part}ORDER BY ts ROWS UNBOUNDED PRECEDING)""")
                ),
                "run",
            )
        if method == "latest":
            return self._view(
                self._persist(
                    self._sql(f"""
                SELECT *, max(rk) OVER (PARTITION BY {kc}ts) AS cnt_le FROM (
                    SELECT *, row_number() OVER ({part}ORDER BY ts, off) AS rk FROM {src})""")
                ),
                "ranked",
            )
        return None

    def _bounds(self, f: Feature, sp: str, reg: FeatureRegistry) -> str:
        """Rows with an effective offset/watermark (before-session: just before the session) and their cut."""
        keys = _keys(f)
        kc = "".join(f"{k}, " for k in keys)
        start = _start_sql(f) or "CAST(NULL AS BIGINT)"
        if f.window.kind == "before_session":
            oe, me = "CASE WHEN is_open THEN first_off - 1 ELSE o END", "CASE WHEN is_open THEN m_first ELSE m END"
        else:
            oe, me = "o", "m"
        return self._view(
            self._sql(f"""
            SELECT *, CASE WHEN st IS NULL THEN least(t + 1, me - {reg.lateness_ms})
                           ELSE greatest(st, least(t + 1, me - {reg.lateness_ms})) END AS cut,
                      least(t, me) AS hi
            FROM (SELECT rid, {kc}t, CAST({start} AS BIGINT) AS st, {oe} AS oe, {me} AS me FROM {sp})
            WHERE me IS NOT NULL"""),
            "bounds",
        )

    def _tail(self, f: Feature, bounds: str, src: str, reg: FeatureRegistry) -> str:
        """(rid, event) pairs of the events from each row's cut to min(t, m) that arrived by its offset:
        a span of at most the lateness, joined on (key, bucket of lateness + 1 ms)."""
        keys = _keys(f)
        width = reg.lateness_ms + 1
        on = "".join(f"x.{k} = s.{k} AND " for k in keys)
        return self._view(
            self._sql(f"""
            SELECT s.rid, x.ts, x.off, x.item_id, x.action, x.category, x.value
            FROM (SELECT *, explode(sequence(cut DIV {width}, hi DIV {width})) AS b FROM {bounds} WHERE cut <= hi) s
            JOIN (SELECT *, ts DIV {width} AS b FROM {src}) x
              ON {on}x.b = s.b AND x.ts >= s.cut AND x.ts <= s.hi AND x.off <= s.oe"""),
            "tail",
        )

    def _running(self, f: Feature, sp: str, src: str, index: str, reg: FeatureRegistry) -> str:
        keys = _keys(f)
        ms = [c for c, _ in self._metrics(f)]
        b = self._bounds(f, sp, reg)
        at_cut = self._asof(b, "cut", index, "ts", keys, ms, strict=True)
        at_start = self._asof(b, "st", index, "ts", keys, ms, strict=True)
        tail = self._tail(f, b, src, reg)
        per_event = dict(self._metrics(f))
        tail_sums = f"(SELECT rid, {', '.join(f'sum({per_event[c]}) AS {c}' for c in ms)} FROM {tail} GROUP BY rid)"
        total = {c: f"coalesce(c.{c}, 0) - coalesce(s.{c}, 0) + coalesce(x.{c}, 0)" for c in ms}
        if f.agg == "count":
            v = f"CAST({total['n']} AS BIGINT)"
        elif f.agg == "sum":
            v = f"CAST({total['n']} AS DOUBLE)"
        else:
            v = "named_struct(" + ", ".join(f"{_lit(a)}, CAST({total['n_' + a]} AS BIGINT)" for a in ACTIONS) + ")"
        return self._view(
            self._sql(f"""
            SELECT b.rid, {v} AS v FROM {b} b JOIN {at_cut} c USING (rid) JOIN {at_start} s USING (rid)
            LEFT JOIN {tail_sums} x USING (rid)"""),
            "res",
        )

    def _latest(self, f: Feature, sp: str, src: str, index: str, reg: FeatureRegistry) -> str:
        keys = _keys(f)
        k = f.k if f.agg == "last_n" else 1
        b = self._bounds(f, sp, reg)
        rank = self._asof(
            b,
            "cut",
            f"(SELECT DISTINCT {''.join(c + ', ' for c in keys)}ts, cnt_le FROM {index})",
            "ts",
            keys,
            ["cnt_le"],
            strict=True,
        )
        on = "".join(f"x.{c} = s.{c} AND " for c in keys)
        early = f"""
            SELECT s.rid, x.ts, x.off, x.item_id, x.action, x.category, x.value
            FROM (SELECT b.*, r.cnt_le AS hi_rk, greatest(r.cnt_le - {k - 1}, 1) AS lo_rk,
                         explode(sequence(greatest(r.cnt_le - {k - 1}, 1) DIV {k}, r.cnt_le DIV {k})) AS bk
                  FROM {b} b JOIN {rank} r USING (rid) WHERE r.cnt_le >= 1) s
            JOIN (SELECT *, rk DIV {k} AS bk FROM {index}) x
              ON {on}x.bk = s.bk AND x.rk BETWEEN s.lo_rk AND s.hi_rk AND (s.st IS NULL OR x.ts >= s.st)"""
        cand = self._view(self._sql(f"SELECT * FROM {self._tail(f, b, src, reg)} UNION ALL {early}"), "cand")
        return self._aggregate(f, cand, sp)

    def _window(self, f: Feature, sp: str, src: str) -> str:
        """(rid, event) pairs of every event of the row's key inside its window, then the aggregate."""
        keys = _keys(f)
        on = [f"x.{c} = s.{c}" for c in keys] + ["x.off <= s.o", "x.ts <= s.t"]
        rows = sp
        xs = src
        w = f.window
        if w.kind == "sliding":
            rows = f"(SELECT *, {_start_sql(f)} AS st FROM {sp})"
            rows = f"(SELECT *, explode(sequence(st DIV {w.length_ms}, t DIV {w.length_ms})) AS bk FROM {rows})"
            xs = f"(SELECT *, ts DIV {w.length_ms} AS bk FROM {src})"
            on += ["x.bk = s.bk", "x.ts >= s.st"]
        elif w.kind == "session":
            on += ["s.is_open", "x.sess = s.cur_sess"]
        cand = self._view(
            self._sql(f"""
            SELECT s.rid, x.ts, x.off, x.item_id, x.action, x.category, x.value
            FROM {rows} s JOIN {xs} x ON {" AND ".join(on)}"""),
            "cand",
        )
        return self._aggregate(f, cand, sp)

    def _aggregate(self, f: Feature, cand: str, sp: str) -> str:
        """(rid, v) from (rid, event) pairs; rows without events are left to the default of `_defaults`."""
        if f.agg == "count":
            q = f"SELECT rid, count(*) AS v FROM {cand} GROUP BY rid"
        elif f.agg == "sum":
            q = f"SELECT rid, CAST(sum(value) AS DOUBLE) AS v FROM {cand} GROUP BY rid"
        elif f.agg == "age":
            q = f"SELECT c.rid, first(s.t) - min(c.ts) AS v FROM {cand} c JOIN {sp} s USING (rid) GROUP BY c.rid"
        elif f.agg == "counts_by_action":
            parts = ", ".join(f"{_lit(a)}, count_if(action = {_lit(a)})" for a in ACTIONS)
            q = f"SELECT rid, named_struct({parts}) AS v FROM {cand} GROUP BY rid"
        elif f.agg == "last":
            q = f"SELECT rid, max_by(value, struct(ts, off)) AS v FROM {cand} GROUP BY rid"
        elif f.agg == "last_n":
            q = f"""SELECT rid, transform(array_sort(collect_list(struct(ts, off, item_id, action, category))),
                           e -> named_struct('item_id', e.item_id, 'action', e.action, 'ts', e.ts,
                                             'category', e.category)) AS v
                    FROM (SELECT *, row_number() OVER (PARTITION BY rid ORDER BY ts DESC, off DESC) AS n
                          FROM {cand}) WHERE n <= {f.k} GROUP BY rid"""
        elif f.agg == "distinct_topk":
            q = f"""SELECT rid, transform(array_sort(collect_list(struct(-m AS m, value))), e -> e.value) AS v
                    FROM (SELECT *, row_number() OVER (PARTITION BY rid ORDER BY m DESC, value) AS n
                          FROM (SELECT rid, value, max(ts) AS m FROM {cand} GROUP BY rid, value))
                    WHERE n <= {f.k} GROUP BY rid"""
        else:
            name = f.field or "item_id"
            q = f"""SELECT rid, transform(array_sort(collect_list(struct(-n AS n, value))),
                                      e -> named_struct({_lit(name)}, e.value, 'count', -e.n)) AS v
                    FROM (SELECT *, row_number() OVER (PARTITION BY rid ORDER BY n DESC, value) AS r
                          FROM (SELECT rid, value, count(*) AS n FROM {cand} GROUP BY rid, value))
                    WHERE r <= {f.k} GROUP BY rid"""
        return self._view(self._sql(q), "res")

    # -- the interface --------------------------------------------------------------------------------

    def compute_chunks(
        self,
        features: FeatureRegistry | Iterable[Feature],
        events: EventsLike,
        spine: pa.Table,
        *,
        chunk_rows: int = 1_000_000,
    ) -> Iterator[pa.Table]:
        reg = as_registry(features)
        check_spine(reg, spine)
        ev, acc = self._prepare(events, reg)
        prepared = []
        for f in reg:
            src = self._source(f, acc)
            prepared.append((f, src, self._index(f, src)))
        try:
            for lo in range(0, max(spine.num_rows, 1), chunk_rows):
                part = spine.slice(lo, chunk_rows)
                sp = self._prepare_spine(part, reg, ev, acc)
                results = []
                for f, src, index in prepared:  # one job per feature: one plan of all of them runs out of memory
                    method = _method(f)
                    if method == "running":
                        res = self._running(f, sp, src, index, reg)
                    elif method == "latest":
                        res = self._latest(f, sp, src, index, reg)
                    else:
                        res = self._window(f, sp, src)
                    results.append(self._sql(f"SELECT rid, v FROM {res}").toArrow())
                yield _with_defaults(part, reg, results)
        finally:
            self._release()

    def accepted(self, registry: FeatureRegistry, events: EventsLike) -> pa.Table:
        _, acc = self._prepare(events, registry)
        cols = ", ".join(("off AS `offset`", *_EVENT_COLUMNS, "sess"))
        try:
            table = self._sql(f"SELECT {cols} FROM {acc} ORDER BY off").toArrow()
        finally:
            self._release()
        return table.cast(ACCEPTED_SCHEMA)


def _with_defaults(spine: pa.Table, reg: FeatureRegistry, results: list[pa.Table]) -> pa.Table:
    """The spine plus each feature's column (from its (rid, v) rows, in spine order), typed by `value_type`,
    with the online engine's empty value where a row saw no event (0, empty lists, zero counts; last and
    age stay NULL)."""
    out = spine
    for f, res in zip(reg, results, strict=True):
        typ = value_type(f)
        at = np.full(spine.num_rows, -1, np.int64)
        at[res["rid"].to_numpy()] = np.arange(res.num_rows)
        col = res["v"].combine_chunks().take(pa.array(at, mask=at < 0))
        if f.agg == "counts_by_action":  # by field: a NULL struct's children are not NULL themselves
            parts = [pc.fill_null(pc.struct_field(col, a), 0).cast(pa.int64()) for a in ACTIONS]
            out = out.append_column(f.name, pa.StructArray.from_arrays(parts, fields=list(typ)))
            continue
        col = col.cast(typ)
        if f.agg in ("count", "sum"):
            col = pc.fill_null(col, pa.scalar(0, typ))
        elif pa.types.is_list(typ):
            col = pc.if_else(pc.is_null(col), pa.scalar([], typ), col)
        out = out.append_column(f.name, col)
    return out
