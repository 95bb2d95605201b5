"""The evaluation run: split, candidate sets, every method tuned on validation, scored on test; segments."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from insession.evaluate.baselines import Params, Scorer, SessionKNN, Signals, baselines, signals
from insession.evaluate.ctr import MAX_LEN, CtrConfig, Impressions, fit_ctr, score_ctr
from insession.evaluate.data import Dataset
from insession.evaluate.metrics import PerRequest, score_requests, truncated_rank_metrics
from insession.evaluate.neural import MODELS, fit_neural, score_examples
from insession.evaluate.sequential import (
    HYBRID_GRID,
    SEQ_GRID,
    Interactions,
    SeqConfig,
    SeqFit,
    fit_sequential,
    hybrid_scores,
    known_mask,
    score_lists,
)
from insession.evaluate.split import TimeSplit, before, requests
from insession.model.reranker import DualSequenceReranker
from insession.model.vocab import Vocab
from insession.train.build import BuildConfig, TrainingData, assemble_examples, build, counter_matrix
from insession.train.examples import Examples
from insession.train.pipeline import pretrain_vectors, train_model
from insession.train.pretrain import PretrainConfig, pretrained_parameters
from insession.train.replay import CandidateSets, build_candidates, stage_proposer
from insession.train.trainer import TrainConfig, TrainResult, fit, seed_everything, set_threads

if TYPE_CHECKING:
    import torch

# The reranker's ablations (issue 6): RerankerConfig overrides, each replacing one component.
ABLATIONS: dict[str, dict[str, object]] = {
    "reranker": {},
    "shared_encoder": {"shared_encoder": True},
    "mean_pooling": {"target_pooling": False},
    "fixed_gate_0.5": {"learned_gate": False},
    "no_counters": {"use_counters": False},
    "bce_only": {"loss": "bce"},
    "position_not_dhours": {"use_time": False},
    "zero_cold_start": {"cold_start": False},
    # issue 17: the request's surface (embedding + per-surface adapter), the adapter alone, the query's words
    # matched against the candidate's category and subcategory (a signal of the head), and the query tokens
    # in the session sequence (off by default: `RerankerConfig.use_queries`)
    "no_surface": {"use_surface": False},
    "no_surface_adapter": {"surface_adapter": False},
    "no_query_match": {"use_query_match": False},
    "query_tokens": {"use_queries": True},
}


# Pre-training (issue 20): the reranker with its sequence side pre-trained on every training-period
# interaction (`insession.train.pretrain`: masked or next items, `PretrainConfig.objective`) and/or without
# item2vec's initial item vectors:
# name -> (pre-training on, item2vec on, the item table and encoders fine-tuned at `PretrainConfig`'s
# `finetune_lr_scale` and `freeze_epochs`). The "reranker" row is (off, on, off). Kind "pretraining":
# compared with the "reranker" row in their own table, and the first one also against the strongest other
# method. "finetune_rate_only" is the control of the fine-tuning settings: no pre-training, but the parts
# pre-training would fit at its rate and frozen epochs, so a pre-trained row's gain or loss can be split
# into the rate's and the pre-training's. Only trained when named (`--only-pretraining`): at the default
# x1 and 0 frozen epochs it is the reranker itself.
PRETRAIN_VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "pretrained": (True, True, True),
    "pretrained_no_item2vec": (True, False, True),
    "no_item2vec": (False, False, False),
    "finetune_rate_only": (False, True, True),
}
DEFAULT_PRETRAINING: tuple[str, ...] = ("pretrained", "pretrained_no_item2vec", "no_item2vec")
PRETRAINED = "pretrained"

GROUPS_SUFFIX = "_groups"  # the neural baselines trained on the reranker's add-to-cart groups (issue 5's)
HYBRID = "seq_hybrid"  # the best sequential model for items it knows, shopper recency for the rest

ENSEMBLE = "reranker_ensemble"  # the full reranker of every seed, scores averaged (one more method)

# The reranker's settings tried on validation (as the baselines' grids are): width, learning rate, dropout.
RERANKER_GRID: tuple[dict[str, float], ...] = tuple(
    {"dim": d, "lr": lr, "dropout": p} for d in (64, 128) for lr in (1e-3, 3e-3) for p in (0.1, 0.3)
)


@dataclass
class EvalConfig:
    val_share: float = 0.15
    test_share: float = 0.15
    seeds: tuple[int, ...] = (0, 1, 2)
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    neural: tuple[str, ...] = tuple(MODELS)
    epochs: int = 8  # reranker epochs (early stopping on its validation may end sooner)
    batch_size: int = 32  # groups per reranker batch: with served lists there are few groups, so more steps
    neural_epochs: int = 3
    # sequential recommenders trained on every interaction (issue 20), their grid tuned on validation, and
    # the hybrid of the best of them with shopper recency
    sequential: tuple[str, ...] = ("sasrec", "gru4rec")
    seq: SeqConfig = field(default_factory=SeqConfig)
    seq_grid: tuple[dict[str, float], ...] = SEQ_GRID
    seq_seeds: int = 0  # seeds of the sequential models' test fits: the first n of `seeds` (0 = all)
    # refit the chosen setting on events before the test period (True), or let the fit before the validation
    # period also rank the test requests, as the reranker's single fit does (False: half the cost)
    seq_refit: bool = True
    hybrid: bool = True
    # DIN / BST as CTR models on impressions built from the views (issue 20; `insession.evaluate.ctr`)
    ctr: tuple[str, ...] = ("din", "bst")
    ctr_cfg: CtrConfig = field(default_factory=CtrConfig)
    ctr_seeds: int = 0  # the first n of `seeds` (0 = all)
    # reranker settings: the one with the best validation NDCG@10 (first seed) is used for every seed and
    # ablation; a single setting skips the tuning
    grid: tuple[dict[str, float], ...] = RERANKER_GRID
    item2vec_epochs: int = 1
    # the pre-training variants trained (each with every seed, at the chosen setting) and their settings
    pretraining: tuple[str, ...] = DEFAULT_PRETRAINING
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(epochs=5))
    n_boot: int = 1000
    threads: int = 0  # torch intra-op threads, 0 = torch's default (see TrainConfig.threads)
    progress: bool = True


@dataclass
class MethodResult:
    name: str
    kind: str  # baseline / neural / reranker
    params: dict
    proposed: PerRequest  # test requests whose positive the stage proposed
    forced: PerRequest  # every test request, the positive forced into the list
    seed: int | None = None


@dataclass
class Results:
    dataset: str
    config: EvalConfig
    split: TimeSplit
    n_events: int
    n_requests: dict[str, int]
    candidate_stage: dict[str, float]  # recall, HR@20, MRR@20 (test), mean proposals, misses in history
    reranker_grid: list[tuple[dict[str, float], float]] = field(default_factory=list)  # setting, val NDCG@10
    reranker_setting: dict[str, float] = field(default_factory=dict)  # the chosen one
    methods: list[MethodResult] = field(default_factory=list)
    segments: dict[str, np.ndarray] = field(default_factory=dict)  # segment name -> label per test request
    # per sequential model: (setting, validation NDCG@10 of the proposed requests, best epoch, held-out NDCG@10)
    seq_grid: dict[str, list[tuple[dict[str, float], float, int, float]]] = field(default_factory=dict)
    hybrid_setting: dict[str, object] = field(default_factory=dict)
    # per view ("proposed", "forced"): whether each test request's positive is known to the sequential models
    # (it occurs as a training target before the test period's held-out tail)
    known: dict[str, np.ndarray] = field(default_factory=dict)
    # per view ("proposed", "forced"): the surface of each test request's add-to-cart, where the data has one
    surfaces: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    train_curves: dict[str, list] = field(default_factory=dict)


def _per_request(sets: CandidateSets, rows: np.ndarray, scores: list[np.ndarray]) -> PerRequest:
    return score_requests(
        scores,
        sets.positive[rows],
        sets.requests["user_id"].to_numpy(zero_copy_only=False)[rows],
        sets.requests["session_key"].to_numpy(zero_copy_only=False)[rows],
    )


def _segments(
    sets: CandidateSets, rows: np.ndarray, vocab_items: set[str], surface: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Segment label of each request in `rows`: repeat/new item, session and history length, cold item, and
    `surface` (the add-to-cart's, `_surfaces` of the same rows) where the data has one."""
    hist = sets.state["history_seq"].to_pylist()
    sess = sets.state["session_seq"].to_pylist()
    pos = sets.requests["item_id"].to_pylist()
    out: dict[str, list[str]] = {"repeat": [], "session_length": [], "history_length": [], "cold_item": []}
    for i in rows.tolist():
        seen = {e["item_id"] for e in hist[i]} | {e["item_id"] for e in sess[i]}
        out["repeat"].append("repeat item" if pos[i] in seen else "new item")
        n = len(sess[i])
        out["session_length"].append("0" if n == 0 else "1-2" if n <= 2 else "3-9" if n <= 9 else "10+")
        h = len(hist[i])
        out["history_length"].append("0" if h == 0 else "1-9" if h <= 9 else "10-49" if h <= 49 else "50+")
        out["cold_item"].append("warm item" if pos[i] in vocab_items else "cold item")
    segments = {k: np.array(v) for k, v in out.items()}
    return segments if surface is None else {**segments, "surface": surface}


def _surfaces(sets: CandidateSets, rows: np.ndarray) -> np.ndarray | None:
    """The surface of each request in `rows` ("unknown" where it has none); None where the data has none."""
    surface = sets.requests["surface"].to_pylist()
    if all(surface[i] is None for i in rows.tolist()):
        return None
    return np.array([surface[i] or "unknown" for i in rows.tolist()])


def _examples_for(sets: CandidateSets, items: pa.Table, vocab: Vocab) -> Examples:
    """The candidate lists as reranker examples (same sequences, counters and vocabulary as training)."""
    flat = sets.flat()
    cat = items.select(["item_id", "category", "subcategory"])
    idx = pc.index_in(flat["item_id"], cat["item_id"])
    cand = flat.append_column("category", cat["category"].take(idx)).append_column(
        "subcategory", cat["subcategory"].take(idx)
    )
    counters = counter_matrix(sets.counters)
    requests = sets.requests.select(["g", "ts", "surface"])
    return assemble_examples(requests, sets.state, cand, counters, vocab, sets.covisit)


def _tune(
    name: str,
    scorer: Scorer,
    grid: list[Params],
    sets: CandidateSets,
    sig: Signals,
    val_rows: np.ndarray,
    progress: bool,
) -> Params:
    best, best_p = -1.0, grid[0]
    if len(grid) > 1:
        for p in tqdm(grid, desc=f"tune {name}", disable=not progress, leave=False):
            v = float(np.mean(_per_request(sets, val_rows, scorer(sets, sig, val_rows, p)).ndcg10))
            if v > best:
                best, best_p = v, p
    return best_p


def mean_scores(per_seed: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per request, each candidate's score averaged over the seeds (`per_seed[s][request][candidate]`)."""
    return [np.mean(np.stack(lists), axis=0) for lists in zip(*per_seed, strict=True)]


def _fit_reranker(
    data: TrainingData,
    cfg: EvalConfig,
    seed: int,
    setting: dict[str, float],
    switches: dict[str, object],
    vectors: dict[int, torch.Tensor | None],
    pretrained: bool = False,
    item2vec: bool = True,
    rate_only: bool = False,
) -> TrainResult:
    """One reranker (a grid `setting`, ablation `switches`) on `data`; `vectors` caches item2vec by width.
    `pretrained`: pre-training (`cfg.pretrain`, masked or next items) before fitting; `item2vec`: its initial vectors;
    `rate_only` (without `pretrained`): `train_model`'s steps, but the parts pre-training fits
    (`pretrained_parameters`) at `cfg.pretrain`'s fine-tuning rate and frozen epochs (PRETRAIN_VARIANTS)."""
    dim = int(setting["dim"])
    if item2vec and dim not in vectors:
        vectors[dim] = (
            pretrain_vectors(data, dim, cfg.item2vec_epochs, seed, cfg.progress) if cfg.item2vec_epochs > 0 else None
        )
    tc = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=setting["lr"],
        seed=seed,
        threads=cfg.threads,
        progress=cfg.progress,
        pretrain=cfg.pretrain if pretrained else replace(cfg.pretrain, epochs=0),
    )
    init = vectors[dim] if item2vec else None
    if not rate_only or pretrained:
        return train_model(data, tc, init, dim=dim, dropout=setting["dropout"], **switches)
    set_threads(tc.threads)
    seed_everything(tc.seed)
    model = DualSequenceReranker(data.vocab.config(dim=dim, dropout=setting["dropout"], **switches))
    if init is not None:
        model.init_item_vectors(init)
    return fit(model, data.train, data.val, tc, pretrained_parameters(model))


def _sequential(
    ds: Dataset,
    cfg: EvalConfig,
    res: Results,
    sets: CandidateSets,
    sig: Signals,
    split: TimeSplit,
    val_rows: np.ndarray,
    test_rows: np.ndarray,
    test_all: np.ndarray,
    add: Callable[..., None],
    say: Callable[[str], None],
) -> None:
    """SASRec / GRU4Rec on every interaction (issue 20), then the hybrid with shopper recency.

    Validation requests are ranked by models fitted on events before the validation period, one per grid
    setting (first seed); the setting with the best validation NDCG@10 (proposed requests, as every
    baseline) is refitted per seed on events before the test period and scores the test requests (with
    `seq_refit=False` the first seed's fit before the validation period scores them too, as the reranker's
    single fit does). Each fit stops early on its own held-out tail (`SeqConfig.holdout`)."""
    before_val = Interactions.of(ds.events, split.val_start, cfg.seq.holdout)
    before_test = Interactions.of(ds.events, split.test_start, cfg.seq.holdout) if cfg.seq_refit else before_val
    val_scores: dict[str, list[np.ndarray]] = {}
    kept: dict[tuple[str, int], SeqFit | None] = {}  # (kind, grid position) -> the first seed's fit (no refit)
    test_scores: dict[str, list[list[np.ndarray]]] = {}
    best_val: dict[str, float] = {}
    for kind in cfg.sequential:
        t = time.perf_counter()
        tried = []
        for j, setting in enumerate(cfg.seq_grid):
            fit = fit_sequential(kind, before_val, replace(cfg.seq, **setting), cfg.seeds[0], cfg.progress)
            kept[(kind, j)] = fit if not cfg.seq_refit else None
            scores = score_lists(fit, sets, val_rows)
            v = float(np.mean(_per_request(sets, val_rows, scores).ndcg10)) if len(val_rows) else 0.0
            held = max((c["val_ndcg10"] for c in fit.curve), default=float("nan"))
            tried.append((setting, v, fit.best_epoch, held))
            say(f"{kind} {setting}: validation NDCG@10 {v:.4f} (best epoch {fit.best_epoch}, held-out {held:.4f})")
            if v >= best_val.get(kind, -1.0):
                best_val[kind], val_scores[kind] = v, scores
        res.seq_grid[kind] = tried
        j_best = max(range(len(tried)), key=lambda j: tried[j][1])
        chosen = tried[j_best][0]
        test_scores[kind] = []
        for seed in cfg.seeds[: cfg.seq_seeds or None]:
            reuse = kept.get((kind, j_best)) if seed == cfg.seeds[0] else None
            fit = reuse or fit_sequential(kind, before_test, replace(cfg.seq, **chosen), seed, cfg.progress)
            scores = score_lists(fit, sets, test_all)
            test_scores[kind].append(scores)
            add(kind, "sequential", {**chosen, "best_epoch": fit.best_epoch}, test_all, scores, seed)
        res.seconds[kind] = time.perf_counter() - t
    if cfg.hybrid:
        kind = max(best_val, key=lambda k: best_val[k])
        rec, pop = sig.split(sig.touch_recency, val_rows), sig.split(sig.pop, val_rows)
        best, best_p = -1.0, HYBRID_GRID[0]
        for p in HYBRID_GRID:
            v = float(np.mean(_per_request(sets, val_rows, hybrid_scores(val_scores[kind], rec, pop, p)).ndcg10))
            if v > best:
                best, best_p = v, p
        res.hybrid_setting = {"model": kind, **best_p}
        rec, pop = sig.split(sig.touch_recency, test_all), sig.split(sig.pop, test_all)
        for seed, scores in zip(cfg.seeds, test_scores[kind], strict=False):
            add(HYBRID, "hybrid", res.hybrid_setting, test_all, hybrid_scores(scores, rec, pop, best_p), seed)


def run(ds: Dataset, cfg: EvalConfig) -> Results:
    """Every number of the evaluation report for one dataset."""
    set_threads(cfg.threads)
    say = tqdm.write if cfg.progress else (lambda *_: None)
    t0 = time.perf_counter()
    split = TimeSplit.of(ds.events, cfg.val_share, cfg.test_share)
    req = requests(ds.events, split)
    sets = build_candidates(ds.events, ds.items, req, progress=cfg.progress)
    period = sets.requests["period"].to_numpy(zero_copy_only=False)
    val_all, test_all = np.flatnonzero(period == "val"), np.flatnonzero(period == "test")
    val_rows, test_rows = val_all[sets.proposed[val_all]], test_all[sets.proposed[test_all]]
    hist = sets.state["history_seq"].to_pylist()
    pos = sets.requests["item_id"].to_pylist()
    missed = test_all[~sets.proposed[test_all]]
    stage = {
        "recall": float(sets.proposed[test_all].mean()) if len(test_all) else float("nan"),
        **truncated_rank_metrics(sets.proposal_rank[test_all], 20),
        "mean_proposals": float(sets.n_proposed[test_all].mean()) if len(test_all) else float("nan"),
        "misses_in_history": float(np.mean([pos[i] in {e["item_id"] for e in hist[i]} for i in missed]))
        if len(missed)
        else float("nan"),
    }
    res = Results(
        ds.name,
        cfg,
        split,
        ds.events.num_rows,
        {
            "val": len(val_all),
            "test": len(test_all),
            "val_proposed": len(val_rows),
            "test_proposed": len(test_rows),
        },
        stage,
    )
    res.seconds["candidates"] = time.perf_counter() - t0

    def add(
        name: str,
        kind: str,
        params: dict,
        rows: np.ndarray,
        scores: list[np.ndarray],
        seed: int | None = None,
    ) -> None:
        """Record a method's test metrics from its scores of `rows` (a superset of the test requests)."""
        by_row = dict(zip(rows.tolist(), scores, strict=True))
        res.methods.append(
            MethodResult(
                name,
                kind,
                params,
                _per_request(sets, test_rows, [by_row[i] for i in test_rows.tolist()]),
                _per_request(sets, test_all, [by_row[i] for i in test_all.tolist()]),
                seed,
            )
        )

    # baselines: statistics fitted before each period, hyper-parameters tuned on validation
    t = time.perf_counter()
    sig = signals(sets)
    say("session kNN indexes (training period for validation, training + validation for test) ...")
    knn = {p: SessionKNN(before(ds.events, split.fit_end(p))) for p in ("val", "test")}
    for name, (scorer, grid) in baselines(knn).items():
        p = _tune(name, scorer, grid, sets, sig, val_rows, cfg.progress)
        add(name, "baseline", p, test_all, scorer(sets, sig, test_all, p))
    res.seconds["baselines"] = time.perf_counter() - t

    # which test positives a next-item model fitted before the test period (or, with no refit, before the
    # validation period) knows: computed even when no sequential model runs, so every method is split by it
    known_vocab = Interactions.of(
        ds.events, split.test_start if cfg.seq_refit else split.val_start, cfg.seq.holdout
    ).vocab
    res.known = {
        "proposed": known_mask(known_vocab, sets, test_rows),
        "forced": known_mask(known_vocab, sets, test_all),
    }
    res.surfaces = {
        view: labels for view, rows in (("proposed", test_rows), ("forced", test_all))
        if (labels := _surfaces(sets, rows)) is not None
    }
    if cfg.sequential:
        _sequential(ds, cfg, res, sets, sig, split, val_rows, test_rows, test_all, add, say)
    categories = dict(zip(ds.items["item_id"].to_pylist(), ds.items["category"].to_pylist(), strict=True))
    for kind in cfg.ctr:  # fitted on the views before the test period, stopped on its held-out tail
        t = time.perf_counter()
        for seed in cfg.seeds[: cfg.ctr_seeds or None]:
            imp = Impressions.of(ds.events, split.test_start, MAX_LEN[kind], cfg.ctr_cfg, seed)
            fit = fit_ctr(kind, imp, cfg.ctr_cfg, seed, cfg.progress)
            params = {"negatives": cfg.ctr_cfg.negatives, "max_len": MAX_LEN[kind], "best_epoch": fit.best_epoch}
            add(f"{kind}_ctr", "ctr", params, test_all, score_ctr(fit, sets, test_all, categories), seed)
        res.seconds[f"{kind}_ctr"] = time.perf_counter() - t

    # the reranker's training data: the training + validation periods only (its own early stopping uses the
    # add-to-carts of the validation period), negatives from the same candidate stage; then neural baselines
    # and the reranker on the same examples
    fit_events = before(ds.events, split.test_start)
    n_fit = pc.sum(pc.equal(fit_events["action"], "add_to_cart")).as_py()
    val_fraction = min(max(len(val_all) / max(n_fit, 1), 0.05), 0.5)
    proposer = stage_proposer(fit_events, ds.items, progress=cfg.progress)
    seed_scores: list[list[np.ndarray]] = []  # the full reranker's test scores, one list per seed
    for seed in cfg.seeds:
        t = time.perf_counter()
        data: TrainingData = build(
            fit_events, BuildConfig(val_fraction=val_fraction, seed=seed), progress=cfg.progress, proposer=proposer
        )
        examples = _examples_for(sets, ds.items, data.vocab)
        sub = examples.subset(test_all)  # trained before the test period: scored on it only
        if seed == cfg.seeds[0]:
            res.segments = _segments(sets, test_rows, set(data.vocab.items), res.surfaces.get("proposed"))
        base_cfg = data.vocab.config()  # the sequence lengths the neural baselines' batches are cut to
        n_rows = (
            int(
                max(
                    examples.cand_items.max(initial=0),
                    data.train.cand_items.max(initial=0),
                    examples.hist_items.max(initial=0),
                    examples.sess_items.max(initial=0),
                )
            )
            + 1
        )
        n_rows = max(n_rows, base_cfg.n_items + base_cfg.n_subcats + base_cfg.n_cats + 1)
        res.seconds[f"build_seed{seed}"] = time.perf_counter() - t
        for name in cfg.neural:
            t = time.perf_counter()
            model = fit_neural(name, data.train, n_rows, base_cfg, cfg.neural_epochs, seed=seed, progress=cfg.progress)
            add(
                name + GROUPS_SUFFIX,
                "neural",
                {"epochs": cfg.neural_epochs, "dim": 32},
                test_all,
                score_examples(model, sub, base_cfg),
                seed,
            )
            res.seconds[f"{name}_seed{seed}"] = time.perf_counter() - t
        vectors: dict[int, torch.Tensor | None] = {}  # item2vec vectors of this seed's data, by width

        if not res.reranker_setting:  # tuned once, on the first seed's validation groups
            t = time.perf_counter()
            for setting in cfg.grid if len(cfg.grid) > 1 else ():
                tried = _fit_reranker(data, cfg, seed, setting, {}, vectors)
                res.reranker_grid.append((setting, tried.metrics()["val_ndcg10"]))
                say(f"reranker {setting}: validation NDCG@10 {res.reranker_grid[-1][1]:.4f}")
            res.reranker_setting = max(res.reranker_grid, key=lambda r: r[1])[0] if res.reranker_grid else cfg.grid[0]
            res.seconds["reranker_tuning"] = time.perf_counter() - t
        for name in cfg.ablations:
            t = time.perf_counter()
            fitted = _fit_reranker(data, cfg, seed, res.reranker_setting, ABLATIONS[name], vectors)
            res.train_curves[f"{name}_seed{seed}"] = [e.__dict__ for e in fitted.epochs]
            add(
                name,
                "reranker",
                {**ABLATIONS[name], "best_epoch": fitted.best_epoch},
                test_all,
                scores := score_examples(fitted.model, sub, fitted.model.cfg),
                seed,
            )
            if name == "reranker":
                seed_scores.append(scores)
            res.seconds[f"{name}_seed{seed}"] = time.perf_counter() - t
        for name in cfg.pretraining:
            t = time.perf_counter()
            on, i2v, scaled = PRETRAIN_VARIANTS[name]
            fitted = _fit_reranker(
                data, cfg, seed, res.reranker_setting, {}, vectors, pretrained=on, item2vec=i2v, rate_only=scaled
            )
            res.train_curves[f"{name}_seed{seed}"] = [e.__dict__ for e in fitted.epochs]
            params = {"pretrain_epochs": cfg.pretrain.epochs if on else 0, "item2vec": i2v}
            if on:
                params["objective"] = cfg.pretrain.objective
            if scaled:
                params |= {"lr_scale": cfg.pretrain.finetune_lr_scale, "freeze_epochs": cfg.pretrain.freeze_epochs}
            if fitted.pretrain:
                params["pretrain_loss"] = round(fitted.pretrain[-1].loss, 3)
            params["best_epoch"] = fitted.best_epoch
            scores = score_examples(fitted.model, sub, fitted.model.cfg)
            add(name, "pretraining", params, test_all, scores, seed)
            res.seconds[f"{name}_seed{seed}"] = time.perf_counter() - t
    if len(seed_scores) > 1:  # the seeds' rerankers served together: each candidate's mean score
        add(ENSEMBLE, "ensemble", {"seeds": len(seed_scores)}, test_all, mean_scores(seed_scores))
    res.seconds["total"] = time.perf_counter() - t0
    return res
