"""The ranking service's candidate stage replayed offline: 60 proposals per request from point-in-time state.

For each request the sources are read as the online engine would have served them just before the
add-to-cart (`insession.features.offline`, same declarations): the session and history sequences, the
15-day top categories, the 2-hour trending list and the co-visitation neighbours of the session's items.
Popular items per category, and per subcategory for the session's searches, come from the declared 28-day
window at the start of the request's hour (the service rebuilds its popular lists every few seconds; an
hour-old snapshot is a little staler, never newer). Proposals go through the service's own `propose` and
hygiene `eligible` rule.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from insession.features import default_registry
from insession.features.declare import HOUR_MS, FeatureRegistry
from insession.log.catalog import Catalog
from insession.model.reranker import COUNTERS
from insession.offline import OfflineEngine, open_engine
from insession.rank.candidates import CandidateQuotas, propose, sources_for
from insession.rank.hygiene import HygieneRules, eligible
from insession.schema import Item
from insession.train.build import MODEL_STATE, Proposed, Proposer, pair_counters, ragged, session_covisit

USER_FEATURES = (*MODEL_STATE, "top_categories_15d", "trending_items_2h")
PER_CATEGORY, TOP = 30, 200  # the PopularItems list sizes of the ranking service


@dataclass
class CandidateSets:
    """Requests with their point-in-time state, proposals, and the evaluated candidate lists.

    `lists[i]` is request i's ranked-by-nobody candidate list in the "forced" view: the proposals, with
    the positive put in place of the last proposal when the stage missed it; `proposed[i]` says whether the
    stage proposed it (the "proposed" view is those requests only). `positive[i]` indexes it in lists[i].
    """

    requests: pa.Table  # split.requests() columns + session_key
    state: pa.Table  # per request: USER_FEATURES the registry declares (point-in-time)
    lists: list[list[str]]
    positive: np.ndarray
    proposed: np.ndarray  # bool
    proposal_rank: np.ndarray  # 0-based rank of the positive in proposal order, -1 when not proposed
    n_proposed: np.ndarray  # how many items the stage proposed
    covisit: list[dict[str, dict[str, int]]]  # per request: session item -> {neighbour: count}
    counters: pa.Table  # per (request, candidate) row of `flat()`: the COUNTERS features, point-in-time

    def flat(self) -> pa.Table:
        """(g, item_id, label) for every candidate of every request, in list order."""
        g = np.repeat(self.requests["g"].to_numpy(), [len(x) for x in self.lists])
        items = [i for x in self.lists for i in x]
        label = (
            np.concatenate([np.arange(len(x)) == p for x, p in zip(self.lists, self.positive, strict=True)])
            if self.lists
            else np.zeros(0, bool)
        )
        return pa.table(
            {
                "g": pa.array(g, pa.int64()),
                "item_id": pa.array(items, pa.string()),
                "label": pa.array(label.astype(np.float32)),
            }
        )

    def proposals(self) -> pa.Table:
        """(g, item_id) of what the stage itself proposed, in proposal order (no positive put in)."""
        flat = self.flat()
        forced = np.repeat(~self.proposed, [len(x) for x in self.lists]) & (flat["label"].to_numpy() > 0)
        return flat.filter(pa.array(~forced)).select(["g", "item_id"])

    def row_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(x) for x in self.lists])]).astype(np.int64)


def _catalog(items: pa.Table, path: Path) -> Catalog:
    catalog = Catalog(path)
    rows = items.to_pylist()
    catalog.upsert([Item(r["item_id"], r["category"], r["subcategory"], None, r["available"]) for r in rows])
    return catalog


def _popular_snapshots(
    events: pa.Table, items: pa.Table, hours: np.ndarray, reg: FeatureRegistry
) -> dict[int, tuple[dict[str, list[str]], list[str]]]:
    """hour start -> (category -> popular items, global popular items), as of that instant (28-day window)."""
    w = reg["item_count_28d"].window
    con = duckdb.connect()
    con.register("ev", events.select(["item_id", "ts"]))
    con.register("items", items)
    con.register("snap", pa.table({"h": pa.array(np.unique(hours), pa.int64())}))
    rows = con.sql(f"""
        WITH counts AS (
            SELECT s.h, e.item_id, count(*) AS n FROM snap s JOIN ev e
              ON e.ts < s.h AND e.ts >= (s.h // {w.tile_ms} - {w.tiles - 1}) * {w.tile_ms}
            GROUP BY ALL),
        ranked AS (
            SELECT c.h, c.item_id, i.category,
                   row_number() OVER (PARTITION BY c.h, i.category ORDER BY c.n DESC, c.item_id) AS rc,
                   row_number() OVER (PARTITION BY c.h ORDER BY c.n DESC, c.item_id) AS rg
            FROM counts c JOIN items i USING (item_id) WHERE i.available)
        SELECT h, item_id, category, rc, rg FROM ranked WHERE rc <= {PER_CATEGORY} OR rg <= {TOP}
        ORDER BY h, rg""").fetchall()
    out: dict[int, tuple[dict[str, list[str]], list[str]]] = {int(h): ({}, []) for h in np.unique(hours)}
    for h, item, category, rc, rg in rows:
        per_category, top = out[h]
        if rc <= PER_CATEGORY:
            per_category.setdefault(category, []).append(item)
        if rg <= TOP:
            top.append(item)
    return out


def _search_snapshots(
    events: pa.Table, items: pa.Table, wanted: set[tuple[int, str]], reg: FeatureRegistry
) -> dict[tuple[int, str], list[str]]:
    """(hour start, subcategory) -> the subcategory's available items, by 28-day count at that instant (none
    counted is 0), then id: the search source's lists (`PopularLists.per_subcategory`). Online, every item of
    the catalogue is listed; here only those seen in the log before the hour, the replay's stand-in for "was
    in the catalogue then" (so no item is proposed before it exists)."""
    if not wanted:
        return {}
    w = reg["item_count_28d"].window
    con = duckdb.connect()
    con.register("ev", events.select(["item_id", "ts"]))
    con.register("items", items.select(["item_id", "subcategory", "available"]))
    hs, subs = zip(*sorted(wanted), strict=True)
    con.register("wanted", pa.table({"h": pa.array(hs, pa.int64()), "subcategory": pa.array(subs, pa.string())}))
    rows = con.sql(f"""
        WITH firsts AS (SELECT item_id, min(ts) AS first FROM ev GROUP BY item_id),
        members AS (
            SELECT w.h, w.subcategory, i.item_id FROM wanted w
            JOIN items i ON i.subcategory = w.subcategory AND i.available
            JOIN firsts f ON f.item_id = i.item_id AND f.first < w.h),
        counted AS (
            SELECT m.h, m.subcategory, m.item_id, count(e.ts) AS n FROM members m LEFT JOIN ev e
              ON e.item_id = m.item_id AND e.ts < m.h AND e.ts >= (m.h // {w.tile_ms} - {w.tiles - 1}) * {w.tile_ms}
            GROUP BY ALL),
        ranked AS (
            SELECT h, subcategory, item_id,
                   row_number() OVER (PARTITION BY h, subcategory ORDER BY n DESC, item_id) AS r
            FROM counted)
        SELECT h, subcategory, item_id FROM ranked WHERE r <= {PER_CATEGORY} ORDER BY h, subcategory, r""").fetchall()
    out: dict[tuple[int, str], list[str]] = {}
    for h, subcategory, item in rows:
        out.setdefault((int(h), subcategory), []).append(item)
    return out


def build_candidates(
    events: pa.Table,
    items: pa.Table,
    requests: pa.Table,
    quotas: CandidateQuotas = CandidateQuotas(),
    rules: HygieneRules = HygieneRules(),
    registry: FeatureRegistry | None = None,
    progress: bool = True,
    with_counters: bool = True,
    engine: OfflineEngine | None = None,
) -> CandidateSets:
    """Replay the candidate stage for every request (see the module docstring); one list per request.

    with_counters=False leaves `counters` empty (training reads them itself). `engine`: the offline engine
    of the point-in-time state (default: DuckDB)."""
    reg = registry or default_registry()
    engine = engine or open_engine()
    say = tqdm.write if progress else (lambda *_: None)
    say(f"point-in-time state for {requests.num_rows:,} requests ...")
    spine = requests.select(["user_id", "ts", "offset"])
    state = engine.compute([reg[n] for n in USER_FEATURES if n in reg], events, spine)
    sessions = state["session_seq"].to_pylist()
    # a session is keyed by its user and first event (the request itself when the session starts with it)
    ts = requests["ts"].to_numpy()
    users = requests["user_id"].to_pylist()
    key = [f"{u}@{s[0]['ts'] if s else t}" for u, s, t in zip(users, sessions, ts.tolist(), strict=True)]
    requests = requests.append_column("session_key", pa.array(key, pa.string()))

    say("co-visitation neighbours of the session items ...")
    covisit = session_covisit(events, sessions, ts, requests["offset"].to_numpy(), quotas.session, reg, engine)

    say("popular items per category (hourly snapshots) ...")
    hours = ts // HOUR_MS * HOUR_MS
    popular = _popular_snapshots(events, items, hours, reg)
    subcategory_of = dict(zip(items["item_id"].to_pylist(), items["subcategory"].to_pylist(), strict=True))
    searched = [[subcategory_of.get(e["item_id"]) for e in s if e["action"] == "search"] if quotas.search else []
                for s in sessions]
    results = _search_snapshots(
        events, items, {(int(h), c) for h, cs in zip(hours, searched, strict=True) for c in cs if c is not None}, reg)

    # history item ids as integer codes into one list of names (no Python object per history event)
    offsets, flat = ragged(state["history_seq"])
    bounds = offsets.tolist()
    history_codes = flat.field("item_id").dictionary_encode()
    history_names = history_codes.dictionary.to_pylist()
    codes = history_codes.indices.to_numpy(zero_copy_only=False)

    lists: list[list[str]] = []
    positive, proposal_rank, n_proposed = [], [], []
    with tempfile.TemporaryDirectory(prefix="insession-eval-") as tmp:
        catalog = _catalog(items, Path(tmp) / "catalog.sqlite")
        top_cats = state["top_categories_15d"].to_pylist()
        trending = state["trending_items_2h"].to_pylist()
        pos_items = requests["item_id"].to_pylist()
        for g in tqdm(range(requests.num_rows), desc="candidate stage", disable=not progress, leave=False):
            session = sessions[g]
            per_category, top = popular[int(hours[g])]
            sources = sources_for(
                session,
                top_cats[g],
                lambda i, c=covisit[g]: list(c.get(i, {})),
                per_category,
                [t["item_id"] for t in trending[g]],
                top,
                quotas,
                history=[history_names[c] for c in codes[bounds[g] : bounds[g + 1]].tolist()],
                search_results=lambda i, h=int(hours[g]): results.get((h, subcategory_of.get(i, "")), []),
            )
            purchased = {e["item_id"] for e in session if e["action"] == "purchase"}
            proposal = propose(sources, lambda i, p=purchased: eligible(i, catalog, p, rules), quotas)
            n_proposed.append(len(proposal))
            if pos_items[g] in proposal:
                r = proposal.index(pos_items[g])
                proposal_rank.append(r)
                positive.append(r)
            else:
                proposal_rank.append(-1)
                if len(proposal) >= quotas.n:
                    proposal[-1] = pos_items[g]
                else:
                    proposal.append(pos_items[g])
                positive.append(len(proposal) - 1)
            lists.append(proposal)
        catalog.close()
    sets = CandidateSets(
        requests,
        state,
        lists,
        np.array(positive, np.int64),
        np.array(proposal_rank) >= 0,
        np.array(proposal_rank, np.int64),
        np.array(n_proposed, np.int64),
        covisit,
        pa.table({}),
    )
    if not with_counters:
        return sets
    flat = sets.flat()
    say(f"point-in-time counters for {flat.num_rows:,} (request, candidate) pairs ...")
    counted = pair_counters(requests, flat["g"].to_numpy(), flat["item_id"], events, reg, engine)
    sets.counters = counted.select(list(COUNTERS))
    return sets


def catalogue_of(events: pa.Table) -> pa.Table:
    """A catalogue (item_id, category, subcategory, available) of every item in an event history, for
    histories that come without one (every item taken as available)."""
    con = duckdb.connect()
    con.register("ev", events.select(["item_id", "category", "subcategory"]))
    return con.sql("""SELECT item_id, any_value(category) AS category, any_value(subcategory) AS subcategory,
                             true AS available FROM ev GROUP BY item_id ORDER BY item_id""").to_arrow_table()


def stage_proposer(
    events: pa.Table, items: pa.Table | None = None, progress: bool = True, engine: OfflineEngine | None = None
) -> Proposer:
    """The training data's `Proposer`: this replay of the serving candidate stage over `events` (and the
    catalogue `items`, derived from the events when None), point-in-time at each request, its state from
    `engine` (default: DuckDB)."""
    catalogue = items if items is not None else catalogue_of(events)
    replayed: dict[tuple[int, ...], Proposed] = {}  # the same requests (e.g. one build per seed) replay once

    def propose_at(requests: pa.Table) -> Proposed:
        key = tuple(requests["offset"].to_pylist())
        if key not in replayed:
            sets = build_candidates(
                events, catalogue, requests, progress=progress, with_counters=False, engine=engine
            )
            model_state = [n for n in MODEL_STATE if n in sets.state.column_names]
            replayed[key] = Proposed(sets.proposals(), sets.state.select(model_state), sets.covisit)
        return replayed[key]

    return propose_at
