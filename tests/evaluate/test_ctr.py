"""DIN / BST as CTR models (issue 20): impressions built from the views, point-in-time, and list scoring."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from insession.evaluate.ctr import CtrConfig, Impressions, fit_ctr, score_ctr

H = 3_600_000


def _events() -> pa.Table:
    rows = []
    for u in range(6):
        for t in range(10):
            item = f"{'ab'[u % 2]}{t % 5}"  # even shoppers browse category a, odd ones category b
            rows.append((f"u{u}", item, "view" if t % 3 else "add_to_cart", t * H + u, item[0]))
    rows.append(("u0", "future", "view", 20 * H, "a"))
    rows.sort(key=lambda r: r[3])
    users, items, actions, ts, cats = zip(*rows, strict=True)
    return pa.table(
        {
            "offset": pa.array(range(len(rows)), pa.int64()),
            "user_id": list(users),
            "item_id": list(items),
            "action": list(actions),
            "ts": pa.array(ts, pa.int64()),
            "category": list(cats),
        }
    )


def test_impressions_from_views() -> None:
    cfg = CtrConfig(negatives=3, holdout=0.2)
    imp = Impressions.of(_events(), 10 * H, 5, cfg, seed=0)
    assert "future" not in imp.items  # the event at the end instant is not before it
    k = cfg.negatives + 1
    assert len(imp.target) % k == 0 and (imp.label.reshape(-1, k) == [1, 0, 0, 0]).all()
    pos = imp.target.reshape(-1, k)
    assert (pos[:, 1:] != pos[:, :1]).mean() > 0.9  # negatives are other items (a clash is redrawn once)
    assert (imp.seq.reshape(-1, k, 5) == imp.seq.reshape(-1, k, 5)[:, :1]).all()  # one behaviour sequence each
    assert imp.held.any() and (~imp.held).any()
    # views only: 6 shoppers x 10 events, 1 in 3 an add-to-cart, a shopper's first event has no behaviour
    assert len(pos) == sum(1 for u in range(6) for t in range(1, 10) if t % 3)


def test_ctr_models_score_every_candidate() -> None:
    imp = Impressions.of(_events(), 10 * H, 5, CtrConfig(negatives=2, holdout=0.2), seed=0)

    class _Sets:
        state = pa.table({"history_seq": [[{"item_id": "a1"}]], "session_seq": [[{"item_id": "a2"}]]})
        lists = [["a3", "b1", "unseen"]]

    for kind in ("din", "bst"):
        fit = fit_ctr(kind, imp, CtrConfig(dim=8, max_epochs=2), seed=0, progress=False)
        (s,) = score_ctr(fit, _Sets(), np.array([0]), {"a3": "a", "b1": "b", "unseen": "a"})  # type: ignore[arg-type]
        assert s.shape == (3,) and np.isfinite(s).all() and fit.best_epoch >= 1
