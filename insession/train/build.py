"""Point-in-time training data from the event history, through the offline feature engine's declarations.

One example group per add-to-cart (the request): the state just before it is what the online engine would have
served after applying the log up to the event before it (spine: user, ts, offset - 1), read from the offline
engine (`insession.offline`: DuckDB by default, or Spark) with the registry's own `history_seq`, `session_seq`
and counters, so the model trains on exactly what serving sees. Candidates: the carted item (positive); hard
negatives, items viewed in the same session within `window_ms` of the add-to-cart but never carted in that
session, found with a range join on (user, session, ts window); and, given a `Proposer` (the ranking service's
candidate stage replayed point-in-time, `insession.train.replay.stage_proposer`), the stage's proposals at
that request: the model then learns to rank what it is served. With a proposer, only requests whose positive
the stage proposed are kept (a reranker never sees the others), and validation lists are the served lists.
Without one, validation groups are topped up with popularity-sampled items. In-batch negatives from other
users come later, in the loss. Counters for every (request, candidate) pair come from the same engine at the
same spine instant; the SIGNALS (the candidate's repeat/recency in the session and history, its co-visitation
with the session's items) come from the same state through the model's `signal_rows`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from insession.datasets.files import EVENTS_FILE, ITEMS_FILE
from insession.features import offline
from insession.features.declare import MINUTE_MS, FeatureRegistry, default_registry
from insession.log.base import LogConfig
from insession.log.eventlog import LOG_FILE
from insession.log.export import (
    HISTORY_GLOB,
    history_files,
    history_location,
    is_object_store,
    read_history,
    redacted,
)
from insession.model.reranker import COUNTERS, QUERIES, SIGNALS, signal_rows
from insession.model.vocab import QUERY_GRAMS, Vocab
from insession.offline import OfflineEngine, open_engine
from insession.query.workers import read_tail
from insession.schema import ACTIONS, EVENT_ARROW_SCHEMA, price_band
from insession.train.examples import Examples
from insession.train.pretrain import Stream

SEQUENCES = ("history_seq", "session_seq")
MODEL_STATE = (*SEQUENCES, QUERIES)  # the user features the model reads at each request
_log = logging.getLogger(__name__)


@dataclass
class Proposed:
    """What a `Proposer` answers for requests (one row of `state` and `covisit` per request, in order)."""

    proposals: pa.Table  # (g, item_id): the candidate stage's proposals at each request, in proposal order
    state: pa.Table  # the MODEL_STATE features at each request (the stage reads the sequences too)
    covisit: list[dict[str, dict[str, int]]]  # `session_covisit` at each request


Proposer = Callable[[pa.Table], Proposed]
"""requests (g, user_id, item_id, category, subcategory, ts, offset: the state is read at this log offset)
-> the candidate stage's answer at each request."""


@dataclass
class BuildConfig:
    window_ms: int = 10 * MINUTE_MS  # hard negatives: views this close to the add-to-cart, same session
    max_hard_negatives: int = 20
    val_fraction: float = 0.15  # the latest requests (by time) validate
    eval_candidates: int = 50  # validation groups are topped up to this many candidates
    max_val_groups: int = 3000  # a seeded sample of the validation requests beyond this (bounds the build)
    session_items: int = 15  # covisit lists read for this many distinct session items (the stage's quota)
    seed: int = 0


@dataclass
class TrainingData:
    train: Examples
    val: Examples
    vocab: Vocab
    feature_hash: str
    split_ts: int  # requests at or after this instant validate; the vocabulary is built before it
    train_requests: pa.Table  # per training group, in Examples order: user_id, session_id, ts, offset, item_id
    val_requests: pa.Table  # the same per validation group
    stream: Stream  # every training-period event (ts < split_ts): item2vec's sessions, pre-training's windows
    seconds: dict[str, float]  # wall time of each step of the build, in order


def as_history(events: pa.Table, items: pa.Table) -> pa.Table:
    """A dataset (events with the `EventIn` columns in time order, and a catalogue) as a stored event
    history: offsets in file order, category, subcategory, brand, price and price band from the catalogue
    (as ingest enriches)."""
    con = duckdb.connect()
    ev = events.append_column("__row", pa.array(np.arange(events.num_rows), pa.int64()))
    con.register("ev_in", ev)
    icols = set(items.column_names)
    extra = [c for c in ("brand", "price") if c in icols]
    con.register("items_in", items.select(["item_id", "category", "subcategory", *extra]))
    cols = set(events.column_names)

    def col(name: str) -> str:
        return f"CAST(e.{name} AS VARCHAR)" if name in cols else "NULL::VARCHAR"

    brand = "CAST(any_value(brand) AS VARCHAR)" if "brand" in icols else "NULL::VARCHAR"
    price = "CAST(any_value(price) AS DOUBLE)" if "price" in icols else "NULL::DOUBLE"
    table = con.sql(f"""
        SELECT e.__row AS "offset", CAST(e.user_id AS VARCHAR) AS user_id, CAST(e.item_id AS VARCHAR) AS item_id,
               e.action, e.ts, {col("event_id")} AS event_id, {col("session_id")} AS session_id,
               {col("surface")} AS surface, NULL::VARCHAR AS properties, i.category,
               coalesce(i.subcategory, i.category) AS subcategory, e.ts AS ingest_ts, i.brand, i.price,
               NULL::VARCHAR AS price_band
        FROM ev_in e LEFT JOIN (SELECT CAST(item_id AS VARCHAR) AS item_id, any_value(category) AS category,
                                       any_value(subcategory) AS subcategory, {brand} AS brand, {price} AS price
                                FROM items_in GROUP BY 1) i
          ON i.item_id = CAST(e.item_id AS VARCHAR)
        ORDER BY e.__row""").to_arrow_table()
    bands = pa.array([price_band(p) for p in table.column("price").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("price_band"), "price_band", bands).cast(EVENT_ARROW_SCHEMA)


@dataclass(frozen=True)
class ClusterEvents:
    """What `read_cluster_events` read: every acknowledged event once, and where each part came from."""

    events: pa.Table  # EVENT_ARROW_SCHEMA, by offset
    history: str  # the history read (a directory or an object-store URI)
    mark: int  # the export mark: offsets <= mark from the history, the rest from the stream (-1: none)
    mark_from: str  # where the mark was read: a node's `<stream>.exported` file or the lease bucket
    stream_end: int  # the stream's newest offset as its leader had it when read


def read_cluster_events(location: str | Path, log: LogConfig) -> ClusterEvents:
    """A replicated log's event history for training: the Parquet history up to its export mark plus the
    stream's events after it, so every event the stream acknowledged before this call is in it exactly once.

    `location` is the shared `[log] history` (a directory or a pyarrow.fs URI such as `s3://bucket/prefix`;
    its mark is the key `exported` of the lease bucket `<stream>_export`), or a node's data directory with
    its own `history/` and `<stream>.exported` (that node's mark). Decision: the mark is read first, then
    the stream's end from its leader (so mark <= end), then only the parts starting at or below the mark
    (a takeover may be deleting the ones beyond it) and the stream after it, the analytics lane's rule.
    The history below the mark must hold each offset once: a repeat (a stray copy not yet quarantined)
    is dropped with a warning, a missing offset refuses (ValueError: another stream's history, or lost
    parts). JetStreamError for a bad URL, a missing stream or a lost quorum (reading every acknowledged
    event needs the stream's leader)."""
    from insession.log.jetstream import StreamReader

    history: str | Path = history_location(location)
    mark_file: Path | None = None
    if isinstance(history, Path):
        data_dir = history.parent if history.name == "history" else history
        if (data_dir / f"{log.stream}.exported").exists():  # a node's own history (no shared [log] history)
            mark_file = data_dir / f"{log.stream}.exported"
        if (history / "history").is_dir():
            history = history / "history"
    with StreamReader(log) as reader:
        if mark_file is not None:
            mark, mark_from = int(mark_file.read_text()), str(mark_file)
        else:
            shared = reader.shared_mark()
            mark, mark_from = (-1 if shared is None else shared), f"the lease bucket {log.stream}_export"
            if shared is None:
                _log.warning("no export mark for stream %s (no %s.exported beside %s, no lease bucket): the whole "
                             "stream is read and the history is not", log.stream, log.stream, redacted(location))
        end = reader.last_offset()
        if mark > end:
            raise ValueError(f"the export mark {mark} ({mark_from}) lies beyond the end of stream {log.stream} "
                             f"(offset {end}): that history is another stream's; check --stream / [log] stream")
        table = _exactly_once(read_history(history, below=mark + 1), mark, redacted(history))
        tail = reader.tail_arrow(mark + 1, end)
    events = pa.concat_tables([table, tail]).sort_by("offset")
    return ClusterEvents(events, redacted(history), mark, mark_from, end)


def _exactly_once(table: pa.Table, mark: int, where: str) -> pa.Table:
    """The history rows up to `mark`, each offset once (a repeated one kept once, loudly); ValueError when an
    offset in 0..mark is missing."""
    table = table.sort_by("offset")
    offsets = table["offset"].to_numpy()
    keep = np.ones(len(offsets), dtype=bool)
    keep[1:] = offsets[1:] != offsets[:-1]
    if not keep.all():
        _log.warning("history %s holds %d events twice (a stray copy the exporter has not quarantined yet): each "
                     "is read once", where, int((~keep).sum()))
        table = table.filter(pa.array(keep))
    if table.num_rows != mark + 1 or (table.num_rows and table["offset"][0].as_py() != 0):
        have = set(table["offset"].to_pylist())
        missing = next((o for o in range(mark + 1) if o not in have), None)
        why = f"offset {missing} is missing" if missing is not None else "offsets outside 0..mark"
        raise ValueError(f"history {where} holds {table.num_rows} of the {mark + 1} events up to its export mark "
                         f"{mark} ({why}): it is not this stream's history, or parts were lost; "
                         "a node that takes the export lease verifies it and rebuilds lost parts from the stream")
    return table


def load_events(path: str | Path, *, log: LogConfig | None = None) -> pa.Table:
    """An event history (`EVENT_ARROW_SCHEMA`) from: a Parquet file with that schema; a data dir holding
    `history/day=*/` Parquet (the EventLog export), plus, beside an embedded `log.sqlite`, the events after
    its export mark, read as the analytics lane reads them (every acknowledged event once, also while a
    server runs on the directory); a history in an object store (`s3://bucket/prefix`, any pyarrow.fs URI);
    or a dataset dir (`items.jsonl` + `events.parquet`, as `insession generate` / `insession import` write
    it). With `log` naming a replicated log (`log.url`), `path` is its history and the stream's tail after
    the export mark is read too (`read_cluster_events`)."""
    if log is not None and log.url:
        return read_cluster_events(path, log).events
    if is_object_store(path):
        table = read_history(str(path))
        if not table.num_rows:
            raise FileNotFoundError(f"no history part files ({HISTORY_GLOB}) under {path}")
        return table.sort_by("offset")
    path = Path(path)
    if path.is_dir() and (path / ITEMS_FILE).exists() and (path / EVENTS_FILE).exists():
        items = pj.read_json(path / ITEMS_FILE)
        if "subcategory" not in items.column_names:
            items = items.append_column("subcategory", pa.nulls(items.num_rows, pa.string()))
        return as_history(pq.read_table(path / EVENTS_FILE), items)
    if path.is_dir():
        # the data dir's log sits beside its history/, which is absent until the first export
        log_file = (path.parent if path.name == "history" else path) / LOG_FILE
        path = path / "history" if (path / "history").is_dir() else path
        tail = read_tail(str(log_file)) if log_file.exists() else EVENT_ARROW_SCHEMA.empty_table()
        # as the analytics lane: history rows from the tail's first offset on are hidden
        table = read_history(path, below=pc.min(tail["offset"]).as_py() if tail.num_rows else None)
        if not table.num_rows and not tail.num_rows and not history_files(path):
            raise FileNotFoundError(f"no history part files ({HISTORY_GLOB}) under {path}")
        table = pa.concat_tables([table, tail])
    else:
        table = pq.read_table(path)
    missing = set(EVENT_ARROW_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not an event history (missing columns {sorted(missing)})")
    return table.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA).sort_by("offset")


def _sess_events(con: duckdb.DuckDBPyConnection, registry: FeatureRegistry, events: Any, engine: OfflineEngine) -> None:
    """The view `sess_events(off, user_id, item_id, action, ts, session_id, sess, category, subcategory)` on
    the build's own connection: the events the offline engine accepts, numbered into sessions by its own
    rule (`OfflineEngine.accepted`, as Arrow: nothing of the engine's is read by name)."""
    con.register("accepted", engine.accepted(registry, events))
    con.execute("""CREATE OR REPLACE TEMP VIEW sess_events AS
        SELECT "offset" AS off, user_id, item_id, action, ts, session_id, sess, category, subcategory
        FROM accepted""")


def _pair_spine(requests: pa.Table, g: np.ndarray, items: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The spine of (request g[i], candidate items[i]) pairs: the request's user, ts and offset."""
    return pa.table(
        {
            "user_id": requests["user_id"].take(g),
            "item_id": items,
            "ts": requests["ts"].take(g),
            "offset": requests["offset"].take(g),
        }
    )


def pair_counters(
    requests: pa.Table,
    g: np.ndarray,
    items: pa.Array | pa.ChunkedArray,
    events: Any,
    registry: FeatureRegistry,
    engine: OfflineEngine | None = None,
) -> pa.Table:
    """The COUNTERS features, point-in-time, for (request g[i], candidate items[i]) pairs."""
    engine = engine or open_engine()
    return engine.compute([registry[n] for n in COUNTERS], events, _pair_spine(requests, g, items))


def _counter_matrix(
    requests: pa.Table,
    g: np.ndarray,
    items: pa.ChunkedArray,
    events: Any,
    registry: FeatureRegistry,
    engine: OfflineEngine,
) -> np.ndarray:
    """`counter_matrix(pair_counters(...))`, one chunk of feature values at a time (the trainer's pairs are
    ~28M rows at 5M events)."""
    counted = engine.compute_chunks([registry[n] for n in COUNTERS], events, _pair_spine(requests, g, items))
    return np.concatenate([counter_matrix(chunk) for chunk in counted])


def session_covisit(
    events: pa.Table,
    sessions: list[list[dict[str, Any]]],
    ts: np.ndarray,
    offset: np.ndarray,
    n_items: int,
    registry: FeatureRegistry,
    engine: OfflineEngine | None = None,
) -> list[dict[str, dict[str, int]]]:
    """Per request: the `covisit` feature ({neighbour: count}) of its session's `n_items` most recent
    distinct items, keyed in that order (most recent first), read point-in-time at (ts, offset)."""
    distinct = [list(dict.fromkeys(e["item_id"] for e in reversed(s)))[:n_items] for s in sessions]
    g_rep = np.repeat(np.arange(len(distinct)), [len(d) for d in distinct])
    spine = pa.table(
        {
            "item_id": pa.array([i for d in distinct for i in d], pa.string()),
            "ts": pa.array(np.asarray(ts)[g_rep], pa.int64()),
            "offset": pa.array(np.asarray(offset)[g_rep], pa.int64()),
        }
    )
    out: list[dict[str, dict[str, int]]] = [{} for _ in distinct]
    rows = zip(g_rep.tolist(), spine["item_id"].to_pylist(), strict=True)
    engine = engine or open_engine()
    for chunk in engine.compute_chunks([registry["covisit"]], events, spine):  # a chunk's lists at a time
        offsets, flat = ragged(chunk["covisit"])
        codes = flat.field("item_id").dictionary_encode()  # one str object per distinct neighbour
        vocab = codes.dictionary.to_pylist()
        names = [vocab[i] for i in codes.indices.to_numpy(zero_copy_only=False).tolist()]
        counts, bounds = flat.field("count").to_pylist(), offsets.tolist()
        for r, (g, item) in zip(range(chunk.num_rows), rows, strict=False):
            out[g][item] = dict(zip(names[bounds[r] : bounds[r + 1]], counts[bounds[r] : bounds[r + 1]], strict=True))
    return out


def _requests(events: pa.Table) -> pa.Table:
    atc = events.filter(pc.equal(events["action"], "add_to_cart"))
    return pa.table(
        {
            "user_id": atc["user_id"],
            "item_id": atc["item_id"],
            "category": atc["category"],
            "subcategory": atc["subcategory"],
            "ts": atc["ts"],
            "offset": pc.subtract(atc["offset"], 1),  # the state just before the add-to-cart
            "atc_offset": atc["offset"],
            "surface": atc["surface"],
        }
    )


def ragged(lists: pa.ChunkedArray) -> tuple[np.ndarray, pa.StructArray]:
    """(offsets [n + 1], flattened values) of a list column: row r is values[offsets[r]:offsets[r + 1]]."""
    lists = lists.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, pc.list_flatten(lists)


def _action_index(actions: pa.Array) -> np.ndarray:
    idx = pc.fill_null(pc.index_in(actions, value_set=pa.array(ACTIONS)), -1).to_numpy(zero_copy_only=False)
    return (idx + 1).astype(np.int64)


def _sample_negatives(
    cand: pa.Table, groups: np.ndarray, n_total: int, items: pa.Table, rng: np.random.Generator
) -> pa.Table:
    """Top up each group in `groups` to n_total candidates with popularity-weighted items not yet in it."""
    have = cand.group_by("g").aggregate([("item_id", "list")])
    present = dict(zip(have["g"].to_pylist(), have["item_id_list"].to_pylist(), strict=True))
    ids = items["item_id"].to_pylist()
    p = items["n"].to_numpy().astype(np.float64)
    p /= p.sum()
    rows: dict[str, list[Any]] = {"g": [], "item_id": [], "category": [], "subcategory": []}
    cats, subs = items["category"].to_pylist(), items["subcategory"].to_pylist()
    for g in groups.tolist():
        taken = set(present.get(g, []))
        need = n_total - len(taken)
        if need <= 0:
            continue
        draw = rng.choice(len(ids), size=min(len(ids), need * 2 + 8), replace=False, p=p)
        for j in draw:
            if ids[j] in taken:
                continue
            taken.add(ids[j])
            rows["g"].append(g)
            rows["item_id"].append(ids[j])
            rows["category"].append(cats[j])
            rows["subcategory"].append(subs[j])
            need -= 1
            if need == 0:
                break
    extra = pa.table(
        rows,
        schema=pa.schema(
            [
                ("g", pa.int64()),
                ("item_id", pa.string()),
                ("category", pa.string()),
                ("subcategory", pa.string()),
            ]
        ),
    )
    extra = extra.append_column("label", pa.array(np.zeros(extra.num_rows, np.float32)))
    extra = extra.append_column("dist", pa.array(np.full(extra.num_rows, 1 << 40, np.int64)))
    return extra


def _proposals(con: duckdb.DuckDBPyConnection, props: pa.Table) -> pa.Table:
    """The stage's proposals as negatives (g, item_id, category, subcategory, label, dist), in proposal
    order after the positive and the hard negatives; the positive itself and items already listed are
    left out."""
    con.register("props", props.append_column("__row", pa.array(np.arange(props.num_rows), pa.int64())))
    return con.sql(f"""
        WITH cats AS (SELECT item_id, any_value(category) AS category, any_value(subcategory) AS subcategory
                      FROM sess_events GROUP BY item_id)
        SELECT p.g, p.item_id, c.category, c.subcategory, 0.0::FLOAT AS label,
               {1 << 40} + row_number() OVER (PARTITION BY p.g ORDER BY p.__row) AS dist
        FROM props p JOIN requests r ON r.g = p.g LEFT JOIN cats c ON c.item_id = p.item_id
        WHERE p.item_id <> r.item_id
          AND NOT EXISTS (SELECT 1 FROM cand x WHERE x.g = p.g AND x.item_id = p.item_id)""").to_arrow_table()


def counter_matrix(counted: pa.Table) -> np.ndarray:
    """`counter_value` of every cell of a table of COUNTERS features, column by column: [rows, len(COUNTERS)]
    float32 (a count by action counts every action, a missing value 0)."""
    out = np.zeros((counted.num_rows, len(COUNTERS)), np.float32)
    for j, name in enumerate(COUNTERS):
        col = counted[name].combine_chunks()
        parts = [col.field(i) for i in range(col.type.num_fields)] if pa.types.is_struct(col.type) else [col]
        for part in parts:
            out[:, j] += pc.fill_null(part, 0).to_numpy(zero_copy_only=False)
    return out


def assemble_examples(
    requests: pa.Table,
    state: pa.Table,
    cand: pa.Table,
    counters: np.ndarray,
    vocab: Vocab,
    covisit: Sequence[dict[str, dict[str, int]]],
    chunk: int = 5_000,
) -> Examples:
    """The columnar examples of the groups in `requests` (columns g ascending, ts).

    requests: g, ts and surface; state: per request, the MODEL_STATE features (a registry without
    `session_queries` reads as no queries); cand: (g, item_id, category, subcategory, label) sorted by g;
    counters: per cand row, in COUNTERS order; covisit: per request, the `session_covisit` lists. Training,
    evaluation and (row by row) serving build the model's inputs this way. The per-candidate SIGNALS go
    through `signal_rows` `chunk` requests at a time (bounded memory).
    """
    parts: dict[str, np.ndarray] = {
        "request_ts": requests["ts"].to_numpy(),
        "surface": vocab.surface_index(requests["surface"].to_pylist()),
    }
    queries = state[QUERIES].to_pylist() if QUERIES in state.column_names else [None] * requests.num_rows
    grams = [Vocab.query_rows(q or []) for q in queries]
    parts["qry_offsets"] = np.concatenate([[0], np.cumsum([len(q) for q in grams])]).astype(np.int64)
    parts["qry_grams"] = np.concatenate([np.zeros((0, QUERY_GRAMS), np.int64), *grams])
    for name, prefix in zip(SEQUENCES, ("hist", "sess"), strict=True):
        offsets, flat = ragged(state[name])
        parts[f"{prefix}_offsets"] = offsets
        parts[f"{prefix}_items"] = vocab.lookup(flat.field("item_id"), flat.field("category"))
        parts[f"{prefix}_actions"] = _action_index(flat.field("action"))
        parts[f"{prefix}_ts"] = flat.field("ts").to_numpy(zero_copy_only=False).astype(np.int64)
    g = cand["g"].to_numpy()
    local = np.searchsorted(requests["g"].to_numpy(), g)
    parts["cand_offsets"] = np.concatenate([[0], np.cumsum(np.bincount(local, minlength=requests.num_rows))])
    parts["cand_items"] = vocab.lookup(cand["item_id"], cand["category"], cand["subcategory"])
    parts["cand_labels"] = cand["label"].to_numpy().astype(np.float32)
    parts["cand_counters"] = counters.astype(np.float32)
    signals = np.zeros((cand.num_rows, len(SIGNALS)), np.float32)
    bounds = parts["cand_offsets"].tolist()
    for lo in range(0, requests.num_rows, chunk):
        n = min(chunk, requests.num_rows - lo)
        a, b = bounds[lo], bounds[lo + n]
        sessions = state["session_seq"].slice(lo, n).to_pylist()
        histories = state["history_seq"].slice(lo, n).to_pylist()
        items, cats = cand["item_id"].slice(a, b - a).to_pylist(), cand["category"].slice(a, b - a).to_pylist()
        subs = cand["subcategory"].slice(a, b - a).to_pylist()
        now = parts["request_ts"][lo : lo + n].tolist()
        rows = [
            row
            for r in range(n)
            for row in signal_rows(
                items[bounds[lo + r] - a : bounds[lo + r + 1] - a],
                cats[bounds[lo + r] - a : bounds[lo + r + 1] - a],
                sessions[r] or [],
                histories[r] or [],
                covisit[lo + r],
                now[r],
                subs[bounds[lo + r] - a : bounds[lo + r + 1] - a],
                queries[lo + r] or [],
            )
        ]
        signals[a:b] = np.array(rows, np.float32).reshape(-1, len(SIGNALS))
    parts["cand_signals"] = signals
    return Examples(**parts)


class _Steps:
    """Wall time per step of the build, in order; `start(step, message)` ends the running step."""

    def __init__(self, progress: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.progress = progress
        self.step, self.t0 = "", time.perf_counter()

    def start(self, step: str, message: str = "") -> None:
        now = time.perf_counter()
        if self.step:
            self.seconds[self.step] = self.seconds.get(self.step, 0.0) + now - self.t0
            if self.progress:
                print(f"  ({self.step}: {now - self.t0:.1f} s)", flush=True)
        self.step, self.t0 = step, now
        if self.progress and message:
            print(message, flush=True)


def build(
    events: pa.Table,
    cfg: BuildConfig | None = None,
    registry: FeatureRegistry | None = None,
    progress: bool = True,
    proposer: Proposer | None = None,
    engine: OfflineEngine | None = None,
) -> TrainingData:
    """Training and validation examples (time split), vocabulary and item2vec inputs from an event history.

    With a `proposer` the candidate stage's proposals are negatives too, and only requests whose positive
    the stage proposed are kept (see the module docstring). `engine` computes the point-in-time features, the
    accepted events and each request's positive and in-session hard negatives (default: DuckDB); what the
    build joins itself runs on its own DuckDB connection over the Arrow tables the engine returns."""
    cfg = cfg or BuildConfig()
    registry = registry or default_registry()
    engine = engine or open_engine()
    steps = _Steps(progress)
    con = offline.connect()
    requests = _requests(events)
    if requests.num_rows == 0:
        raise ValueError("the history holds no add_to_cart event: nothing to learn from")
    steps.start("sessions", f"sessions and time split of {requests.num_rows:,} add-to-carts ...")
    _sess_events(con, registry, events, engine)
    requests = requests.append_column("g", pa.array(np.arange(requests.num_rows), pa.int64()))
    con.register("requests", requests)
    accepted = con.sql("SELECT r.g FROM requests r SEMI JOIN sess_events e ON e.off = r.atc_offset ORDER BY g")
    keep = accepted.to_arrow_table()["g"].to_numpy()  # add-to-carts the engine dropped as too late are no request
    split_ts = int(np.quantile(requests["ts"].to_numpy()[keep], 1 - cfg.val_fraction, method="lower")) + 1
    is_val = requests["ts"].to_numpy() >= split_ts

    train_events = con.sql(f"""SELECT item_id, category, subcategory FROM sess_events
                               WHERE ts < {split_ts} ORDER BY off""").to_arrow_table()
    vocab = Vocab.build(train_events["item_id"], train_events["category"], train_events["subcategory"],
                        requests.filter(pc.less(requests["ts"], split_ts))["surface"].to_pylist())
    del train_events

    steps.start("hard negatives", "candidates: positives and in-session hard negatives ...")
    cand = engine.session_candidates(registry, events, requests, window_ms=cfg.window_ms, k=cfg.max_hard_negatives)
    train_groups, val_groups = keep[~is_val[keep]], keep[is_val[keep]]
    if len(val_groups) > cfg.max_val_groups:
        val_groups = np.sort(np.random.default_rng(cfg.seed).choice(val_groups, cfg.max_val_groups, replace=False))
    asked = np.concatenate([train_groups, val_groups])  # the groups whose state is read, in this order
    if proposer is not None:
        steps.start("candidate stage", "candidates: the candidate stage's proposals at each request ...")
        answer = proposer(requests.take(asked))
        state, covisit = answer.state, answer.covisit  # read by the stage at the same requests: reused
        con.register("cand", cand)
        served = _proposals(con, answer.proposals)
        proposed = np.unique(
            con.sql("SELECT p.g FROM props p JOIN requests r ON r.g = p.g AND r.item_id = p.item_id")
            .to_arrow_table()["g"]
            .to_numpy()
        )
        con.unregister("props")
        train_groups, val_groups = np.intersect1d(train_groups, proposed), np.intersect1d(val_groups, proposed)
        cand = pa.concat_tables([cand, served.select(cand.column_names).cast(cand.schema)])
        del served
    else:
        steps.start("sequences", f"point-in-time sequences for {len(asked):,} add-to-carts ...")
        state = engine.compute(
            [registry[n] for n in MODEL_STATE if n in registry], events,
            requests.take(asked).select(["user_id", "ts", "offset"]),
        )
        steps.start("co-visitation", "co-visitation of the session items ...")
        covisit = session_covisit(
            events,
            state["session_seq"].to_pylist(),
            requests["ts"].to_numpy()[asked],
            requests["offset"].to_numpy()[asked],
            cfg.session_items,
            registry,
            engine,
        )
    cand = cand.filter(pa.array(np.isin(cand["g"].to_numpy(), np.concatenate([train_groups, val_groups]))))
    if proposer is not None:
        cand = cand.sort_by([("g", "ascending"), ("dist", "ascending"), ("item_id", "ascending")])
    elif cfg.eval_candidates and len(val_groups):
        popular = con.sql(f"""
            SELECT item_id, any_value(category) AS category, any_value(subcategory) AS subcategory,
                   count(*) AS n
            FROM sess_events WHERE ts < {split_ts} GROUP BY item_id ORDER BY item_id""").to_arrow_table()
        extra = _sample_negatives(cand, val_groups, cfg.eval_candidates, popular, np.random.default_rng(cfg.seed))
        cand = pa.concat_tables([cand, extra.select(cand.column_names).cast(cand.schema)]).sort_by(
            [("g", "ascending"), ("dist", "ascending"), ("item_id", "ascending")]
        )

    steps.start("counters", f"point-in-time counters for {cand.num_rows:,} (request, candidate) pairs ...")
    g = cand["g"].to_numpy()
    counters = _counter_matrix(requests, g, cand["item_id"], events, registry, engine)

    seq = con.sql(f"""SELECT item_id, category, subcategory, action, ts,
                             dense_rank() OVER (ORDER BY user_id) AS u, dense_rank() OVER (ORDER BY user_id, sess) AS s
                      FROM sess_events WHERE ts < {split_ts} ORDER BY user_id, sess, off""").to_arrow_table()
    meta = con.sql("""
        SELECT e.user_id, e.session_id, e.ts, e.off AS "offset", e.item_id
        FROM requests r JOIN sess_events e ON e.off = r.atc_offset ORDER BY r.g""").to_arrow_table()
    con.close()  # the examples step needs none of the connection's tables
    order = np.argsort(asked, kind="stable")

    def part(groups: np.ndarray) -> Examples:
        rows = np.isin(g, groups)
        at = order[np.searchsorted(asked, groups, sorter=order)]  # the groups' rows in state and covisit
        return assemble_examples(
            requests.take(groups),
            state.take(at),
            cand.filter(pa.array(rows)),
            counters[rows],
            vocab,
            [covisit[i] for i in at.tolist()],
        )

    steps.start("examples", f"examples: {len(train_groups):,} training and {len(val_groups):,} validation groups ...")
    val = part(val_groups)
    train = part(train_groups)
    steps.start("")
    return TrainingData(
        train=train,
        val=val,
        vocab=vocab,
        feature_hash=registry.hash(),
        split_ts=split_ts,
        train_requests=meta.filter(pa.array(np.isin(keep, train_groups))),
        val_requests=meta.filter(pa.array(np.isin(keep, val_groups))),
        stream=Stream(
            items=vocab.lookup(seq["item_id"], seq["category"], seq["subcategory"]),
            actions=_action_index(seq["action"]),
            ts=seq["ts"].to_numpy().astype(np.int64),
            shopper=seq["u"].to_numpy().astype(np.int64),
            session=seq["s"].to_numpy().astype(np.int64),
            cutoff=split_ts,
        ),
        seconds=steps.seconds,
    )


def examples_table(examples: Examples) -> pa.Table:
    """Examples as one row per group: its per-group values (`request_ts`, `surface`) and a list column per
    ragged array of `Examples` (the same names; counters, signals and query grams as lists of fixed-size
    lists), the form `training-data` writes."""
    cols: dict[str, pa.Array] = {}
    for f in fields(Examples):
        prefix, _, _ = f.name.partition("_")
        if f.name.endswith("_offsets"):
            continue
        if not hasattr(examples, f"{prefix}_offsets"):  # one value per group
            cols[f.name] = pa.array(getattr(examples, f.name), pa.int64())
            continue
        values = getattr(examples, f.name)
        flat = (
            pa.array(values)
            if values.ndim == 1
            else pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        )
        offsets = pa.array(getattr(examples, f"{prefix}_offsets").astype(np.int64), pa.int64())
        cols[f.name] = pa.LargeListArray.from_arrays(offsets, flat)
    return pa.table(cols)


def write_training_data(data: TrainingData, out: Path) -> list[Path]:
    """`train.parquet` and `val.parquet` (`examples_table`), the requests of each group
    (`train_requests.parquet`, `val_requests.parquet`) and `meta.json` (feature hash, split, item count,
    seconds per step) under `out`. Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in (
        ("train", examples_table(data.train)),
        ("val", examples_table(data.val)),
        ("train_requests", data.train_requests),
        ("val_requests", data.val_requests),
    ):
        pq.write_table(table, out / f"{name}.parquet")
        written.append(out / f"{name}.parquet")
    meta = {
        "feature_hash": data.feature_hash,
        "split_ts": data.split_ts,
        "items": data.vocab.n_items - 1,
        "train_groups": len(data.train),
        "val_groups": len(data.val),
        "seconds": data.seconds,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return [*written, out / "meta.json"]
