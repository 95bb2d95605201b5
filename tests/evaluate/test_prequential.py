"""The prequential replay (`insession.evaluate.prequential`) on a tiny realistic shop: the windows partition
the test period, the three arms score the same requests with the same candidate lists, the frozen arm's
model is never updated while the continuous one is, and the report and plot are written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from insession.evaluate.prequential import (
    ARMS,
    DAY_MS,
    HOUR_MS,
    PrequentialConfig,
    PrequentialResult,
    make_windows,
    mark_shifts,
    plot,
    pooled_difference,
    pooled_report,
    report,
    run,
    versus_difference,
    window_index,
)
from insession.model.artefact import versions
from insession.train.follow import FollowConfig

TINY = PrequentialConfig(
    users=40,
    items=1500,
    days=4,
    seed=3,
    test_days=2,
    window_hours=12,
    epochs=1,
    dim=16,
    item2vec_epochs=1,
    update=FollowConfig(epochs=1, batch_size=32, min_new=2),
    n_boot=50,
    threads=1,
)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrequentialResult, Path]:
    work = tmp_path_factory.mktemp("prequential")
    return run(TINY, workdir=work, say=lambda _: None), work


def test_windows_partition_the_test_period() -> None:
    end = 1_788_220_800_000 + 4 * DAY_MS
    ws = make_windows(end, 2, 12)
    assert len(ws) == 4 and ws[0].start == end - 2 * DAY_MS and ws[-1].end == end
    assert all(a.end == b.start for a, b in zip(ws, ws[1:], strict=False))
    assert [w.day for w in ws] == [0, 0, 1, 1]
    ts = np.array([ws[0].start - 1, ws[0].start, ws[1].start - 1, ws[1].start, end - 1, end])
    assert window_index(ts, ws).tolist() == [-1, 0, 0, 1, 3, -1]
    with pytest.raises(ValueError):
        make_windows(end, 2, 7)  # 7 h windows would straddle days
    trends = pa.table(
        {
            "kind": ["subcategory", "item"],
            "id": ["milk_01", "i1"],
            "start_ms": [ws[2].start + HOUR_MS, ws[0].start],
            "peak_ms": [ws[2].start + 23 * HOUR_MS, ws[0].start + DAY_MS],
            "boost": [3.0, 40.0],
        }
    )
    marked = mark_shifts(ws, trends)  # item trends mark no window
    # started after day 2's cut, before window 4 starts: the update at window 4 saw it, day 2's model did not
    assert [w.shifts for w in marked] == [(), (), (), ("milk_01",)]
    assert [bool(w.rising) for w in marked] == [False, False, True, True]  # its rise overlaps windows 3 and 4


def test_the_arms_score_the_same_requests_and_the_frozen_model_is_never_updated(
    replay: tuple[PrequentialResult, Path],
) -> None:
    res, work = replay
    n = res.requests.num_rows
    assert n > 0
    # every test add-to-cart lies in exactly one window, inside it
    ts = res.requests["ts"].to_numpy()
    starts = np.array([w.start for w in res.windows])[res.window]
    ends = np.array([w.end for w in res.windows])[res.window]
    assert ((ts >= starts) & (ts < ends)).all()
    assert ts.min() >= res.windows[0].start and ts.max() < res.windows[-1].end
    # the three arms scored the same requests, window by window, on the same candidate lists
    for arm in ARMS:
        assert res.scored[arm].tolist() == res.scored["frozen"].tolist()
        assert sorted(res.scored[arm].tolist()) == list(range(n))
        assert len(res.scores[arm]) == n
        assert res.scores[arm].n_candidates.tolist() == res.scores["frozen"].n_candidates.tolist()
        assert len(res.served[arm]) == len(res.windows)
    # frozen: one version for every window, its directory byte-identical before and after
    assert len(set(res.served["frozen"])) == 1
    assert res.frozen_versions[0] == res.frozen_versions[1] == [res.served["frozen"][0]]
    assert res.frozen_files[0] == res.frozen_files[1]
    assert [v.name for v in versions(work / "frozen")] == res.frozen_versions[0]
    # daily: the frozen model on day 1, a model retrained from scratch on day 2
    assert res.served["daily"][:2] == res.served["frozen"][:2]
    assert res.served["daily"][2] == res.served["daily"][3] != res.served["frozen"][0]
    # continuous: one update per window from the frozen copy; its first window already had new data
    assert len(res.updates) == len(res.windows)
    assert res.updates[0]["base"] == res.served["frozen"][0]
    assert any(u["outcome"] != "skipped" for u in res.updates)
    promoted = [u["candidate"] for u in res.updates if u["outcome"] == "promoted"]
    assert set(promoted) <= set(res.served["continuous"])
    # day 1: frozen and daily are the same model, so they score alike
    day1 = res.window < 2
    assert np.allclose(res.scores["frozen"].ndcg10[day1], res.scores["daily"].ndcg10[day1])


def test_report_and_plot(replay: tuple[PrequentialResult, Path], tmp_path: Path) -> None:
    res, _ = replay
    text = report(res, "insession prequential --users 40", "img/prequential.png")
    assert text.count("\n| ") >= len(res.windows) + 7
    assert "continuous - daily" in text and "unchanged" in text
    plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # two runs pooled: the requests of both, the same mean difference as each
    n, pooled = pooled_difference([res, res], "continuous", "daily", lambda r: np.ones(len(r.window), bool), 50)
    assert n == 2 * res.requests.num_rows
    assert pooled.value == pytest.approx(res.difference("continuous", "daily").value)
    assert "windows after a trend shift" in pooled_report([res, res], 50)


def test_the_command_is_registered_pools_saved_runs_and_refuses_bad_windows(
    replay: tuple[PrequentialResult, Path], tmp_path: Path
) -> None:
    import pickle

    from typer.testing import CliRunner

    from insession.cli import app

    res, _ = replay
    (tmp_path / "result.pkl").write_bytes(pickle.dumps(res))
    out = CliRunner().invoke(app, ["prequential", "--pool", str(tmp_path), "--n-boot", "50"])
    assert out.exit_code == 0, out.output
    assert "windows after a trend shift" in out.output and res.dataset in out.output
    both = ["prequential", "--pool", str(tmp_path), "--versus", str(tmp_path), "--n-boot", "50"]
    versus = CliRunner().invoke(app, both)
    assert versus.exit_code == 0 and "| all test add-to-carts | " in versus.output.split("minus continuous")[1]
    unpaired = CliRunner().invoke(app, [*both, "--versus", str(tmp_path)])
    assert unpaired.exit_code == 2 and "one --versus run per --pool run" in unpaired.output
    bad = CliRunner().invoke(app, ["prequential", "--window-hours", "7"])
    assert bad.exit_code == 2 and "window_hours" in bad.output


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("train_seed", "expected"), [(None, TINY.seed), (11, 11)])
def test_the_training_seed_reaches_every_training_and_defaults_to_the_shop_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, train_seed: int | None, expected: int
) -> None:
    """The full trainings (model and build) and the continuous updates all train with `train_seed`; the
    shop stays the one of `seed` (same name, same requests)."""
    import insession.evaluate.prequential as preq

    seen: dict[str, int] = {}
    real_train = preq.train_on_events

    def train(events: pa.Table, out: Path, **kw: object) -> object:
        seen["fit"], seen["build"] = kw["train_config"].seed, kw["build_config"].seed  # type: ignore[attr-defined]
        return real_train(events, out, **kw)  # type: ignore[arg-type]

    def update(events: pa.Table, models: Path, cfg: FollowConfig) -> object:
        seen["update"] = cfg.seed
        raise _Stop

    monkeypatch.setattr(preq, "train_on_events", train)
    monkeypatch.setattr(preq, "update_once", update)
    cfg = PrequentialConfig(**{**TINY.__dict__, "train_seed": train_seed})
    with pytest.raises(_Stop):
        run(cfg, workdir=tmp_path, say=lambda _: None)
    assert seen == {"fit": expected, "build": expected, "update": expected}


def test_training_seeds_of_one_shop_pool_as_one_shop(replay: tuple[PrequentialResult, Path]) -> None:
    """Two runs of the same shop (training seeds) share their sessions: pooled, they resample together, so
    two identical runs give exactly the one run's interval, not a narrower one."""
    from dataclasses import replace

    res, _ = replay
    rng = np.random.default_rng(0)  # scores that differ by request, so the interval has a width
    res = replace(res, scores={a: replace(p, ndcg10=rng.random(len(p))) for a, p in res.scores.items()})
    everything = lambda r: np.ones(len(r.window), bool)  # noqa: E731
    _, one = pooled_difference([res], "continuous", "frozen", everything, 200)
    _, two = pooled_difference([res, res], "continuous", "frozen", everything, 200)
    assert one.high > one.low
    assert (two.value, two.low, two.high) == pytest.approx((one.value, one.low, one.high))


def test_the_command_passes_the_training_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import insession.evaluate.prequential as preq
    from insession.cli import app

    got: list[PrequentialConfig] = []

    def fake_run(cfg: PrequentialConfig, **_: object) -> None:
        got.append(cfg)
        raise _Stop

    monkeypatch.setattr(preq, "run", fake_run)
    CliRunner().invoke(app, ["prequential", "--seed", "2", "--train-seed", "5"])
    CliRunner().invoke(app, ["prequential", "--seed", "2"])
    assert [(c.seed, c.training_seed) for c in got] == [(2, 5), (2, 2)]


def test_versus_pairs_the_continuous_arms_of_the_same_shop_and_training_seed(
    replay: tuple[PrequentialResult, Path],
) -> None:
    """Another update setting's run of the same shop and training seed: the continuous arms' paired
    difference; a run of another training seed (or shop) is refused."""
    from dataclasses import replace

    res, _ = replay
    better = replace(res, scores={**res.scores, "continuous": replace(res.scores["continuous"])})
    better.scores["continuous"].ndcg10 = res.scores["continuous"].ndcg10 + 0.25
    everything = lambda r: np.ones(len(r.window), bool)  # noqa: E731
    n, e = versus_difference([better, res], [res, res], everything, 50)
    assert n == 2 * res.requests.num_rows and e.value == pytest.approx(0.125)
    other_seed = replace(res, config=replace(res.config, train_seed=res.config.seed + 1))
    with pytest.raises(ValueError, match="training seed"):
        versus_difference([res], [other_seed], everything, 50)
