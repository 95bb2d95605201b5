"""The time split: train, validation and test periods, the requests they hold, and what fitting may see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class TimeSplit:
    """Events with ts < val_start train; [val_start, test_start) validate; ts >= test_start test."""

    val_start: int
    test_start: int

    @classmethod
    def of(cls, events: pa.Table, val_share: float = 0.15, test_share: float = 0.15) -> TimeSplit:
        """Boundaries at fixed shares of the event time span (whole hours, so periods are calendar-clean)."""
        if not (val_share > 0 and test_share > 0 and val_share + test_share < 1):
            raise ValueError("val_share and test_share must be positive and sum to less than 1")
        lo, hi = pc.min(events["ts"]).as_py(), pc.max(events["ts"]).as_py()
        hour = 3_600_000
        test_start = (hi - int((hi - lo) * test_share)) // hour * hour
        val_start = (test_start - int((hi - lo) * val_share)) // hour * hour
        return cls(val_start, test_start)

    def period(self, ts: np.ndarray) -> np.ndarray:
        """'train' / 'val' / 'test' for each timestamp."""
        return np.where(ts < self.val_start, "train", np.where(ts < self.test_start, "val", "test"))

    def fit_end(self, period: str) -> int:
        """Learned statistics used to rank `period`'s requests come from events strictly before this instant:
        validation requests see the training period only; test requests see training + validation."""
        return {"val": self.val_start, "test": self.test_start}[period]


def before(events: pa.Table, end_ts: int) -> pa.Table:
    """The events a model or statistic may be fitted on when it will rank requests at or after `end_ts`."""
    return events.filter(pc.less(events["ts"], end_ts))


def earlier_window(events: pa.Table, windows: int, val_share: float, test_share: float) -> pa.Table:
    """The events before the test period, `windows` times over: the same protocol on these puts its test
    period just before the previous one's (a backtest on a window the reported figures never tested on)."""
    for _ in range(windows):
        events = before(events, TimeSplit.of(events, val_share, test_share).test_start)
    return events


def requests(events: pa.Table, split: TimeSplit) -> pa.Table:
    """One request per add-to-cart in the validation and test periods: the state just before it.

    Columns: g (request number), user_id, item_id (the positive), category, subcategory, ts, offset (the
    log position the state is read at: the add-to-cart's own offset - 1), period, surface.
    """
    atc = events.filter(
        pc.and_(pc.equal(events["action"], "add_to_cart"), pc.greater_equal(events["ts"], split.val_start))
    )
    ts = atc["ts"].to_numpy()
    return pa.table(
        {
            "g": pa.array(np.arange(atc.num_rows), pa.int64()),
            "user_id": atc["user_id"],
            "item_id": atc["item_id"],
            "category": atc["category"],
            "subcategory": atc["subcategory"],
            "ts": atc["ts"],
            "offset": pc.subtract(atc["offset"], 1),
            "period": pa.array(split.period(ts), pa.string()),
            "surface": atc["surface"],
        }
    )
