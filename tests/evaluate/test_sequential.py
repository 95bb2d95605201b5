"""Sequential recommenders trained on every interaction (issue 20): data, objective, scoring, hybrid."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from insession.evaluate.sequential import (
    UNKNOWN,
    Interactions,
    SeqConfig,
    SeqFit,
    build_model,
    catalogue_ndcg10,
    fit_sequential,
    hybrid_scores,
    request_sequence,
    score_lists,
)
from insession.model.sequential import GRU4Rec, SASRec

H = 3_600_000


def _events(rows: list[tuple[str, str, int]]) -> pa.Table:
    users, items, ts = zip(*rows, strict=True)
    return pa.table(
        {
            "offset": pa.array(range(len(rows)), pa.int64()),
            "user_id": list(users),
            "item_id": list(items),
            "ts": pa.array(ts, pa.int64()),
        }
    )


def _cycle_events(users: int = 12, length: int = 24) -> pa.Table:
    """Every shopper walks the same cycle a -> b -> c -> d -> e -> a ... from a different start, one an hour."""
    cycle = "abcde"
    rows = [(f"u{u}", cycle[(u + t) % 5], t * H) for u in range(users) for t in range(length)]
    rows.sort(key=lambda r: (r[2], r[0]))
    return _events(rows)


def test_interactions_are_point_in_time_and_every_interaction_is_a_target_once() -> None:
    ev = _events([("u1", "a", 0), ("u1", "b", H), ("u2", "c", 2 * H), ("u1", "c", 3 * H), ("u1", "z", 10 * H)])
    data = Interactions.of(ev, end_ts=10 * H, holdout=0.25)  # z at the end instant is in the future
    assert "z" not in data.vocab and data.tail_start == 10 * H - int(10 * H * 0.25) // 1
    x, y = data.windows(max_len=2)
    targets = sorted(data_item for row in y for data_item in row.tolist() if data_item)
    # u1: a b c (c at 3h is before the tail 7.5h): targets b, c; u2 has one event: no target
    assert targets == sorted([data.vocab["b"], data.vocab["c"]])
    assert (x[y > 0] > 0).all()  # every target has its predecessor as input
    late = Interactions.of(ev, end_ts=11 * H, holdout=0.0)
    assert "z" in late.vocab


def test_windows_cover_long_sequences_with_context() -> None:
    ev = _events([("u", f"i{t}", t) for t in range(12)])
    data = Interactions.of(ev, end_ts=100, holdout=0.0)
    x, y = data.windows(max_len=5)
    assert (y > 0).sum() == 11 and len(set(y[y > 0].tolist())) == 11
    assert x.shape == (3, 5) and y.shape == (3, 5)


def test_padding_does_not_change_the_newest_state() -> None:
    torch.manual_seed(0)
    for model in (SASRec(9, 16, 2, 1, 8, 0.0), GRU4Rec(9, 16, 1, 8, 0.0)):
        model.eval()
        short = torch.tensor([[0, 3, 4, 5]])
        long = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
        a, b = model(short)[0, -1], model(long)[0, -1]
        assert torch.allclose(a, b, atol=1e-5), type(model).__name__
        assert model(short)[0, 0].abs().sum() == 0  # padded positions are zero


def test_next_item_objective_learns_a_certain_successor() -> None:
    """On a deterministic cycle the next item is certain: both models must learn to put it first."""
    data = Interactions.of(_cycle_events(), end_ts=24 * H, holdout=0.2)
    hx, hy = data.held_out(8, 500)
    for kind in ("sasrec", "gru4rec"):
        cfg = SeqConfig(dim=16, max_len=8, lr=1e-2, dropout=0.0, batch_size=8, max_epochs=4, patience=4)
        torch.manual_seed(0)
        assert catalogue_ndcg10(build_model(kind, len(data.vocab), cfg), hx, hy) < 0.9  # untrained: it must learn
        fit = fit_sequential(kind, data, cfg, seed=0, progress=False)
        assert catalogue_ndcg10(fit.model, hx, hy) > 0.99, kind


class _Sets:
    """The few CandidateSets fields score_lists reads."""

    def __init__(self, history: list, session: list, lists: list[list[str]]) -> None:
        self.state = pa.table({"history_seq": history, "session_seq": session})
        self.lists = lists


def test_scores_use_the_served_sequence_and_give_unknown_items_nothing() -> None:
    data = Interactions.of(_cycle_events(), end_ts=24 * H, holdout=0.2)
    fit = fit_sequential(
        "sasrec",
        data,
        SeqConfig(dim=16, max_len=8, lr=1e-2, dropout=0.0, batch_size=8, max_epochs=4, patience=4),
        seed=0,
        progress=False,
    )
    hist = [[{"item_id": "a"}, {"item_id": "b"}]]
    sess = [[{"item_id": "c"}]]
    assert request_sequence(hist[0], sess[0]) == ["a", "b", "c"]
    sets = _Sets(hist, sess, [["e", "d", "never-seen", "a"]])
    (s,) = score_lists(fit, sets, np.array([0]))  # type: ignore[arg-type]
    assert s[2] == UNKNOWN and np.argmax(s) == 1  # after a, b, c comes d
    assert isinstance(fit, SeqFit) and fit.best_epoch >= 1


def test_hybrid_ranks_known_items_by_the_model_and_unknown_ones_by_recency() -> None:
    model = [np.array([2.0, 0.0, UNKNOWN, UNKNOWN])]
    recency = [np.array([0.0, 0.9, 0.8, 0.1])]
    pop = [np.zeros(4)]
    (s,) = hybrid_scores(model, recency, pop, {"weight": 1.0, "recency_on_known": 0, "tie": 0.0})
    assert s[0] > s[1] and s[2] > s[3] and s[2] == 0.8  # the model's share among known items; recency for the rest
    assert abs(s[0] + s[1] - 1.0) < 1e-9
    (t,) = hybrid_scores(model, recency, pop, {"weight": 1.0, "recency_on_known": 1, "tie": 0.0})
    assert t[1] == s[1] + 0.9
