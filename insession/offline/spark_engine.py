"""The Spark offline engine: the same declarations, point-in-time, on Apache Spark (`local[*]` or a cluster).

The rules are the DuckDB engine's (`insession.features.offline`), restated with joins Spark can spread:

- Lateness: an event's watermark at arrival is the running max of ts in offset order. A global running
  window would put the whole log in one task, so the log is cut into blocks of `BLOCK` offsets: the running
  max inside a block plus the max of the blocks before it (a small table). A spine row's watermark is
  found the same way (an as-of join partitioned by block, then an equi-join on the block's prefix).
- As-of joins are sort-based (`_asof`): the spine's rows and the index's rows in one relation, partitioned
  by key and sorted by position, each spine row taking the last index row before it. Spark's window
  operator streams a sorted partition and spills it, so no step holds a key's history in memory.
- count / counts_by_action / sum over sliding or unbounded windows: every accepted event with
  ts < cut = max(start, min(t + 1, m - lateness)) is visible to a row (m: the watermark once its offset had
  arrived; a later arrival has ts >= m - lateness), so the value is a difference of two running sums per
  key found by as-of joins (both lookups of a row in one sort), plus the events from the cut to min(t, m)
  read one by one: a span of at most the lateness, joined on (key, bucket of that width).
- last / last_n over sliding, unbounded and before-session windows: the k latest visible events are among
  the events of that short tail and the k latest with ts < cut, whose ranks (per key, by ts then offset)
  end at the rank an as-of join finds; they are joined on (key, bucket of k ranks).
- Sliding topk_count and covisit (the 2-hour trending list, where every key's events share one window;
  co-visitation per item) add counts per block for a row's complete blocks to the events of its edge
  blocks (`_top`) once the spine's range join would read more than `SparkEngine.top_above` (row, event)
  pairs; below that the range join is cheaper. Both are exact. Rows whose request came in order skip the
  edge's events (which grow with the key's traffic): per group a bounded set of candidate values, each
  counted by as-of lookups partitioned by (key, value) (`_top_by_item`).
- Everything else (distinct_topk, topk_count, age, covisit, session windows) joins each row with its
  key's events inside its window: sliding windows on (key, bucket of the window's length, at most two
  per row), session windows on (user, session). Unbounded distinct_topk / topk_count / age read the key's
  whole history (no default feature uses one; the DuckDB engine does the same).
- The prepared history (watermarks, accepted events, sessions) stays cached between calls on the same
  Arrow table (`_prepared`): the training-data build asks one engine four times about one history.
- One Spark job per feature over the whole spine (`compute_chunks`); features reading the same relation
  share one cached source (`_kept`); on a local master Arrow tables reach the JVM as Parquet (`_frame`).

Nothing explodes a history into per-row arrays: the only arrays built are of at most two buckets per row,
the co-visitation span (`span` earlier events), and the at most k values a feature returns.
"""

from __future__ import annotations

import os
import shutil
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
    CANDIDATE_SCHEMA,
    EventsLike,
    OfflineEngine,
    as_registry,
    check_spine,
    session_candidates_sql,
    value_type,
)
from insession.schema import ACTIONS, EVENT_ARROW_SCHEMA

BLOCK = 1 << 16  # offsets per block of the watermark's running max (16 blocks at 1M events: spread over the cores)
_EVENT_COLUMNS = [c for c in ACCEPTED_COLUMNS if c not in ("offset", "sess")]


def spark_session(master: str = "local[*]", *, ui: bool = True, conf: dict[str, str] | None = None):  # noqa: ANN201
    """A SparkSession for the engine (the process's existing one if there is one: Spark allows one per JVM).

    Defaults sized for a 2-core, 24 GiB machine: shuffle partitions = 4 x local cores, 2 GiB of driver heap
    (`INSESSION_SPARK_DRIVER_MEMORY`), UTC, loopback driver for local masters. `conf` overrides any of them
    (a cluster's executors, memory, object-store credentials).

    Cached frames may keep only a tenth of the unified memory from the tasks (`spark.memory.storageFraction`
    0.1, Spark's default 0.5): the engine caches its intermediate views in memory and on disk, and cached
    blocks under that fraction are never evicted for execution, so with half of a 2 GiB heap's ~1 GiB pool
    held by them two tasks share the other half. At 5M events the global trending list's job failed with
    `UNABLE_TO_ACQUIRE_MEMORY` (a task got 0 of 64 KiB) at 0.5; at 0.1 the same job alone took 493 s, the
    JVM's peak 2.47 GiB (the cause is likely, not proven: the failure's stack was not kept). Evicted blocks
    go to disk, not away."""
    from pyspark.sql import SparkSession

    settings = {
        "spark.app.name": "insession-offline",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(4 * (os.cpu_count() or 2)),
        "spark.driver.memory": os.environ.get("INSESSION_SPARK_DRIVER_MEMORY", "2g"),
        "spark.memory.storageFraction": "0.1",
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
    if f.agg in ("topk_count", "covisit") and f.window.kind == "sliding":
        return "top"  # or the range join of `_window`, chunk by chunk: see `SparkEngine.top_above`
    if f.agg in ("last", "last_n") and f.window.kind in ("unbounded", "sliding", "before_session"):
        return "latest"
    return "window"


def _block(f: Feature) -> int:
    """The shortlist's block (`_top`): about 1/24 of the window, a whole number of tiles (DuckDB's choice)."""
    return f.window.tile_ms * max(1, f.window.tiles // 24)


def _start_sql(f: Feature, t: str = "t") -> str | None:
    w = f.window
    return f"({t} DIV {w.tile_ms} - {w.tiles - 1}) * {w.tile_ms}" if w.kind == "sliding" else None


class SparkEngine(OfflineEngine):
    """The offline engine on Spark; `master` any Spark master URL, or pass a `session` already made."""

    name = "spark"
    # A sliding top-k list (topk_count, covisit) uses `_top` (block counts plus edges) when the spine's
    # range join would read more (row, event) pairs than this (its rows x a key's mean events per window);
    # below it the plain join is used: at 100k synthetic events the global trending list (10.5k requests x
    # ~600 events per 2 hours: 6M pairs) and co-visitation (35k rows x ~400 pairs per item and week) stay
    # joined. (The threshold was measured against an earlier shortlist of running counts, slower than the
    # join there; `_top` has not been timed against the join at these sizes.) At 1M events those joins grow
    # tenfold per row (the shop keeps 1,200 items). Both are exact (tests/features/test_spark_top.py sets 0
    # to test `_top`).
    top_above: float = 20_000_000

    def __init__(self, master: str = "local[*]", *, session=None, conf: dict[str, str] | None = None) -> None:  # noqa: ANN001
        self._own = session is None
        self.spark = session if session is not None else spark_session(master, conf=conf)
        self._n = 0
        self._views: list[str] = []  # the views, cached frames and Arrow files of the call running now
        self._cached: list = []
        self._files: list[str] = []
        self._shared: dict[str, str] = {}  # SQL text -> its persisted view, this call's (see `_kept`)
        self._base: tuple | None = None  # (key, events, (ev, acc), views, cached, files): see `_prepared`
        self._on_disk = False

    def describe(self) -> str:
        sc = self.spark.sparkContext
        ui = sc.uiWebUrl or "disabled"
        return f"spark {self.spark.version} on {sc.master} (UI: {ui})"

    def close(self) -> None:
        self._release()
        self._drop_base()
        if self._own:
            self.spark.stop()

    # -- inputs ---------------------------------------------------------------------------------------

    def _events(self, events: EventsLike):  # noqa: ANN202
        if isinstance(events, pa.Table):
            return self._frame(events.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA))
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

    def _frame(self, table: pa.Table):  # noqa: ANN202
        """A DataFrame of an Arrow table. On a local master through a Parquet file under Spark's local dir,
        which the JVM reads in bounded memory: `createDataFrame` keeps the whole table in the driver's heap
        for as long as the frame lives (the 1M-event build's 6.4M (request, candidate) pairs and its history
        are ~0.5 GB of it, the 5M build's ~2.5 GB). Elsewhere the executors cannot read the driver's files,
        so the table goes through `createDataFrame`."""
        if not self.spark.sparkContext.master.startswith("local"):
            return self.spark.createDataFrame(table)
        import pyarrow.parquet as pq

        root = Path(self.spark.conf.get("spark.local.dir", tempfile.gettempdir()))
        root.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="arrow-", dir=root)
        self._files.append(folder)
        pq.write_table(table, Path(folder) / "part-0.parquet", row_group_size=1 << 20)
        return self.spark.read.parquet(folder)

    def _view(self, df, name: str) -> str:  # noqa: ANN001
        self._n += 1
        full = f"__{name}_{self._n}"
        df.createOrReplaceTempView(full)
        self._views.append(full)
        return full

    def _release(self) -> None:
        """Drop the views and cached frames of the last call (the prepared events of `_prepared` stay)."""
        for v in self._views:
            self.spark.catalog.dropTempView(v)
        self._views.clear()
        for df in self._cached:
            df.unpersist()
        self._cached.clear()
        for folder in self._files:
            shutil.rmtree(folder, ignore_errors=True)
        self._files.clear()
        self._shared.clear()

    def _drop_base(self) -> None:
        if self._base is not None:
            _, _, _, views, cached, files = self._base
            self._base = None
            for v in views:
                self.spark.catalog.dropTempView(v)
            for df in cached:
                df.unpersist()
            for folder in files:
                shutil.rmtree(folder, ignore_errors=True)

    def _sql(self, text: str):  # noqa: ANN202
        return self.spark.sql(text)

    def _persist(self, df, *, disk: bool = False):  # noqa: ANN001, ANN202
        from pyspark import StorageLevel

        self._cached.append(df)
        return df.persist(StorageLevel.DISK_ONLY if disk or self._on_disk else StorageLevel.MEMORY_AND_DISK)

    def _kept(self, text: str, name: str) -> str:
        """A persisted view of the query `text`, made once per call: features that read the same relation share
        it (the three counters read one source, all accepted events; so do history_seq and session_seq)."""
        if text not in self._shared:
            self._shared[text] = self._view(self._persist(self._sql(text)), name)
        return self._shared[text]

    def _prepared(self, events: EventsLike, reg: FeatureRegistry) -> tuple[str, str]:
        """`_prepare`'s (ev, acc), kept between calls on the same Arrow table and rules.

        The training-data build asks one engine four times about one history (`accepted`, the candidate
        stage's state, co-visitation, the counters); preparing it is a watermark pass and a session pass
        over every event, so the last prepared table stays cached (until another history, rules or
        `close`), on local disk only, leaving the heap to the next call's sorts. (At 1M events a 2 GiB
        driver still runs out of heap in co-visitation with the cache on disk, as it did with it in
        memory: that failure is not this cache's.) An Arrow table is immutable and held here, so its
        identity names its content; a path is prepared afresh each call (the files under it may change)."""
        key = (id(events), reg.lateness_ms, reg.session_gap_ms) if isinstance(events, pa.Table) else None
        if key is not None and self._base is not None and self._base[0] == key and self._base[1] is events:
            return self._base[2]
        self._drop_base()
        outer = (self._views, self._cached, self._files)
        self._views, self._cached, self._files = [], [], []
        self._on_disk = True  # kept across calls: on local disk, not in the heap the next call's sorts need
        try:
            prepared = self._prepare(events, reg)
        except BaseException:
            self._release()
            raise
        finally:
            views, cached, files = self._views, self._cached, self._files
            self._views, self._cached, self._files = outer
            self._on_disk = False
        if key is None:  # this call's own
            self._views += views
            self._cached += cached
            self._files += files
        else:
            self._base = (key, events, prepared, views, cached, files)
        return prepared

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

    def _asof(
        self,
        left: str,
        pos: str,
        right: str,
        rpos: str,
        keys: list[str],
        cols: list[str],
        strict: bool,
        ids: tuple[str, ...] = ("rid",),
    ) -> str:
        """A view of `left`'s rows (ids, keys, ...) with `cols` of the last `right` row of the same keys whose
        `rpos` is before `pos` (< when strict, else <=); NULL when none. `right` holds one row per (keys,
        rpos). Sort-based: both sides in one relation partitioned by keys, ordered by position. The view's
        columns: `ids`, then `cols` (and the keys, when `ids` is not just rid)."""
        lside, rside = (0, 1) if strict else (1, 0)
        kc = "".join(f"{k}, " for k in keys)
        part = f"PARTITION BY {', '.join(keys)} " if keys else ""
        out_keys = "" if ids == ("rid",) else kc
        # The right row travels as one struct (NULL only on left rows), so `last(.., true)` takes every column
        # from the same row; per column it would skip a NULL value of the latest row for an older one's.
        packed = "named_struct(" + ", ".join(f"'{c}', {c}" for c in cols) + ")"
        ic = ", ".join(ids)
        return self._view(
            self._sql(f"""
            SELECT {ic}, {out_keys}{", ".join(f"r.{c} AS {c}" for c in cols)} FROM (
                SELECT {ic}, {kc}side, last(r, true) OVER w AS r FROM (
                    SELECT {ic}, {kc}{pos} AS pos, {lside} AS side, NULL AS r FROM {left}
                    UNION ALL
                    SELECT {", ".join("NULL" for _ in ids)}, {kc}{rpos}, {rside}, {packed} FROM {right})
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
        s_in = self._view(self._frame(pa.table(cols, names=names)), "spine_in")
        if "o" in names:
            # m = the max ts of the events up to offset o (the watermark is a running max): the latest event's
            # wm_after at or before o inside o's block of offsets (an as-of join partitioned by block, so
            # spread over the blocks), else the max of the blocks before it (every block up to the last one
            # is listed, with or without events, so that is an equi-join; o is clipped to the last offset).
            blocks_m = self._view(
                self._sql(f"""
                SELECT a.b, max(x.bmax) OVER (ORDER BY a.b ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
                FROM (SELECT explode(sequence(lo, hi)) AS b
                      FROM (SELECT min(off) DIV {BLOCK} AS lo, max(off) DIV {BLOCK} AS hi FROM {ev})) a
                LEFT JOIN (SELECT off DIV {BLOCK} AS b, max(ts) AS bmax FROM {ev} GROUP BY 1) x USING (b)"""),
                "bm",
            )
            clipped = self._view(
                self._sql(f"""
                SELECT rid, oc DIV {BLOCK} AS b, oc
                FROM (SELECT rid, least(o, (SELECT max(off) FROM {ev})) AS oc FROM {s_in} WHERE o >= 0)"""),
                "clipped",
            )
            inner = self._asof(
                clipped,
                "oc",
                f"(SELECT off DIV {BLOCK} AS b, off, wm_after FROM {ev})",
                "off",
                ["b"],
                ["wm_after"],
                strict=False,
            )
            sp0 = self._sql(f"""
                SELECT s.rid, {kc}s.t, s.o, CASE WHEN s.o >= 0 THEN greatest(i.wm_after, x.before) END AS m
                FROM {s_in} s LEFT JOIN {clipped} c USING (rid) LEFT JOIN {inner} i USING (rid)
                LEFT JOIN {blocks_m} x ON x.b = c.b""")
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
            return self._kept(
                f"""
                SELECT user_id, item_id, ts, off, sess, action, category, {value} AS value
                FROM {acc} WHERE {where} AND {has}""",
                "src",
            )
        return self._kept(
            f"""
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
            SELECT NULL, b, ts, off, NULL, NULL, NULL, a FROM pairs""",
            "src",
        )

    def _metrics(self, f: Feature) -> list[tuple[str, str]]:
        """(name, per-event SQL) of the running sums a `running` feature adds up."""
        if f.agg == "count":
            return [("n", "1")]
        if f.agg == "sum":
            return [("n", "value")]
        return [(f"n_{a}", f"CASE WHEN action = {_lit(a)} THEN 1 ELSE 0 END") for a in ACTIONS]

    def _index(self, f: Feature, src: str) -> str | tuple[str, float] | None:
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
        if method == "top":
            return self._top_index(f, src)
        return None

    def _top_index(self, f: Feature, src: str) -> tuple[str, float]:
        """`_top`'s index (lazy: built only if the spine uses it): counts per (key, value, block), and the mean
        events per window of a key (the events' count over their time span, in windows, over the keys),
        which decides whether a chunk needs it."""
        keys = _keys(f)
        distinct = f"count(DISTINCT {', '.join(keys)})" if keys else "1"
        n, n_keys, lo, hi = self._sql(f"SELECT count(*), {distinct}, min(ts), max(ts) FROM {src}").first()
        density = n * f.window.length_ms / max((hi or 0) - (lo or 0), f.window.length_ms) / max(n_keys, 1)
        kc = "".join(f"{k}, " for k in [*keys, "value"])
        blocks = self._view(
            self._persist(
                self._sql(f"""
            SELECT {kc}b, count(*) AS n FROM (SELECT *, ts DIV {_block(f)} AS b FROM {src}) GROUP BY {kc}b""")
            ),
            "blocks",
        )
        return blocks, density

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
        """count / counts_by_action / sum: running sums at the cut minus those at the start, plus the tail.

        Both as-of lookups of a row (at its cut, w = 0, and at its window's start, w = 1) go through one
        sort of the spine and the index, and the tail's sums (w = 2) meet them in one aggregation by rid:
        one sort and one aggregation per feature instead of two sorts and three joins (the same arithmetic,
        c - s + x, on the same numbers)."""
        keys = _keys(f)
        kc = "".join(f"{k}, " for k in keys)
        ms = [c for c, _ in self._metrics(f)]
        b = self._bounds(f, sp, reg)
        at = self._asof(
            f"(SELECT rid, 0 AS w, {kc}cut AS p FROM {b} UNION ALL "
            f"SELECT rid, 1, {kc}st FROM {b} WHERE st IS NOT NULL)",
            "p",
            index,
            "ts",
            keys,
            ms,
            strict=True,
            ids=("rid", "w"),
        )
        tail = self._tail(f, b, src, reg)
        per_event = dict(self._metrics(f))
        tail_sums = (
            f"SELECT rid, 2 AS w, {', '.join(f'sum({per_event[c]}) AS {c}' for c in ms)} FROM {tail} GROUP BY rid"
        )
        part = {w: {c: f"coalesce(max(CASE WHEN w = {w} THEN {c} END), 0)" for c in ms} for w in range(3)}
        total = {c: f"{part[0][c]} - {part[1][c]} + {part[2][c]}" for c in ms}
        if f.agg == "count":
            v = f"CAST({total['n']} AS BIGINT)"
        elif f.agg == "sum":
            v = f"CAST({total['n']} AS DOUBLE)"
        else:
            v = "named_struct(" + ", ".join(f"{_lit(a)}, CAST({total['n_' + a]} AS BIGINT)" for a in ACTIONS) + ")"
        return self._view(
            self._sql(f"""
            SELECT rid, {v} AS v FROM (
                SELECT rid, w, {", ".join(ms)} FROM {at} UNION ALL {tail_sums})
            GROUP BY rid"""),
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

    def _top(self, f: Feature, sp: str, src: str, index: tuple[str, float], reg: FeatureRegistry) -> str:
        """topk_count / covisit over a sliding window from counts per block, reading a row's window event by
        event only in its edge blocks: exact, with memory bounded by one block of one key.

        With s the window's start and c0 = max(s, min(t + 1, m - lateness)), every accepted event with
        s <= ts < c0 is visible to the row (see the module docstring), and of the events from c0 to
        hi = min(t, m) those that arrived by offset o (a span of at most the lateness). The blocks (about
        1/24 of the window, `_block`) wholly inside [s, c0) are the row's complete blocks: every event in
        them is visible, so their counts B(v) come from the per-block counts, summed once per (key, complete
        blocks) group and shared by its rows. The row's edge (the events of [s, hi] outside its complete
        blocks, at most a block at the start and a block plus the lateness at the end) is read event by
        event: counts P(v). A value's count is B(v) + P(v); a value the edge never saw counts B(v), so it
        is outranked by each of the group's k largest B (ties by value) and only those k and the edge's
        values are candidates. Work per row: its edge's events and k values, not its window: the global
        2-hour trending list read ~6k events per request at 1M events joined, co-visitation ~2.5k pairs.
        An edge grows with its key's traffic (a global list's: every shopper's events of up to ~10 minutes;
        co-visitation's: the item's pairs of the day, 85k for the busiest item-day at 5M events), so the
        regular rows (in order, see `_top_by_item`), every row of the training build, are counted by value
        instead and only the other rows read the edge.

        This replaces a shortlist of values from running counts (DuckDB's `_top_sliding`): with sparse
        counts (most 1 or 2) nearly every value of the window stayed in it, and its three as-of sorts of
        (row, value) pairs ran a 2 GiB heap out of memory in co-visitation at 1M events."""
        blocks, _ = index
        keys = _keys(f)
        kc = "".join(f"{k}, " for k in keys)
        lat, block = reg.lateness_ms, _block(f)
        rows = self._view(
            self._persist(
                self._sql(f"""
            SELECT *, (s + {block - 1}) DIV {block} AS bl_lo, c0 DIV {block} AS bl_hi
            FROM (SELECT rid, {kc}o, s, greatest(s, least(t + 1, m - {lat})) AS c0, least(t, m) AS hi,
                         t >= m AND s <= m - {lat} AS reg
                  FROM (SELECT *, greatest({_start_sql(f)}, 0) AS s FROM {sp}) WHERE m IS NOT NULL)
            WHERE hi >= s""")
            ),
            "top_rows",
        )
        group = [*keys, "bl_lo", "bl_hi"]
        gc = ", ".join(group)
        g_on = " AND ".join(f"r.{c} = g.{c}" for c in group)
        # B(v) per group: the group's complete blocks [bl_lo, bl_hi) joined with the per-block counts
        full = self._view(
            self._persist(
                self._sql(f"""
            SELECT {", ".join(f"g.{c}" for c in group)}, x.value, sum(x.n) AS n
            FROM (SELECT *, explode(sequence(bl_lo, bl_hi - 1)) AS b
                  FROM (SELECT DISTINCT {gc} FROM {rows} WHERE bl_lo < bl_hi)) g
            JOIN {blocks} x ON {"".join(f"x.{k} = g.{k} AND " for k in keys)}x.b = g.b
            GROUP BY {", ".join(f"g.{c}" for c in group)}, x.value""")
            ),
            "top_full",
        )
        best = self._view(
            self._sql(f"""
            SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY {gc} ORDER BY n DESC, value) AS r FROM {full})
            WHERE r <= {f.k}"""),
            "top_best",
        )
        # P(v) per row: the edge blocks' events, visible by the lateness rule
        on = "".join(f"x.{k} = e.{k} AND " for k in keys)
        edge = self._view(
            self._persist(
                self._sql(f"""
            SELECT e.rid, x.value, count(*) AS p
            FROM (SELECT *, explode(filter(sequence(s DIV {block}, hi DIV {block}),
                                           b -> bl_lo >= bl_hi OR b < bl_lo OR b >= bl_hi)) AS b
                  FROM {rows} WHERE NOT reg) e
            JOIN (SELECT *, ts DIV {block} AS b FROM {src}) x
              ON {on}x.b = e.b AND x.ts >= e.s AND x.ts <= e.hi AND (x.ts < e.c0 OR x.off <= e.o)
            GROUP BY e.rid, x.value""")
            ),
            "top_edge",
        )
        counts = f"""
            SELECT p.rid, p.value, p.p + coalesce(g.n, 0) AS n
            FROM {edge} p JOIN {rows} r USING (rid)
            LEFT JOIN {full} g ON {g_on} AND g.value = p.value
            UNION ALL
            SELECT r.rid, g.value, g.n FROM {rows} r JOIN {best} g ON {g_on} AND NOT r.reg
            LEFT ANTI JOIN {edge} p ON p.rid = r.rid AND p.value = g.value"""
        counts += f" UNION ALL {self._top_by_item(f, rows, src, blocks, full, best)}"
        return self._view(self._sql(self._top_counts(f, counts)), "res")

    def _top_by_item(self, f: Feature, rows: str, src: str, blocks: str, full: str, best: str) -> str:
        """(rid, value, n) of the regular rows (`reg`: t >= m and s <= m - lateness, every request of the
        training build, whose events came in order) of a sliding top-k list, global or per key: candidates
        bounded per group, each counted by a lookup keyed by (key, value). Work per row: its candidates,
        not its key's traffic. The global trending list (bench/top_candidates.py): 96, 86, 80 candidates per
        request at 100k, 1M, 5M synthetic events, against 301, 2,920, 14,463 events in the edge blocks `_top`
        joined it with. Co-visitation of the session items (a DuckDB emulation on bench_offline's history,
        2026-11-30): 38 and 63 candidates per row at 1M and 5M events, against up to 1,975 and 7,935 pairs
        of the item's day (mean per row) in its edge block; at 5M that edge join, ~7G (row, pair) matches
        with 85k pairs of the busiest item-day in one task's join key, was where the 2 GiB heap ran out
        (bench 15:54 UTC). Counted by value, co-visitation alone on those spines (local[2], 2 GiB heap, 2
        shared cores) took 462 s at 1M and 1,718 s at 5M (767 and 660 µs of executor time per event), the
        JVM's peak 2.46 and 2.61 GiB.

        For such a row the visible events are exactly those with off <= o and ts >= s (off <= o gives
        ts <= m <= t; an accepted event after o has ts >= m - lateness >= s), so a value's count is
        O(v, o) - T(v, s): its key's running count of v by offset at o minus its count of events with
        ts < s, two as-of joins partitioned by (key, value); T is looked up once per (group, value, s) and
        shared by the group's rows (their s is one tile, mostly the same), so only O's sorts the (row,
        candidate) pairs. Which values to count: every row of a group
        (same key and complete blocks) counts at least B(v) (the complete blocks) and at most U(v), the
        block counts over the group's envelope (the blocks from its rows' least s to their greatest m); a
        value with U(v) < theta, the group's k-th largest B (0 with fewer than k values), is outranked by
        k values in every row, so the candidates are the values with U(v) >= theta (ties by value kept).
        Exact; the other rows (late requests, instants past their watermark) keep `_top`'s edge reads."""
        block, k = _block(f), f.k
        keys = _keys(f)
        kc = "".join(f"{c}, " for c in keys)
        group = [*keys, "bl_lo", "bl_hi"]
        gc = ", ".join(group)
        # U(v) = B(v) + E(v): E sums the envelope's blocks outside the complete ones
        edge = f"""
            SELECT {", ".join(f"g.{c}" for c in group)}, x.value, sum(x.n) AS n
            FROM (SELECT {gc}, explode(filter(sequence(lo, hi), b -> b < bl_lo OR b >= bl_hi)) AS b
                  FROM (SELECT {gc}, min(s) DIV {block} AS lo, max(hi) DIV {block} AS hi
                        FROM {rows} WHERE reg GROUP BY {gc})) g
            JOIN {blocks} x ON {"".join(f"x.{c} = g.{c} AND " for c in keys)}x.b = g.b
            GROUP BY {", ".join(f"g.{c}" for c in group)}, x.value"""
        theta = f"SELECT {gc}, IF(count(*) >= {k}, min(n), 0) AS theta FROM {best} GROUP BY {gc}"
        # cached: tens of values per group; the (row, value) pairs (41M for the trending list at 5M events,
        # ~114M for co-visitation) are not: they are made once, for O's lookup
        cand = self._view(
            self._persist(
                self._sql(f"""
            SELECT {gc}, value FROM (
                SELECT {gc}, value, coalesce(b.n, 0) + coalesce(e.n, 0) AS u
                FROM (SELECT * FROM {full} LEFT SEMI JOIN (SELECT {gc} FROM {rows} WHERE reg) USING ({gc})) b
                FULL JOIN ({edge}) e USING ({gc}, value))
            LEFT JOIN ({theta}) USING ({gc})
            WHERE u >= coalesce(theta, 0)""")
            ),
            "top_cand",
        )

        def running(pos: str) -> str:  # a (key, value)'s count of events up to each position (offset or ts)
            return f"""(SELECT {kc}value, {pos},
                               sum(c) OVER (PARTITION BY {kc}value ORDER BY {pos} ROWS UNBOUNDED PRECEDING) AS n
                        FROM (SELECT {kc}value, {pos}, count(*) AS c FROM {src} GROUP BY {kc}value, {pos}))"""

        by = [*keys, "value"]
        # T(v, s) once per (group, value, s): the group's rows share s (a window's start is a whole tile)
        starts = f"""(SELECT DISTINCT {", ".join(f"c.{c}" for c in group)}, c.value, r.s
                      FROM (SELECT DISTINCT {gc}, s FROM {rows} WHERE reg) r JOIN {cand} c USING ({gc}))"""
        before = self._asof(starts, "s", running("ts"), "ts", by, ["n"], strict=True, ids=("bl_lo", "bl_hi", "s"))
        on = "".join(f"b.{c} = r.{c} AND " for c in group)
        # one row per (row, candidate) carrying T, so O's lookup is the only sort of the pairs
        pairs = self._view(
            self._sql(f"""
            SELECT r.rid, coalesce(b.n, 0) AS before, {"".join(f"r.{c}, " for c in keys)}c.value, r.o
            FROM {rows} r JOIN {cand} c USING ({gc})
            LEFT JOIN {before} b ON {on}b.value = c.value AND b.s = r.s WHERE r.reg"""),
            "top_pairs",
        )
        arrived = self._asof(pairs, "o", running("off"), "off", by, ["n"], strict=False, ids=("rid", "before"))
        return f"SELECT rid, value, n - before AS n FROM {arrived} WHERE n > before"

    def _top_counts(self, f: Feature, counts: str) -> str:
        """topk_count / covisit: the k largest of `counts` (rid, value, n), ties by value."""
        name = f.field or "item_id"
        return f"""SELECT rid, transform(array_sort(collect_list(struct(-n AS n, value))),
                                  e -> named_struct({_lit(name)}, e.value, 'count', -e.n)) AS v
                FROM (SELECT *, row_number() OVER (PARTITION BY rid ORDER BY n DESC, value) AS r FROM ({counts}))
                WHERE r <= {f.k} GROUP BY rid"""

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
            q = self._top_counts(f, f"SELECT rid, value, count(*) AS n FROM {cand} GROUP BY rid, value")
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
        """Each feature is one Spark job over the whole spine, never one per chunk: a chunk's job re-read and
        re-sorted the feature's whole index (as many rows as the history) with its 1M spine rows, so the 1M
        build's 6.4M counter pairs cost 7 jobs per feature.

        How the values reach the driver: on a local master each feature's job writes them as Parquet under
        Spark's local dir and the driver reads the files with pyarrow (`_written`), never through a collect,
        whose results the JVM holds in its heap until Python has read them all. At 5M events the candidate
        stage's history_seq (last-100 sequences for 514k requests, ~51M structs) was computed in 281 s and
        written to Spark's noop sink on the 2 GiB heap, but collecting it failed in the bench twice
        (`TaskResultLost`). Elsewhere the executors' files are not the driver's: the values are collected
        (a spine longer than `chunk_rows`: cached on the executors' disks and collected `chunk_rows` rows at
        a time, a light job each), so the driver holds one chunk of values."""
        reg = as_registry(features)
        check_spine(reg, spine)
        ev, acc = self._prepared(events, reg)
        local = self.spark.sparkContext.master.startswith("local")
        try:
            sp = self._prepare_spine(spine, reg, ev, acc)
            whole = spine.num_rows <= chunk_rows
            results = []
            for f in reg:  # one job per feature: one plan of all of them runs out of memory
                src = self._source(f, acc)
                index = self._index(f, src)
                method = _method(f)
                if method == "running":
                    res = self._running(f, sp, src, index, reg)
                elif method == "latest":
                    res = self._latest(f, sp, src, index, reg)
                elif method == "top" and spine.num_rows * index[1] > self.top_above:
                    res = self._top(f, sp, src, index, reg)
                else:
                    res = self._window(f, sp, src)
                values = self._sql(f"SELECT rid, v FROM {res}")
                if local:
                    results.append(self._written(values, None if whole else chunk_rows))
                elif whole:
                    results.append(values.toArrow())
                else:
                    kept = self._persist(values, disk=True)
                    kept.count()  # computed now, while this feature's views are the ones cached
                    results.append(self._view(kept, "kept"))
            if whole:
                yield _with_defaults(spine, reg, [_read(r) if local else r for r in results])
                return
            for lo in range(0, spine.num_rows, chunk_rows):
                part = spine.slice(lo, chunk_rows)
                hi = lo + part.num_rows
                if local:
                    got = [_read(r, lo // chunk_rows, lo) for r in results]
                else:
                    got = [self._sql(f"SELECT rid - {lo} AS rid, v FROM {r} WHERE rid >= {lo} AND rid < {hi}")
                           .toArrow() for r in results]  # fmt: skip
                yield _with_defaults(part, reg, got)
        finally:
            self._release()

    def _written(self, values, chunk_rows: int | None) -> tuple[str, pa.Schema]:  # noqa: ANN001
        """A local master's feature values (rid, v) written as Parquet by Spark's tasks into a new folder under
        Spark's local dir (removed with the call's other files, `_release`): the folder and the values' Arrow
        schema. With `chunk_rows`, one subfolder per chunk of spine rows (`chunk=N`, N = rid DIV chunk_rows:
        each task sorts its rows by chunk, no shuffle), so a chunk is read alone: the 5M build's 32M
        (request, candidate) counter pairs come back a million at a time."""
        from pyspark.sql.pandas.types import to_arrow_schema

        root = Path(self.spark.conf.get("spark.local.dir", tempfile.gettempdir()))
        root.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="values-", dir=root)
        self._files.append(folder)
        # row groups of 16 MiB: a task buffers one (outside Spark's memory accounting) before writing it
        if chunk_rows is None:
            writer = values.write
        else:
            writer = values.selectExpr("*", f"rid DIV {chunk_rows} AS chunk").write.partitionBy("chunk")
        writer.mode("overwrite").option("parquet.block.size", str(16 << 20)).parquet(folder)
        return folder, to_arrow_schema(values.schema)

    def accepted(self, registry: FeatureRegistry, events: EventsLike) -> pa.Table:
        _, acc = self._prepared(events, registry)
        cols = ", ".join(("off AS `offset`", *_EVENT_COLUMNS, "sess"))
        try:
            table = self._sql(f"SELECT {cols} FROM {acc} ORDER BY off").toArrow()
        finally:
            self._release()
        return table.cast(ACCEPTED_SCHEMA)

    def session_candidates(
        self, registry: FeatureRegistry, events: EventsLike, requests: pa.Table, *, window_ms: int, k: int
    ) -> pa.Table:
        _, acc = self._prepared(events, registry)
        try:
            req = self._view(self._frame(requests.select(["g", "atc_offset"])), "requests")
            table = self._sql(session_candidates_sql(acc, req, window_ms, k)).toArrow()
        finally:
            self._release()
        return table.cast(CANDIDATE_SCHEMA)


def _read(written: tuple[str, pa.Schema], chunk: int | None = None, lo: int = 0) -> pa.Table:
    """The (rid, v) rows `_written` wrote (only chunk `chunk`'s, their rid counted from `lo`), in no given
    order; none when the feature had no value there (Spark then writes no file)."""
    import pyarrow.parquet as pq

    folder, schema = written
    path = Path(folder) if chunk is None else Path(folder) / f"chunk={chunk}"
    files = sorted(str(f) for f in path.glob("*.parquet"))
    if not files:
        return schema.empty_table()
    table = pq.read_table(files)
    if lo:
        at = table.schema.get_field_index("rid")
        table = table.set_column(at, "rid", pc.subtract(table["rid"], pa.scalar(lo, pa.int64())))
    return table


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
