"""The time split and what fitting may see: nothing from the test period reaches a fitted statistic."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from insession.evaluate.baselines import SessionKNN
from insession.evaluate.data import Dataset
from insession.evaluate.split import TimeSplit, before, earlier_window, requests
from insession.schema import EVENT_ARROW_SCHEMA
from insession.train.build import BuildConfig, build
from insession.train.replay import build_candidates


def test_periods_are_ordered_and_requests_are_later_add_to_carts(shop: Dataset, split: TimeSplit) -> None:
    ts = shop.events["ts"].to_numpy()
    assert ts.min() < split.val_start < split.test_start <= ts.max()
    req = requests(shop.events, split)
    assert req.num_rows > 0
    assert set(req["period"].to_pylist()) == {"val", "test"}
    period = np.array(req["period"].to_pylist())
    assert (req["ts"].to_numpy()[period == "val"] < split.test_start).all()
    assert (req["ts"].to_numpy()[period == "test"] >= split.test_start).all()
    assert pc.all(pc.greater_equal(req["ts"], split.val_start)).as_py()
    with pytest.raises(ValueError):
        TimeSplit.of(shop.events, 0.6, 0.5)


def test_backtest_window_ends_where_the_latest_test_period_starts(shop: Dataset) -> None:
    split = TimeSplit.of(shop.events, 0.15, 0.15)
    assert earlier_window(shop.events, 0, 0.15, 0.15) is shop.events
    one = earlier_window(shop.events, 1, 0.15, 0.15)
    assert one.num_rows == before(shop.events, split.test_start).num_rows < shop.events.num_rows
    earlier = TimeSplit.of(one, 0.15, 0.15)
    assert earlier.test_start < split.test_start and earlier.val_start < split.val_start
    assert earlier_window(shop.events, 2, 0.15, 0.15).num_rows == before(one, earlier.test_start).num_rows


def _plant(events: pa.Table, rows: list[dict]) -> pa.Table:
    """Append events (offsets after the last) and re-sort by offset."""
    start = events["offset"].to_numpy().max() + 1
    full = [
        {**{n: None for n in EVENT_ARROW_SCHEMA.names}, "offset": start + i, "ingest_ts": r["ts"], **r}
        for i, r in enumerate(rows)
    ]
    return pa.concat_tables([events, pa.Table.from_pylist(full, schema=EVENT_ARROW_SCHEMA)])


def test_test_period_events_never_reach_fitted_statistics(shop: Dataset, split: TimeSplit) -> None:
    last = shop.events["ts"].to_numpy().max()
    planted = _plant(
        shop.events,
        [
            {
                "user_id": "spy",
                "item_id": "future_item",
                "action": a,
                "ts": last + k,
                "session_id": "spy-s",
                "category": "c",
                "subcategory": "s",
            }
            for k, a in enumerate(("view", "add_to_cart", "view", "add_to_cart"), start=1)
        ],
    )
    fit = before(planted, split.fit_end("test"))
    assert pc.max(fit["ts"]).as_py() < split.test_start
    assert "future_item" not in set(fit["item_id"].to_pylist())
    knn = SessionKNN(fit)
    assert "future_item" not in knn.by_item
    assert knn.scores(["future_item"], ["future_item"], k=10)[0] == 0.0
    data = build(fit, BuildConfig(val_fraction=0.2), progress=False)
    assert "future_item" not in data.vocab.items
    assert data.train.request_ts.max() < split.test_start and data.val.request_ts.max() < split.test_start


def test_request_state_ignores_everything_after_the_request(shop: Dataset, split: TimeSplit) -> None:
    req = requests(shop.events, split).slice(0, 5)
    base = build_candidates(shop.events, shop.items, req, progress=False)
    item = base.lists[0][0]
    future = [
        {
            "user_id": u,
            "item_id": item,
            "action": "add_to_cart",
            "ts": t,
            "session_id": "x",
            "category": None,
            "subcategory": None,
        }
        for u in req["user_id"].to_pylist()
        for t in [shop.events["ts"].to_numpy().max() + 1]
    ]
    planted = build_candidates(_plant(shop.events, future), shop.items, req, progress=False)
    assert planted.lists == base.lists
    assert planted.counters.to_pylist() == base.counters.to_pylist()
    assert planted.state.to_pylist() == base.state.to_pylist()
