"""Training data from the offline feature engine: point-in-time correctness, labels, hard negatives."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from train_shop import MINUTE, make_shop

from insession.features.declare import default_registry
from insession.model.reranker import COUNTERS, counter_value
from insession.schema import ACTIONS
from insession.train.build import BuildConfig, TrainingData, build, counter_matrix

WINDOW = 5 * MINUTE


@pytest.fixture(scope="module")
def shop() -> pa.Table:
    return make_shop(n_users=30, seed=4)[0]


@pytest.fixture(scope="module")
def data(shop: pa.Table) -> TrainingData:
    return build(shop, BuildConfig(window_ms=WINDOW, max_hard_negatives=50, eval_candidates=20), progress=False)


def groups(data: TrainingData) -> list[tuple[str, object, np.ndarray, np.ndarray]]:
    """(part, request row, candidate indices, labels) for every example group."""
    out = []
    for part, ex, req in (("train", data.train, data.train_requests), ("val", data.val, data.val_requests)):
        rows = req.to_pylist()
        assert len(rows) == len(ex)
        for g, r in enumerate(rows):
            a, b = ex.cand_offsets[g], ex.cand_offsets[g + 1]
            out.append((part, r, ex.cand_items[a:b], ex.cand_labels[a:b]))
    return out


def test_one_group_per_add_to_cart_with_the_carted_item_first(shop: pa.Table, data: TrainingData) -> None:
    n_atc = pc.sum(pc.equal(shop["action"], "add_to_cart")).as_py()
    assert len(data.train) + len(data.val) == n_atc
    assert data.val.request_ts.min() >= data.split_ts > data.train.request_ts.max()
    for part, req, items, labels in groups(data):
        assert labels[0] == 1 and (labels[1:] == 0).all()
        if req["item_id"] in data.vocab.items:
            assert items[0] == data.vocab.items.index(req["item_id"]) + 1
        else:  # an item first seen in the validation period: a cold-start row
            assert items[0] >= data.vocab.n_items and part == "val"
    assert data.feature_hash == default_registry().hash()


def test_hard_negatives_are_viewed_near_the_cart_in_the_session_and_never_carted(
    shop: pa.Table, data: TrainingData
) -> None:
    rows = shop.to_pylist()
    carted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in rows:
        if e["action"] == "add_to_cart":
            carted[(e["user_id"], e["session_id"])].add(e["item_id"])
    for part, req, items, _ in groups(data):
        if part == "val":
            continue  # validation groups also hold sampled items; their hard negatives are the same rule
        key = (req["user_id"], req["session_id"])
        near = {
            e["item_id"]
            for e in rows
            if (e["user_id"], e["session_id"]) == key and e["action"] == "view" and abs(e["ts"] - req["ts"]) <= WINDOW
        } - carted[key]
        expected = data.vocab.lookup(pa.array(sorted(near), pa.string()), pa.array([None] * len(near), pa.string()))
        assert sorted(items[1:].tolist()) == sorted(expected.tolist())


def test_validation_groups_are_topped_up_to_serving_size(data: TrainingData) -> None:
    sizes = np.diff(data.val.cand_offsets)
    assert (sizes == 20).all()
    for g in range(len(data.val)):
        a, b = data.val.cand_offsets[g], data.val.cand_offsets[g + 1]
        assert len(set(data.val.cand_items[a:b].tolist())) == b - a  # no duplicate candidate


def test_sequences_are_as_of_just_before_the_add_to_cart(data: TrainingData) -> None:
    atc = ACTIONS.index("add_to_cart") + 1
    for ex in (data.train, data.val):
        for g in range(len(ex)):
            t = ex.request_ts[g]
            for prefix in ("hist", "sess"):
                off = getattr(ex, f"{prefix}_offsets")
                ts = getattr(ex, f"{prefix}_ts")[off[g] : off[g + 1]]
                assert (ts < t).all()  # shop timestamps are distinct: nothing at or after the request
            sa, sb = ex.sess_offsets[g], ex.sess_offsets[g + 1]
            carts = ex.sess_ts[sa:sb][ex.sess_actions[sa:sb] == atc]
            assert (carts < t).all()


def test_counters_equal_a_brute_force_count_before_the_request(shop: pa.Table, data: TrainingData) -> None:
    rows = shop.to_pylist()
    hour, minute = 60 * MINUTE, MINUTE
    for ex, req in ((data.train, data.train_requests), (data.val, data.val_requests)):
        for g, r in enumerate(req.to_pylist()):
            seen = [e for e in rows if e["offset"] < r["offset"] and e["ts"] <= r["ts"]]
            a, b = ex.cand_offsets[g], ex.cand_offsets[g + 1]
            for idx, counters in zip(ex.cand_items[a:b].tolist(), ex.cand_counters[a:b].tolist(), strict=True):
                if not 0 < idx < data.vocab.n_items:
                    continue  # a cold candidate: its id is not in the vocabulary to compare with
                item = data.vocab.items[idx - 1]
                lo28 = (r["ts"] // hour - 28 * 24 + 1) * hour
                lo2 = (r["ts"] // minute - 120 + 1) * minute
                expected = [
                    sum(e["user_id"] == r["user_id"] and e["item_id"] == item and e["ts"] >= lo28 for e in seen),
                    sum(e["item_id"] == item and e["ts"] >= lo28 for e in seen),
                    sum(e["item_id"] == item and e["ts"] >= lo2 for e in seen),
                ]
                assert counters == expected, (r, item)


def test_counter_matrix_is_counter_value_of_every_cell() -> None:
    by_action = pa.struct([(a, pa.int64()) for a in ACTIONS])
    rows = [
        {"user_item_count_28d": dict.fromkeys(ACTIONS, 2), "item_count_28d": None, "item_trending_2h": 7},
        {
            "user_item_count_28d": None,
            "item_count_28d": {**dict.fromkeys(ACTIONS, 0), "view": 5},
            "item_trending_2h": None,
        },
    ]
    schema = pa.schema(
        [("user_item_count_28d", by_action), ("item_count_28d", by_action), ("item_trending_2h", pa.int64())]
    )
    table = pa.Table.from_pylist(rows, schema)
    assert counter_matrix(table).tolist() == [[counter_value(r.get(n)) for n in COUNTERS] for r in rows]
    assert counter_matrix(table).shape == (2, len(COUNTERS))


def item_ids(data: TrainingData, idx: np.ndarray) -> list[str]:
    return [data.vocab.items[i - 1] if 0 < i < data.vocab.n_items else f"<cold {i}>" for i in idx.tolist()]


def example_by_offset(data: TrainingData) -> dict[int, dict[str, object]]:
    """Each group's features with item ids spelled out, keyed by the add-to-cart's log offset."""
    out = {}
    for ex, req in ((data.train, data.train_requests), (data.val, data.val_requests)):
        for g, r in enumerate(req.to_pylist()):
            row: dict[str, object] = {"ts": int(ex.request_ts[g])}
            for prefix in ("hist", "sess", "cand"):
                off = getattr(ex, f"{prefix}_offsets")
                row[prefix] = item_ids(data, getattr(ex, f"{prefix}_items")[off[g] : off[g + 1]])
            a, b = ex.cand_offsets[g], ex.cand_offsets[g + 1]
            row["counters"] = ex.cand_counters[a:b].tolist()
            out[(r["user_id"], r["ts"])] = row
    return out


def test_a_planted_future_event_never_reaches_an_earlier_example(shop: pa.Table) -> None:
    """Plant, right after one add-to-cart in the log, a view 1 s after it (FUTURE) and a view 1 s before
    it that arrived late (LATE: earlier event time, later offset). The add-to-cart's own example and every
    earlier one are unchanged; the user's next add-to-cart sees both."""
    cfg = BuildConfig(window_ms=WINDOW, eval_candidates=0)
    atcs = shop.filter(pc.equal(shop["action"], "add_to_cart")).to_pylist()
    target = atcs[len(atcs) // 3]
    later = [a for a in atcs if a["user_id"] == target["user_id"] and a["offset"] > target["offset"]]
    assert later, "the shop gives the target user a later add-to-cart"
    t_off = target["offset"]
    shifted = pc.if_else(pc.greater(shop["offset"], t_off), pc.add(shop["offset"], 2), shop["offset"])
    base = shop.set_column(0, "offset", shifted)
    plant = pa.table(
        {
            "offset": [t_off + 1, t_off + 2],
            "user_id": [target["user_id"]] * 2,
            "item_id": ["LATE", "FUTURE"],
            "action": ["view", "view"],
            "ts": [target["ts"] - 1000, target["ts"] + 1000],
            "event_id": [None, None],
            "session_id": [target["session_id"]] * 2,
            "surface": [None, None],
            "properties": [None, None],
            "category": ["c0", "c0"],
            "subcategory": ["s0", "s0"],
            "ingest_ts": [0, 0],
            "brand": [None, None],
            "price": [None, None],
            "price_band": [None, None],
        },
        schema=shop.schema,
    )
    planted = build(pa.concat_tables([base, plant]).sort_by("offset"), cfg, progress=False)
    clean = build(shop, cfg, progress=False)
    assert "LATE" in planted.vocab.items and "FUTURE" in planted.vocab.items  # both in the training period
    before, after = example_by_offset(clean), example_by_offset(planted)
    checked = 0
    for key, row in before.items():
        if key[1] <= target["ts"]:
            got = after[key]  # the target's own example and every earlier one: features unchanged
            assert (got["ts"], got["hist"], got["sess"]) == (row["ts"], row["hist"], row["sess"]), key
            cands = dict(zip(got["cand"], got["counters"], strict=True))
            for plant_id in ("LATE", "FUTURE"):  # may be a hard negative (a label), never a visible count
                assert cands.pop(plant_id, [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]
            assert cands == dict(zip(row["cand"], row["counters"], strict=True)), key
            checked += 1
    assert checked > 10
    nxt = after[(target["user_id"], later[0]["ts"])]
    seen = nxt["hist"] + nxt["sess"]
    assert "LATE" in seen and "FUTURE" in seen


def test_validation_sample_is_capped_without_leaking_into_training(shop: pa.Table, data: TrainingData) -> None:
    capped = build(
        shop, BuildConfig(window_ms=WINDOW, max_hard_negatives=50, eval_candidates=20, max_val_groups=5), progress=False
    )
    assert len(capped.val) == 5 and capped.val_requests.num_rows == 5
    assert set(capped.val_requests["offset"].to_pylist()) <= set(data.val_requests["offset"].to_pylist())
    assert capped.train_requests.equals(data.train_requests)  # the unsampled validation requests are dropped
    assert np.array_equal(capped.train.cand_counters, data.train.cand_counters)
