"""The evaluation end to end on a tiny shop: all methods score the same test requests; the report renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import typer
from typer.testing import CliRunner

from insession.evaluate.baselines import baselines
from insession.evaluate.cli import _pretraining, evaluate, write_section
from insession.evaluate.ctr import CtrConfig
from insession.evaluate.data import Dataset
from insession.evaluate.neural import score_examples
from insession.evaluate.report import render
from insession.evaluate.runner import ENSEMBLE, HYBRID, EvalConfig, _examples_for, mean_scores, run
from insession.evaluate.sequential import SeqConfig
from insession.evaluate.split import before
from insession.train.build import BuildConfig, build
from insession.train.pretrain import PretrainConfig
from insession.train.replay import CandidateSets


def test_run_and_report(shop: Dataset, tmp_path: Path) -> None:
    cfg = EvalConfig(
        val_share=0.2,
        test_share=0.2,
        seeds=(0,),
        ablations=("reranker", "no_counters"),
        neural=("sasrec",),
        sequential=("sasrec", "gru4rec"),
        seq=SeqConfig(dim=8, max_len=10, max_epochs=2, patience=1),
        seq_grid=({"dropout": 0.2, "lr": 3e-3}, {"dropout": 0.5, "lr": 3e-3}),
        ctr=("din", "bst"),
        ctr_cfg=CtrConfig(dim=8, max_epochs=1),
        epochs=1,
        neural_epochs=1,
        grid=({"dim": 16, "lr": 2e-3, "dropout": 0.0}, {"dim": 8, "lr": 3e-3, "dropout": 0.1}),
        item2vec_epochs=0,
        pretraining=("pretrained", "pretrained_no_item2vec"),
        pretrain=PretrainConfig(epochs=1, max_windows=200, finetune_lr_scale=0.1, freeze_epochs=1),
        n_boot=30,
        threads=1,
        progress=False,
    )
    res = run(shop, cfg)
    assert [p for p, _ in res.reranker_grid] == list(cfg.grid)  # every setting tried on validation,
    assert res.reranker_setting == max(res.reranker_grid, key=lambda r: r[1])[0]  # the best one used
    names = {m.name for m in res.methods}
    assert (
        set(baselines({}))
        | {
            "sasrec_groups",
            "sasrec",
            "gru4rec",
            HYBRID,
            "din_ctr",
            "bst_ctr",
            "reranker",
            "no_counters",
            "pretrained",
            "pretrained_no_item2vec",
        }
        == names
    )
    # the sequential models: each grid setting tried on validation, the best one refitted for test
    assert [p for p, *_ in res.seq_grid["sasrec"]] == list(cfg.seq_grid)
    chosen = max(res.seq_grid["gru4rec"], key=lambda r: r[1])[0]
    gru = next(m for m in res.methods if m.name == "gru4rec")
    assert {k: gru.params[k] for k in chosen} == chosen and gru.kind == "sequential"
    assert res.hybrid_setting["model"] in ("sasrec", "gru4rec")
    n_test = res.n_requests["test"]
    assert len(res.known["proposed"]) == res.n_requests["test_proposed"] and len(res.known["forced"]) == n_test
    # a sequential model gives no credit for a positive it never saw: NDCG@10 is 0 on unknown positives
    unknown = ~res.known["forced"]
    assert not np.any(gru.forced.ndcg10[unknown])
    n_test = res.n_requests["test"]
    for m in res.methods:
        assert len(m.forced) == n_test and len(m.proposed) == res.n_requests["test_proposed"]
        point = m.forced.point()
        assert all(0.0 <= point[k] <= 1.0 for k in ("ndcg10", "hr10", "mrr", "auc"))
    assert 0.0 <= res.candidate_stage["recall"] <= 1.0
    # session recency puts the most recently viewed item first; on this shop the item carted was just viewed
    recency = next(m for m in res.methods if m.name == "session_recency")
    pop = next(m for m in res.methods if m.name == "popularity_28d")
    assert np.mean(recency.proposed.ndcg10) > np.mean(pop.proposed.ndcg10)
    assert set(res.segments) == {"repeat", "session_length", "history_length", "cold_item", "surface"}

    body = render(res, tmp_path / "img", "eval_tiny")
    assert "### Candidate stage" in body and "| reranker |" in body and "| no_counters |" in body
    assert "| dim 8, lr 0.003, dropout 0.1 |" in body  # the tuning grid, with each setting's validation score
    assert "### Sequential models" in body and "| gru4rec | dropout 0.5, lr 0.003 |" in body
    assert "### Positives the sequential models know, and the rest" in body and f"| {HYBRID} |" in body
    # the pre-training rows: pre-trained (a masked-item loss logged) and compared with the reranker without it
    pre = next(m for m in res.methods if m.name == "pretrained")
    assert pre.kind == "pretraining" and pre.params["pretrain_epochs"] == 1 and pre.params["pretrain_loss"] > 0
    assert pre.params["lr_scale"] == 0.1 and pre.params["freeze_epochs"] == 1  # how it was fine-tuned, reported
    assert "fine-tuned at lr x0.1 with 1 frozen epochs" in body and "at 0.1 x its learning rate and frozen" in body
    assert "### Pre-training on every interaction (issue 20)" in body and "| pretrained_no_item2vec |" in body
    # issue 17: each ablation's paired difference, and every metric, on each surface's requests
    surfaces = sorted(set(res.segments["surface"].tolist()))
    assert len(res.surfaces["proposed"]) == res.n_requests["test_proposed"] and len(res.surfaces["forced"]) == n_test
    for view in ("proposed", "forced"):  # every test add-to-cart's surface is judged in the forced view
        heading = f"### Ablations by surface: full reranker minus the ablated one (NDCG@10, paired, {view} view)"
        table = body.split(heading)[1].split("\n\n")[2]
        assert all(f"{v} (n={int((res.surfaces[view] == v).sum())})" in table for v in surfaces)
        assert "| no_counters | " in table
    by_surface = body.split("**every metric by surface**")[1].split("\n\n")[1]
    assert "| ndcg10 | hr10 | mrr | auc | gauc |" in by_surface
    assert all(f"| reranker | {v} |" in by_surface for v in surfaces)
    assert "**Reranker with pre-training vs the strongest other method, proposed view" in body
    assert (tmp_path / "img" / "eval_tiny_ndcg.png").stat().st_size > 0
    doc = tmp_path / "evaluation.md"
    doc.write_text("# Evaluation\n\nhand-written protocol\n")
    write_section(doc, "tiny", "first")
    write_section(doc, "other", "kept")
    write_section(doc, "tiny", "second")
    text = doc.read_text()
    assert "hand-written protocol" in text and "second" in text and "first" not in text and "kept" in text


def test_model_scores_line_up_with_the_candidate_lists(shop: Dataset, sets: CandidateSets) -> None:
    """A 'model' that scores each candidate by its vocabulary index: every list gets its own items back."""
    data = build(before(shop.events, sets_split_end(sets)), BuildConfig(val_fraction=0.2), progress=False)
    examples = _examples_for(sets, shop.items, data.vocab)
    rows = np.arange(len(sets.lists))[::-1].copy()  # any order of requests
    scores = score_examples(lambda batch: batch.candidates.double(), examples.subset(rows), data.vocab.config())
    facts = {r["item_id"]: (r["category"], r["subcategory"]) for r in shop.items.to_pylist()}
    for got, i in zip(scores, rows, strict=True):
        items = sets.lists[i]
        want = data.vocab.lookup(
            pa.array(items, pa.string()),
            pa.array([facts[x][0] for x in items], pa.string()),
            pa.array([facts[x][1] for x in items], pa.string()),
        )
        assert got.tolist() == want.tolist()
        assert examples.cand_labels[examples.cand_offsets[i] + sets.positive[i]] == 1.0


def sets_split_end(sets: CandidateSets) -> int:
    return int(pc.min(sets.requests["ts"]).as_py())


def test_ensemble_averages_each_candidates_score_over_seeds() -> None:
    a = [np.array([1.0, 3.0]), np.array([0.0, 2.0, 4.0])]
    b = [np.array([3.0, -1.0]), np.array([2.0, 2.0, 0.0])]
    got = mean_scores([a, b])
    assert [g.tolist() for g in got] == [[2.0, 1.0], [1.0, 2.0, 2.0]]


def test_only_pretraining_picks_the_named_variants() -> None:
    """`--only-pretraining` keeps the named variants (in their table order), '' keeps all, `--no-pretraining`
    none; an unknown name is refused."""
    assert _pretraining(True, "no_item2vec,pretrained") == ("pretrained", "no_item2vec")
    assert _pretraining(True, "") == ("pretrained", "pretrained_no_item2vec", "no_item2vec")
    assert _pretraining(False, "pretrained") == ()
    with pytest.raises(typer.BadParameter, match="unknown variant"):
        _pretraining(True, "pretrained,frozen")


def test_two_seeds_report_the_ensemble(shop: Dataset, tmp_path: Path) -> None:
    cfg = EvalConfig(
        val_share=0.2,
        test_share=0.2,
        seeds=(0, 1),
        ablations=("reranker",),
        neural=(),
        sequential=(),
        pretraining=(),
        ctr=(),
        epochs=1,
        grid=({"dim": 8, "lr": 2e-3, "dropout": 0.0},),
        item2vec_epochs=0,
        n_boot=30,
        threads=1,
        progress=False,
    )
    res = run(shop, cfg)
    ens = [m for m in res.methods if m.name == ENSEMBLE]
    assert len(ens) == 1 and ens[0].kind == "ensemble" and ens[0].params == {"seeds": 2}
    assert len(ens[0].proposed) == res.n_requests["test_proposed"]
    body = render(res, tmp_path / "img", "eval_tiny")
    assert "**Reranker ensemble (seeds' scores averaged) vs the strongest other method, proposed view" in body


def test_cli_backtest_writes_its_own_section(tmp_path: Path) -> None:
    """`insession evaluate synthetic --backtest 1` evaluates the window before the latest test period and
    writes it beside (not over) the dataset's own section, with the command that reproduces it."""
    app = typer.Typer()
    app.command()(evaluate)
    doc = tmp_path / "evaluation.md"
    write_section(doc, "synthetic", "the latest window")
    small = ["--users", "40", "--items", "120", "--days", "8", "--seeds", "1", "--epochs", "1", "--no-tune"]
    fast = [
        "--no-ablations",
        "--no-neural",
        "--sequential",
        "",
        "--ctr",
        "",
        "--no-pretraining",
        "--boot",
        "50",
        "--out",
        str(doc),
    ]
    result = CliRunner().invoke(app, ["synthetic", *small, *fast, "--backtest", "1"])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "the latest window" in text and "<!-- evaluate:synthetic_backtest1:begin -->" in text
    section = text.split("<!-- evaluate:synthetic_backtest1:begin -->")[1]
    assert "--backtest 1" in section and "## synthetic_u40_i120_d8_s7, backtest 1" in section


def test_sequential_without_refit_ranks_test_with_the_validation_fit(shop: Dataset) -> None:
    """--no-seq-refit: the fit before the validation period scores the test requests too (no second fit), so
    the known positives are those of that fit's vocabulary; the hybrid follows the seeds that were fitted."""
    cfg = EvalConfig(
        val_share=0.2,
        test_share=0.2,
        seeds=(0, 1),
        ablations=(),
        neural=(),
        sequential=("sasrec",),
        seq=SeqConfig(dim=8, max_len=10, max_epochs=1, patience=1),
        seq_grid=({"dropout": 0.2, "lr": 3e-3},),
        seq_seeds=1,
        seq_refit=False,
        pretraining=(),
        ctr=(),
        grid=({"dim": 8, "lr": 2e-3, "dropout": 0.0},),
        item2vec_epochs=0,
        n_boot=30,
        threads=1,
        progress=False,
    )
    res = run(shop, cfg)
    sasrec = [m for m in res.methods if m.name == "sasrec"]
    hybrid = [m for m in res.methods if m.name == HYBRID]
    assert len(sasrec) == 1 and len(hybrid) == 1 and sasrec[0].params["best_epoch"] == res.seq_grid["sasrec"][0][2]
    assert not np.any(sasrec[0].forced.ndcg10[~res.known["forced"]])


def test_the_rate_control_is_the_reranker_but_for_the_rate_of_what_pretraining_fits(
    shop: Dataset, sets: CandidateSets
) -> None:
    """`finetune_rate_only` (issue 20's control): no pre-training, the item table and encoders at the
    fine-tuning's rate multiplier. At x1 it is the reranker's training weight for weight (the same steps as
    `train_model`); at x0.1 those parts end elsewhere. Only trained when named."""
    import torch

    from insession.evaluate.runner import _fit_reranker
    from insession.train.pretrain import pretrained_parameters

    data = build(before(shop.events, sets_split_end(sets)), BuildConfig(val_fraction=0.2), progress=False)
    setting = {"dim": 16, "lr": 3e-3, "dropout": 0.0}

    def fitted(scale: float, rate_only: bool) -> torch.nn.Module:
        cfg = EvalConfig(
            epochs=1, threads=1, progress=False, pretrain=PretrainConfig(epochs=1, finetune_lr_scale=scale)
        )
        return _fit_reranker(data, cfg, 0, setting, {}, {}, item2vec=True, rate_only=rate_only).model

    plain, same, slow = fitted(1.0, False), fitted(1.0, True), fitted(0.1, True)
    for a, b in zip(plain.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    moved = zip(pretrained_parameters(plain), pretrained_parameters(slow), strict=True)
    assert not all(torch.equal(a, b) for a, b in moved)
    assert _pretraining(True, "finetune_rate_only") == ("finetune_rate_only",)
    assert "finetune_rate_only" not in _pretraining(True, "")
