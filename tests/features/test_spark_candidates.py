"""`OfflineEngine.session_candidates` (each add-to-cart's item and its in-session hard negatives, joined in the
engine instead of in the build's driver) equals, on DuckDB and on Spark, a reference written out in Python
over the accepted events: the positive first, then at most k items viewed in the same session within the
window and never carted in it, nearest first, ties by item, each with the category of its latest such view
that has one; no row for an add-to-cart the lateness rule dropped. Streams mix sessions by id and by
inactivity, late and too-late events."""

from __future__ import annotations

import pyarrow as pa
from features_helpers import T0, ev
from hypothesis import example, given
from hypothesis import strategies as st
from spark_helpers import several_events, shared_spark_engine, spark_settings

from insession.features import FeatureRegistry
from insession.features.declare import MINUTE_MS
from insession.log.export import events_to_arrow
from insession.offline import CANDIDATE_SCHEMA, open_engine
from insession.schema import Event

REG = FeatureRegistry.of([])  # the default lateness (5 min) and session gap (30 min)
WINDOW, K = 10 * MINUTE_MS, 2


def expected(accepted: list[dict], requests: list[tuple[int, int]]) -> list[dict]:
    by_offset = {e["offset"]: e for e in accepted}
    carted = {(e["user_id"], e["sess"], e["item_id"]) for e in accepted if e["action"] == "add_to_cart"}
    out = []
    for g, atc in requests:
        r = by_offset.get(atc)
        if r is None:
            continue
        out.append({"g": g, "item_id": r["item_id"], "category": r["category"], "subcategory": r["subcategory"],
                    "label": 1.0, "dist": -1})  # fmt: skip
        near: dict[str, dict] = {}
        for v in accepted:  # offset order: the latest view's category wins, unless it has none
            same = (v["user_id"], v["sess"]) == (r["user_id"], r["sess"]) and v["action"] == "view"
            if same and abs(v["ts"] - r["ts"]) <= WINDOW and (v["user_id"], v["sess"], v["item_id"]) not in carted:
                was = near.get(v["item_id"], {"dist": 1 << 62, "category": None, "subcategory": None})
                near[v["item_id"]] = {"g": g, "item_id": v["item_id"], "category": v["category"] or was["category"],
                                      "subcategory": v["subcategory"] or was["subcategory"], "label": 0.0,
                                      "dist": min(abs(v["ts"] - r["ts"]), was["dist"])}  # fmt: skip
        out += sorted(near.values(), key=lambda n: (n["dist"], n["item_id"]))[:K]
    return sorted(out, key=lambda n: (n["g"], n["dist"], n["item_id"]))


@st.composite
def shop_streams(draw: st.DrawFn) -> list[Event]:
    """Up to 60 events of 2 users and 5 items, minutes apart, sometimes late or too late, sometimes past the
    session gap; sessions by id or by inactivity."""
    n = draw(st.integers(1, 60))
    ts, out = T0, []
    for off in range(n):
        ts += draw(st.one_of(st.integers(0, 3 * MINUTE_MS), st.integers(-8 * MINUTE_MS, 0),
                             st.integers(0, 45 * MINUTE_MS)))  # fmt: skip
        out.append(
            ev(off, draw(st.sampled_from(["u0", "u1"])), draw(st.sampled_from(["i0", "i1", "i2", "i3", "i4"])), ts,
               draw(st.sampled_from(["view", "view", "add_to_cart", "purchase"])),
               category=draw(st.sampled_from(["c0", "c1", None])), session=draw(st.sampled_from([None, "s0", "s1"])))
        )  # fmt: skip
    return out


# The add-to-cart of i0 (offset 6): i4 viewed 30 s before (its latest view has no category: its earlier c0
# stands), i2 1 minute before (and 3 minutes before, as c0: the latest category, c1, wins), i1 4 minutes before
# (and 17 minutes after: outside the window); i3 viewed but carted in the session. k = 2 keeps i4 and i2.
# i3's own add-to-cart a minute later gets the same two; the add-to-cart at offset 9 comes more than the
# lateness after the watermark (T0 + 21 min): dropped, no row.
HAND = [ev(0, "u0", "i1", T0, category="c1"), ev(1, "u0", "i4", T0 + MINUTE_MS // 2),
        ev(2, "u0", "i2", T0 + MINUTE_MS), ev(3, "u0", "i3", T0 + 2 * MINUTE_MS),
        ev(4, "u0", "i2", T0 + 3 * MINUTE_MS, category="c1"), ev(5, "u0", "i4", T0 + 7 * MINUTE_MS // 2, category=None),
        ev(6, "u0", "i0", T0 + 4 * MINUTE_MS, "add_to_cart"), ev(7, "u0", "i3", T0 + 5 * MINUTE_MS, "add_to_cart"),
        ev(8, "u0", "i1", T0 + 21 * MINUTE_MS, category="c0"),
        ev(9, "u0", "i1", T0 + 10 * MINUTE_MS, "add_to_cart")]  # fmt: skip


@spark_settings(2)
@example(events=HAND)
@given(events=several_events(shop_streams()))
def test_both_engines_give_the_positive_and_the_nearest_unbought_views_of_its_session(events: list[Event]) -> None:
    history = events_to_arrow(events)
    duck = open_engine("duckdb")
    accepted = duck.accepted(REG, history).to_pylist()
    carts = [e.offset for e in events if e.action == "add_to_cart"]  # a too-late one included: no row
    requests = pa.table({"g": pa.array(range(len(carts)), pa.int64()), "atc_offset": pa.array(carts, pa.int64())})
    want = expected(accepted, list(zip(range(len(carts)), carts, strict=True)))
    if events == HAND:
        assert [(r["g"], r["item_id"], r["dist"], r["category"]) for r in want] == [
            (0, "i0", -1, "c0"), (0, "i4", 30_000, "c0"), (0, "i2", 60_000, "c1"),
            (1, "i3", -1, "c0"), (1, "i4", 90_000, "c0"), (1, "i2", 120_000, "c1"),
        ]  # fmt: skip
    for engine in (duck, shared_spark_engine()):
        got = engine.session_candidates(REG, history, requests, window_ms=WINDOW, k=K)
        assert got.schema == CANDIDATE_SCHEMA
        assert got.to_pylist() == want, engine.name
