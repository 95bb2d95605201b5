"""Prequential replay (issue 17): a frozen model, a daily retrain and continuous updates, each scored on
the add-to-carts of consecutive windows it has not seen, over the test period of the realistic shop.

Protocol (`run`; docs/continuous.md, "Prequential replay"):

- **Test period and windows.** The last `test_days` days of the data (24-hour days counted back from the
  data's end: the shop's own end, `start_ms + days`) are cut into consecutive windows of `window_hours`
  hours (24 must be a multiple of it, so a window never straddles a day). Every add-to-cart in the test
  period is one request and lies in exactly one window (`make_windows`, `window_index`).
- **One candidate list per request, the same for every arm.** The serving candidate stage is replayed
  point-in-time over all events (`insession.train.replay.build_candidates`, as the evaluation does); the
  "forced" view (the carted item put in place of the last proposal when the stage missed it) is the main
  one, so every add-to-cart of a window counts; the "proposed" view (requests whose item the stage
  proposed) is reported beside it. Point-in-time state and counters make reading all events leak-free.
- **frozen**: `insession train`'s pipeline (`train_on_events`, candidate-stage negatives) on every event
  before the first window; never updated afterwards (its directory is hashed before and after the run).
- **daily**: the same pipeline from scratch on every event before the start of each test day; a window is
  scored by the model of its day. Day 1's model is the frozen one itself (same events, seed and settings:
  the same training; re-running it would only cost time), so the arms agree on day 1 by construction.
- **continuous**: a copy of the frozen model directory, then one `insession.train.follow.update_once` per
  window on the events before the window's start (warm start, new items on the cold-start chain, the
  promotion gate on the newest `validate_fraction` of the new add-to-carts, 20% by default since
  2026-11-30, 30% before: `FollowConfig`); the window is scored by whatever serves
  after the update (the promoted candidate, or the previous model after a refusal or a skip).
- **Scores**: NDCG@10 per request (`insession.evaluate.metrics`); per window and overall the arms' means,
  and the paired differences continuous - daily and continuous - frozen with paired session-bootstrap
  intervals (`paired_difference`: the same requests, whole sessions resampled).
- **Trend shifts** (`shop.trends`, docs/synthetic.md): a window is "after a shift" when a subcategory
  trend started after its daily model's data cut (the day's start) and before the window's start: the
  continuous model's update has seen the shift begin, the daily model has not. (Looser, also reported: a
  subcategory trend's rise, its start to its peak a day later, overlaps the window.) Item trends (30 a day,
  mostly tail items) start in every window, so they mark no window. Separately, a request is a "trend request" when its
  item is a trending item, or of a trending subcategory, within `trend_horizon_h` hours of that trend's
  start. Differences are reported on both splits.

The CLI (`insession prequential`) runs it on a seeded realistic shop, prints progress, writes the plot
(`--plot`) and, with `--doc`, its results section into a Markdown file; with `--workdir` it keeps the model
directories and the result (`result.pkl`), and `--pool DIR --pool DIR ...` pools saved runs' paired
differences (`pooled_difference`: several shops, or training seeds on one shop, `--train-seed`) without
running anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer

from insession.evaluate.data import Dataset, load_synthetic
from insession.evaluate.metrics import Estimate, Pairs, PerRequest, bootstrap, paired_difference, score_requests
from insession.evaluate.neural import score_examples
from insession.evaluate.split import TimeSplit, before, requests
from insession.model.artefact import Artefact, load_artefact, versions
from insession.model.vocab import Vocab
from insession.train.build import BuildConfig, assemble_examples, counter_matrix
from insession.train.examples import Examples
from insession.train.follow import FollowConfig, UpdateResult, serving_version, update_once
from insession.train.pipeline import train_on_events
from insession.train.replay import CandidateSets, build_candidates, stage_proposer
from insession.train.trainer import TrainConfig, set_threads

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
ARMS: tuple[str, ...] = ("frozen", "daily", "continuous")
PAIRS: tuple[tuple[str, str], ...] = (("continuous", "daily"), ("continuous", "frozen"), ("daily", "frozen"))


# --- windows and trend shifts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One scoring window [start, end) (epoch ms); `day`: the test day it lies in (0-based), i.e. the daily
    model that scores it. `shifts`: the subcategory trends that started after that daily model's data cut
    (the day's start) and before the window's start: shifts the continuous model's update at the window's
    start has seen and the daily model has not (the windows "after a trend shift"). `rising`: the
    subcategory trends whose rise (start to peak) overlaps the window, seen or not (a looser marking)."""

    index: int
    start: int
    end: int
    day: int
    shifts: tuple[str, ...] = ()
    rising: tuple[str, ...] = ()

    @property
    def post_shift(self) -> bool:
        return bool(self.shifts)

    def label(self) -> str:
        a = datetime.fromtimestamp(self.start / 1000, UTC)
        b = datetime.fromtimestamp(self.end / 1000, UTC)
        return f"{a:%m-%d %H:%M}-{b:%H:%M}"


def make_windows(end: int, test_days: int, window_hours: int) -> list[Window]:
    """The test period [end - test_days days, end) cut into consecutive `window_hours`-hour windows.

    Raises ValueError unless `window_hours` divides 24 (a window never straddles two days, so each has one
    daily model) and test_days >= 1. The windows partition the period: each starts where the previous ends.
    """
    if test_days < 1 or window_hours < 1 or 24 % window_hours:
        raise ValueError(f"need test_days >= 1 and window_hours dividing 24 (got {test_days}, {window_hours})")
    start, step = end - test_days * DAY_MS, window_hours * HOUR_MS
    n = test_days * 24 // window_hours
    return [Window(k, start + k * step, start + (k + 1) * step, (k * step) // DAY_MS) for k in range(n)]


def mark_shifts(windows: list[Window], trends: pa.Table | None) -> list[Window]:
    """`windows` with `shifts` and `rising` set from the subcategory trends (see `Window`; item trends mark
    no window: 30 start every day). Unchanged without `trends`."""
    if trends is None or not trends.num_rows or not windows:
        return windows
    subs = trends.filter(pc.equal(trends["kind"], "subcategory")).to_pylist()
    first = windows[0].start
    out = []
    for w in windows:
        cut = first + w.day * DAY_MS  # the daily model of this window trained on events before this
        seen = tuple(t["id"] for t in subs if cut <= t["start_ms"] < w.start)
        rising = tuple(t["id"] for t in subs if t["start_ms"] < w.end and t["peak_ms"] > w.start)
        out.append(Window(w.index, w.start, w.end, w.day, seen, rising))
    return out


def window_index(ts: np.ndarray, windows: list[Window]) -> np.ndarray:
    """Per timestamp, the index of the window holding it (-1: outside the test period)."""
    starts = np.array([w.start for w in windows], np.int64)
    k = np.searchsorted(starts, np.asarray(ts, np.int64), side="right") - 1
    inside = (k >= 0) & (np.asarray(ts) < windows[-1].end)
    return np.where(inside, k, -1)


def trend_requests(req: pa.Table, trends: pa.Table | None, horizon_h: float = 48.0) -> np.ndarray:
    """bool per request: its carted item is a trending item, or of a trending subcategory (the shop's leaf
    names are the stored subcategories), and the request falls within `horizon_h` hours of that trend's
    start (its rise and the first day of its fade)."""
    n = req.num_rows
    if trends is None or not trends.num_rows or not n:
        return np.zeros(n, bool)
    ts = req["ts"].to_numpy()
    key = {"item": req["item_id"].to_pylist(), "subcategory": req["subcategory"].to_pylist()}
    out = np.zeros(n, bool)
    horizon = int(horizon_h * HOUR_MS)
    for t in trends.to_pylist():
        ids = key.get(t["kind"])
        if ids is None:
            continue
        same = np.fromiter((x == t["id"] for x in ids), bool, n)
        out |= same & (ts >= t["start_ms"]) & (ts < t["start_ms"] + horizon)
    return out


# --- configuration and results --------------------------------------------------------------------


@dataclass
class PrequentialConfig:
    """The shop, the protocol and the training settings of every arm."""

    users: int = 400
    items: int = 100_000
    days: int = 9
    seed: int = 0  # the shop's seed, and the trainings' unless `train_seed` is set
    # the trainings' seed (frozen, daily, continuous updates: initialisation, batch order, the build's samples);
    # None: `seed`, so the runs made before this option reproduce. Several on one shop, pooled
    # (`pooled_difference`), average a comparison over training runs instead of resting on one per arm
    train_seed: int | None = None
    test_days: int = 3
    window_hours: int = 12
    # full trainings (frozen, daily)
    epochs: int = 4  # at most (early stopping on the training's own latest 15% of add-to-carts)
    batch_size: int = 32
    lr: float = 2e-3
    dim: int = 32
    dropout: float = 0.1
    item2vec_epochs: int = 1
    # continuous updates: how each one trains and decides (its seed, threads and bars are this config's)
    update: FollowConfig = field(default_factory=lambda: FollowConfig(batch_size=32))
    # reporting
    trend_horizon_h: float = 48.0
    n_boot: int = 1000
    threads: int = 1  # torch intra-op threads (1 on a shared machine; see TrainConfig.threads)
    bars: bool = False  # the inner steps' progress bars (the replay prints its own lines regardless)

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed


@dataclass
class PrequentialResult:
    """Everything the report needs. Per-request arrays are aligned on the test requests (`requests` rows)."""

    config: PrequentialConfig
    dataset: str
    n_events: int
    windows: list[Window]
    requests: pa.Table  # g, user_id, item_id, subcategory, ts, surface, session_key
    window: np.ndarray  # per request: its window's index
    proposed: np.ndarray  # per request: the stage proposed its item
    trend: np.ndarray  # per request: a trend request (`trend_requests`)
    scores: dict[str, PerRequest]  # arm -> per-request metrics on every test request (forced view)
    served: dict[str, list[str]]  # arm -> per window, the model version that scored it
    scored: dict[str, np.ndarray]  # arm -> the request rows it scored, in scoring order (window by window)
    updates: list[dict[str, Any]]  # the continuous arm's UpdateResult per window (asdict)
    frozen_versions: tuple[list[str], list[str]]  # the frozen model directory's versions before / after
    frozen_files: tuple[str, str]  # a hash of every file under it, before / after
    trends: pa.Table | None
    seconds: dict[str, float] = field(default_factory=dict)

    def arm(self, name: str, mask: np.ndarray | None = None) -> PerRequest:
        per = self.scores[name]
        return per if mask is None else per.subset(mask)

    def difference(self, a: str, b: str, mask: np.ndarray | None = None) -> Estimate:
        """Mean NDCG@10 of arm a - arm b over the masked requests, paired session-bootstrap 95% interval."""
        return paired_difference(self.arm(a, mask), self.arm(b, mask), "ndcg10", self.config.n_boot, 0)

    def mean(self, name: str, mask: np.ndarray | None = None) -> Estimate:
        return bootstrap(self.arm(name, mask), self.config.n_boot, 0)["ndcg10"]

    def post_shift_mask(self) -> np.ndarray:
        """Per request: its window is after a trend shift (`Window.shifts`)."""
        post = np.array([w.post_shift for w in self.windows], bool)
        return post[self.window]

    def rising_mask(self) -> np.ndarray:
        """Per request: a subcategory trend rises during its window (`Window.rising`)."""
        rising = np.array([bool(w.rising) for w in self.windows], bool)
        return rising[self.window]


# --- the replay -----------------------------------------------------------------------------------


def _examples(sets: CandidateSets, items: pa.Table, vocab: Vocab, counters: np.ndarray) -> Examples:
    """The candidate lists as one model's examples (its vocabulary's indices; the same sequences,
    counters and surfaces for every model), as the evaluation builds them (`runner._examples_for`)."""
    flat = sets.flat()
    cat = items.select(["item_id", "category", "subcategory"])
    idx = pc.index_in(flat["item_id"], cat["item_id"])
    cand = flat.append_column("category", cat["category"].take(idx)).append_column(
        "subcategory", cat["subcategory"].take(idx)
    )
    return assemble_examples(
        sets.requests.select(["g", "ts", "surface"]), sets.state, cand, counters, vocab, sets.covisit
    )


def _tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes under `root` (the frozen arm's untouched check)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _trend_table(cfg: PrequentialConfig) -> tuple[pa.Table, int]:
    """The shop's trends and its end (ms): the same seeded shop `load_synthetic` generates."""
    from insession.datasets import generate_shop

    shop = generate_shop(cfg.users, cfg.items, cfg.days, cfg.seed, realistic=True)
    return shop.trends, int(shop.start_ms + cfg.days * DAY_MS)


def run(
    cfg: PrequentialConfig,
    *,
    dataset: Dataset | None = None,
    trends: pa.Table | None = None,
    end: int | None = None,
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> PrequentialResult:
    """The prequential replay (module docstring). Without `dataset`, the seeded realistic shop of `cfg`
    (with its trends and end); with one, `trends` may be None (no window is marked) and `end` defaults to
    the hour after its last event. Model directories go under `workdir` (a temporary one when None):
    `frozen/`, `daily/day<k>/`, `continuous/`. `say` receives one progress line per step."""
    t_all = time.perf_counter()
    set_threads(cfg.threads)
    seconds: dict[str, float] = {}

    def step(msg: str) -> None:
        say(f"[{time.strftime('%H:%M:%S')}] {msg}")

    if dataset is None:
        t = time.perf_counter()
        step(
            f"generating the realistic shop ({cfg.users} shoppers, {cfg.items:,} items, {cfg.days} days, "
            f"seed {cfg.seed})"
        )
        dataset = load_synthetic(cfg.users, cfg.items, cfg.days, cfg.seed, realistic=True)
        trends, end = _trend_table(cfg)
        seconds["generate"] = time.perf_counter() - t
    events, items = dataset.events, dataset.items
    if end is None:
        end = (int(pc.max(events["ts"]).as_py()) // HOUR_MS + 1) * HOUR_MS
    windows = mark_shifts(make_windows(end, cfg.test_days, cfg.window_hours), trends)
    test_start = windows[0].start
    step(
        f"{events.num_rows:,} events; test period from {windows[0].label()[:11]}, {len(windows)} windows of "
        f"{cfg.window_hours} h; after a trend shift: {[w.index + 1 for w in windows if w.post_shift]}, "
        f"a trend rising: {[w.index + 1 for w in windows if w.rising]}"
    )

    # the requests and their candidate lists, shared by the three arms
    t = time.perf_counter()
    req = requests(events, TimeSplit(test_start, test_start))
    req = req.filter(pc.less(req["ts"], end))
    step(f"candidate lists for {req.num_rows:,} add-to-carts (the serving stage replayed point-in-time) ...")
    sets = build_candidates(events, items, req, progress=cfg.bars)
    counters = counter_matrix(sets.counters)
    win = window_index(sets.requests["ts"].to_numpy(), windows)
    if (win < 0).any():
        raise AssertionError("a test request outside every window")
    seconds["candidates"] = time.perf_counter() - t

    tc = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.training_seed,
        threads=cfg.threads,
        progress=cfg.bars,
    )
    overrides = {"dim": cfg.dim, "dropout": cfg.dropout}
    own_tmp = tempfile.TemporaryDirectory(prefix="insession-prequential-") if workdir is None else None
    root = Path(own_tmp.name) if own_tmp is not None else Path(workdir)  # type: ignore[arg-type]
    examples: dict[Path, Examples] = {}
    per_arm: dict[str, list[np.ndarray | None]] = {a: [None] * req.num_rows for a in ARMS}
    served: dict[str, list[str]] = {a: [] for a in ARMS}
    scored: dict[str, list[int]] = {a: [] for a in ARMS}

    def score(arm: str, art: Artefact, w: Window) -> None:
        if art.path not in examples:
            examples[art.path] = _examples(sets, items, art.vocab, counters)
        rows = np.flatnonzero(win == w.index)
        for r, s in zip(
            rows.tolist(), score_examples(art.model, examples[art.path].subset(rows), art.model.cfg), strict=True
        ):
            per_arm[arm][r] = s
        scored[arm].extend(rows.tolist())
        served[arm].append(art.path.name)

    def full_training(until: int, out: Path, name: str) -> Artefact:
        t = time.perf_counter()
        fit_events = before(events, until)
        step(
            f"{name}: training from scratch on {fit_events.num_rows:,} events before "
            f"{datetime.fromtimestamp(until / 1000, UTC):%m-%d %H:%M} ..."
        )
        proposer = stage_proposer(fit_events, items, progress=cfg.bars)
        trained = train_on_events(
            fit_events,
            out,
            train_config=tc,
            build_config=BuildConfig(seed=cfg.training_seed),
            proposer=proposer,
            item2vec_epochs=cfg.item2vec_epochs,
            **overrides,
        )
        seconds[name] = time.perf_counter() - t
        m = trained.result.metrics()
        step(
            f"{name}: {trained.path.name}, validation NDCG@10 {m.get('val_ndcg10', float('nan')):.4f} "
            f"({len(trained.data.train)} training groups, {seconds[name]:.0f} s)"
        )
        return load_artefact(trained.path)

    try:
        frozen_dir = root / "frozen"
        frozen = full_training(test_start, frozen_dir, "frozen")
        frozen_before = ([v.name for v in versions(frozen_dir)], _tree_hash(frozen_dir))
        cont_dir = root / "continuous"
        shutil.copytree(frozen_dir, cont_dir)
        daily: dict[int, Artefact] = {0: frozen}  # day 1's model is the frozen one (module docstring)
        fcfg = replace(cfg.update, seed=cfg.training_seed, threads=cfg.threads, progress=cfg.bars)
        updates: list[dict[str, Any]] = []
        seconds["continuous"] = 0.0
        for w in windows:
            n_w = int((win == w.index).sum())
            step(
                f"window {w.index + 1}/{len(windows)} {w.label()} ({n_w} add-to-carts"
                f"{', after a shift: ' + ', '.join(w.shifts) if w.shifts else ''}"
                f"{', rising: ' + ', '.join(w.rising) if w.rising else ''})"
            )
            if w.day not in daily:
                daily[w.day] = full_training(w.start, root / "daily" / f"day{w.day}", f"daily day {w.day + 1}")
            t = time.perf_counter()
            result: UpdateResult = update_once(before(events, w.start), cont_dir, fcfg)
            seconds["continuous"] += time.perf_counter() - t
            updates.append(asdict(result))
            step(
                f"continuous: {result.outcome} ({result.reason}; {result.train_groups} training / "
                f"{result.val_groups} validation groups, candidate {result.candidate_ndcg10:.4f} vs serving "
                f"{result.serving_ndcg10:.4f}, {result.new_items} new items, {time.perf_counter() - t:.0f} s)"
            )
            score("frozen", frozen, w)
            score("daily", daily[w.day], w)
            score("continuous", load_artefact(serving_version(cont_dir)), w)
        frozen_after = ([v.name for v in versions(frozen_dir)], _tree_hash(frozen_dir))
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()

    user = sets.requests["user_id"].to_numpy(zero_copy_only=False)
    session = sets.requests["session_key"].to_numpy(zero_copy_only=False)
    scores = {a: score_requests(per_arm[a], sets.positive, user, session) for a in ARMS}  # type: ignore[arg-type]
    seconds["total"] = time.perf_counter() - t_all
    keep = ["g", "user_id", "item_id", "subcategory", "ts", "surface", "session_key"]
    return PrequentialResult(
        config=cfg,
        dataset=dataset.name,
        n_events=events.num_rows,
        windows=windows,
        requests=sets.requests.select(keep),
        window=win,
        proposed=sets.proposed.copy(),
        trend=trend_requests(sets.requests, trends, cfg.trend_horizon_h),
        scores=scores,
        served=served,
        scored={a: np.array(v, np.int64) for a, v in scored.items()},
        updates=updates,
        frozen_versions=(frozen_before[0], frozen_after[0]),
        frozen_files=(frozen_before[1], frozen_after[1]),
        trends=trends,
        seconds=seconds,
    )


# --- the report -----------------------------------------------------------------------------------


def _shift_cell(w: Window) -> str:
    """The shifts after which the window lies (bold), then other trends rising in it."""
    rest = [t for t in w.rising if t not in w.shifts]
    return ", ".join([f"**{t}**" for t in w.shifts] + [f"({t})" for t in rest])


def _f(e: Estimate) -> str:
    return "—" if np.isnan(e.value) else f"{e.value:+.4f} [{e.low:+.4f}, {e.high:+.4f}]"


def window_rows(res: PrequentialResult) -> list[dict[str, Any]]:
    """One row per window: requests, each arm's NDCG@10, the paired differences, the continuous outcome."""
    rows = []
    for w in res.windows:
        m = res.window == w.index
        row: dict[str, Any] = {"window": w, "requests": int(m.sum()), "proposed": int(res.proposed[m].sum())}
        for a in ARMS:
            row[a] = res.arm(a, m).point()["ndcg10"] if m.any() else float("nan")
        for a, b in PAIRS[:2]:
            row[f"{a}-{b}"] = res.difference(a, b, m)
        row["update"] = res.updates[w.index]["outcome"]
        rows.append(row)
    return rows


def summary_rows(res: PrequentialResult) -> list[tuple[str, np.ndarray]]:
    """The request subsets the overall differences are reported on (name, mask)."""
    post = res.post_shift_mask()
    n = len(res.window)
    later = res.window >= (24 // res.config.window_hours)  # after the first test day (day 1: daily = frozen)
    return [
        ("all test add-to-carts", np.ones(n, bool)),
        ("windows after a trend shift", post),
        ("the other windows", ~post),
        ("windows with a trend rising", res.rising_mask()),
        ("after the first day (daily retrained)", later),
        ("trend requests", res.trend),
        ("other requests", ~res.trend),
        ("proposed view (stage proposed the item)", res.proposed),
    ]


def report(res: PrequentialResult, command: str, plot_path: str | None = None) -> str:
    """The Markdown results block: the command, the size, the per-window table, the overall paired
    differences on every subset of `summary_rows`, and the plot."""
    c = res.config
    lines = [
        "```bash",
        command,
        "```",
        "",
        f"Shop `{res.dataset}`: {res.n_events:,} events; test period the last {c.test_days} days, "
        f"{len(res.windows)} windows of {c.window_hours} h, {len(res.window):,} add-to-carts "
        f"({int(res.proposed.sum()):,} proposed by the candidate stage, {int(res.trend.sum()):,} trend requests). "
        f"Training seed {c.training_seed}. Full trainings: dim {c.dim}, at most {c.epochs} epochs, lr {c.lr}, "
        f"batch {c.batch_size}, item2vec "
        f"{c.item2vec_epochs} epoch; updates: {c.update.epochs} epochs, lr {c.update.lr}, batch "
        f"{c.update.batch_size}, validation window {c.update.validate_fraction:.0%} of the new add-to-carts. "
        f"Wall time {res.seconds.get('total', 0) / 60:.1f} min on 2 shared cores, 1 torch thread "
        f"(candidate lists {res.seconds.get('candidates', 0):.0f} s, frozen {res.seconds.get('frozen', 0):.0f} s, "
        f"continuous updates {res.seconds.get('continuous', 0):.0f} s in all).",
        "",
        "| window (UTC) | trend shift (**seen by the update, not by daily**; (rising)) | add-to-carts (proposed) | "
        "frozen | daily | continuous | "
        "continuous - daily [95% CI] | continuous - frozen [95% CI] | update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in window_rows(res):
        w: Window = r["window"]
        lines.append(
            f"| {w.index + 1}: {w.label()} | {_shift_cell(w)} | {r['requests']} ({r['proposed']}) | "
            f"{r['frozen']:.4f} | {r['daily']:.4f} | {r['continuous']:.4f} | {_f(r['continuous-daily'])} | "
            f"{_f(r['continuous-frozen'])} | {r['update']} |"
        )
    lines += [
        "",
        "| requests | n | frozen | daily | continuous | continuous - daily | continuous - frozen | daily - frozen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary_rows(res):
        if not m.any():
            lines.append(f"| {name} | 0 | | | | | | |")
            continue
        means = " | ".join(f"{res.arm(a, m).point()['ndcg10']:.4f}" for a in ARMS)
        diffs = " | ".join(_f(res.difference(a, b, m)) for a, b in PAIRS)
        lines.append(f"| {name} | {int(m.sum()):,} | {means} | {diffs} |")
    unchanged = res.frozen_versions[0] == res.frozen_versions[1] and res.frozen_files[0] == res.frozen_files[1]
    outcomes = [u["outcome"] for u in res.updates]
    lines += [
        "",
        f"Continuous updates: {outcomes.count('promoted')} promoted, {outcomes.count('refused')} refused, "
        f"{outcomes.count('skipped')} skipped. The frozen model directory was "
        f"{'unchanged (same version, same bytes)' if unchanged else 'CHANGED'} after the run.",
    ]
    if plot_path:
        lines += ["", f"![prequential replay]({plot_path})"]
    return "\n".join(lines)


def pooled_difference(
    results: list[PrequentialResult],
    a: str,
    b: str,
    mask: Callable[[PrequentialResult], np.ndarray],
    n_boot: int = 1000,
) -> tuple[int, Estimate]:
    """Arm a - arm b over the masked requests of several runs pooled: (requests, mean difference with a paired
    session-bootstrap 95% interval). Sessions are keyed by shop (`dataset`): distinct across shops, one
    resampling unit across the runs of one shop with different training seeds (`train_seed`), whose deltas on
    the same requests are not independent draws; the point is then the mean over those seeds."""
    deltas, sessions = [], []
    for res in results:
        m = mask(res)
        deltas.append(res.scores[a].ndcg10[m] - res.scores[b].ndcg10[m])
        sessions.append(np.char.add(f"{res.dataset}:", res.scores[a].session[m].astype(str)))
    return _paired(deltas, sessions, n_boot)


def _paired(deltas: list[np.ndarray], sessions: list[np.ndarray], n_boot: int) -> tuple[int, Estimate]:
    """The number of paired deltas and their mean with a bootstrap interval resampling sessions."""
    delta, session = np.concatenate(deltas), np.concatenate(sessions)
    zero = np.zeros(len(delta))
    empty = Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    per_a = PerRequest(delta, zero, zero, zero, session, session, zero, empty)
    per_b = PerRequest(zero, zero, zero, zero, session, session, zero, empty)
    return len(delta), paired_difference(per_a, per_b, "ndcg10", n_boot, 0)


def versus_difference(
    results: list[PrequentialResult],
    others: list[PrequentialResult],
    mask: Callable[[PrequentialResult], np.ndarray],
    n_boot: int = 1000,
) -> tuple[int, Estimate]:
    """The continuous arm of each run minus that of its counterpart in `others` (the same shop and training
    seed, another update setting: the same requests, lists, frozen and daily models), pooled as
    `pooled_difference` pools (sessions keyed by shop). Raises ValueError when a pair's requests differ."""
    deltas, sessions = [], []
    for res, other in zip(results, others, strict=True):
        same_seed = res.config.training_seed == other.config.training_seed
        if res.dataset != other.dataset or not same_seed or not res.requests["g"].equals(other.requests["g"]):
            raise ValueError(
                f"{res.dataset} (training seed {res.config.training_seed}) and {other.dataset} (training seed "
                f"{other.config.training_seed}): not the same shop and training seed, nothing to pair"
            )
        m = mask(res)
        deltas.append(res.scores["continuous"].ndcg10[m] - other.scores["continuous"].ndcg10[m])
        sessions.append(np.char.add(f"{res.dataset}:", res.scores["continuous"].session[m].astype(str)))
    return _paired(deltas, sessions, n_boot)


def _pool_subsets() -> list[tuple[str, Callable[[PrequentialResult], np.ndarray]]]:
    return [
        ("all test add-to-carts", lambda r: np.ones(len(r.window), bool)),
        ("windows after a trend shift", lambda r: r.post_shift_mask()),
        ("the other windows", lambda r: ~r.post_shift_mask()),
        ("after the first day (daily retrained)", lambda r: r.window >= 24 // r.config.window_hours),
        ("proposed view", lambda r: r.proposed),
    ]


def versus_report(results: list[PrequentialResult], others: list[PrequentialResult], n_boot: int = 1000) -> str:
    """`versus_difference` on the subsets of `pooled_report`, as a Markdown table."""
    lines = [
        "Continuous (the --pool runs) minus continuous (the --versus runs), paired:",
        "",
        "| requests | n | continuous - continuous |",
        "|---|---|---|",
    ]
    for name, mask in _pool_subsets():
        n, e = versus_difference(results, others, mask, n_boot)
        lines.append(f"| {name} | {n:,} | {_f(e)} |")
    return "\n".join(lines)


def pooled_report(results: list[PrequentialResult], n_boot: int = 1000) -> str:
    """The paired differences of `summary_rows`' first subsets over several runs pooled (`pooled_difference`),
    as a Markdown table."""
    names = [f"`{r.dataset}` (training seed {r.config.training_seed})" for r in results]
    lines = [
        f"Pooled over {', '.join(names)}:",
        "",
        "| requests | n | continuous - daily | continuous - frozen | daily - frozen |",
        "|---|---|---|---|---|",
    ]
    for name, mask in _pool_subsets():
        cells = [pooled_difference(results, a, b, mask, n_boot) for a, b in PAIRS]
        lines.append(f"| {name} | {cells[0][0]:,} | " + " | ".join(_f(e) for _, e in cells) + " |")
    return "\n".join(lines)


def plot(res: PrequentialResult, path: Path) -> None:
    """NDCG@10 per window and arm (session-bootstrap 95% intervals) above the paired differences per window;
    subcategory trends' starts (solid) and peaks (dotted) as vertical lines, windows after a shift shaded,
    daily retrains as grey ticks, item trends' starts as a rug."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def dt(ms: int | float) -> datetime:
        return datetime.fromtimestamp(ms / 1000, UTC)

    mid = [dt((w.start + w.end) / 2) for w in res.windows]
    lo, hi = res.windows[0].start, res.windows[-1].end
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colours = {"frozen": "tab:grey", "daily": "tab:blue", "continuous": "tab:red"}
    shift = np.timedelta64(int(res.config.window_hours * 0.06 * 3600), "s")
    for k, a in enumerate(ARMS):
        est = [res.mean(a, res.window == w.index) for w in res.windows]
        x = [np.datetime64(m.replace(tzinfo=None)) + (k - 1) * shift for m in mid]
        y = np.array([e.value for e in est])
        err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=a, color=colours[a])
    for j, (a, b) in enumerate(PAIRS[:2]):
        est = [res.difference(a, b, res.window == w.index) for w in res.windows]
        x = [np.datetime64(m.replace(tzinfo=None)) + (j * 2 - 1) * shift for m in mid]
        y = np.array([e.value for e in est])
        err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
        bx.errorbar(
            x,
            y,
            yerr=err,
            marker="s",
            capsize=3,
            label=f"{a} - {b}",
            color="tab:purple" if b == "daily" else "tab:orange",
        )
    bx.axhline(0, color="black", lw=0.8)
    for axis in (ax, bx):
        for w in res.windows:
            if w.post_shift:
                axis.axvspan(dt(w.start), dt(w.end), color="gold", alpha=0.25, lw=0)
            elif w.rising:
                axis.axvspan(dt(w.start), dt(w.end), color="gold", alpha=0.08, lw=0)
        for d in range(1, res.config.test_days):
            axis.axvline(dt(lo + d * DAY_MS), color="tab:blue", lw=0.6, ls="--", alpha=0.5)
    trends = res.trends
    if trends is not None and trends.num_rows:
        for t in trends.filter(pc.equal(trends["kind"], "subcategory")).to_pylist():
            for when, style in ((t["start_ms"], "-"), (t["peak_ms"], ":")):
                if lo - DAY_MS <= when <= hi:
                    for axis in (ax, bx):
                        axis.axvline(dt(max(when, lo - HOUR_MS)), color="darkgoldenrod", ls=style, lw=1.2)
            if lo <= t["start_ms"] <= hi:
                ax.text(
                    dt(t["start_ms"]),
                    1.0,
                    f" {t['id']}",
                    transform=ax.get_xaxis_transform(),
                    fontsize=7,
                    va="top",
                    color="darkgoldenrod",
                    rotation=90,
                )
        starts = trends.filter(pc.equal(trends["kind"], "item"))["start_ms"].to_numpy()
        starts = starts[(starts >= lo) & (starts < hi)]
        ax.plot(
            [dt(s) for s in starts],
            np.zeros(len(starts)),
            "|",
            color="darkgoldenrod",
            ms=6,
            transform=ax.get_xaxis_transform(),
            label="item trend starts",
        )
    ax.set_ylabel("NDCG@10 (window mean, 95% CI)")
    bx.set_ylabel("paired difference")
    ax.set_title(
        f"Prequential replay on {res.dataset}: frozen vs daily retrain vs continuous updates\n"
        "gold: subcategory trend start (solid) / peak (dotted); shaded: after a shift the daily model has "
        "not seen (dark), a trend rising (light); dashed blue: daily retrain",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    bx.legend(fontsize=8, loc="upper left")
    bx.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    bx.set_xlim(dt(lo - HOUR_MS), dt(hi + HOUR_MS))
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------


def prequential(
    users: Annotated[int, typer.Option(help="Shoppers of the realistic shop.")] = 400,
    items: Annotated[int, typer.Option(help="Catalogue size (a few times the event count, as Taobao).")] = 100_000,
    days: Annotated[int, typer.Option(help="Days of the shop.")] = 9,
    seed: Annotated[int, typer.Option(help="The shop's seed (and the trainings', without --train-seed).")] = 0,
    train_seed: Annotated[
        int | None,
        typer.Option(
            help="The trainings' seed (frozen, daily, updates); default: --seed. Several on one shop, pooled "
            "(--pool), average the comparison over training runs."
        ),
    ] = None,
    test_days: Annotated[int, typer.Option(help="The last N days are the test period.")] = 3,
    window_hours: Annotated[int, typer.Option(help="Window length in hours (divides 24).")] = 12,
    epochs: Annotated[int, typer.Option(help="Full trainings' epochs at most (early stopping).")] = 4,
    dim: Annotated[int, typer.Option(help="Reranker width.")] = 32,
    lr: Annotated[float, typer.Option(help="Full trainings' learning rate.")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Groups per batch (full trainings).")] = 32,
    update_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per continuous update.")] = 2,
    update_lr: Annotated[float, typer.Option(help="Continuous updates' learning rate.")] = 2e-3,
    update_batch_size: Annotated[int, typer.Option(help="Groups per batch (continuous updates).")] = 32,
    validate_fraction: Annotated[
        float, typer.Option(help="Newest share of an update's new add-to-carts that validates (the gate).")
    ] = 0.2,
    threads: Annotated[int, typer.Option(help="Torch threads (0: every core).")] = 1,
    n_boot: Annotated[int, typer.Option(help="Bootstrap replicates.")] = 1000,
    plot_path: Annotated[Path, typer.Option("--plot", help="Where the plot goes.")] = Path("docs/img/prequential.png"),
    doc: Annotated[
        Path | None, typer.Option(help="Write the results into this Markdown file's prequential section.")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep the model directories here (default: temporary).")] = None,
    bars: Annotated[bool, typer.Option(help="Show the inner steps' progress bars.")] = False,
    pool: Annotated[
        list[Path] | None,
        typer.Option(
            help="Run nothing: pool the saved results of these --workdir runs (repeatable) and print the "
            "paired differences over them."
        ),
    ] = None,
    versus: Annotated[
        list[Path] | None,
        typer.Option(
            help="With --pool: saved runs of the same shops and training seeds with another update setting, "
            "one per --pool run in the same order; prints the continuous arms' paired difference too."
        ),
    ] = None,
) -> None:
    """Prequential replay on the realistic shop: a frozen model, a daily retrain and continuous updates
    (`insession train --follow`'s update), NDCG@10 per window with paired session-bootstrap intervals, and a
    plot with the trend shifts marked (docs/continuous.md)."""
    import pickle
    import sys

    if pool:
        results = [pickle.loads((p / "result.pkl").read_bytes()) for p in pool]
        typer.echo(pooled_report(results, n_boot))
        if versus:
            if len(versus) != len(pool):
                raise typer.BadParameter("one --versus run per --pool run", param_hint="--versus")
            others = [pickle.loads((p / "result.pkl").read_bytes()) for p in versus]
            try:
                typer.echo("\n" + versus_report(results, others, n_boot))
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--versus") from None
        return
    cfg = PrequentialConfig(
        users=users,
        items=items,
        days=days,
        seed=seed,
        train_seed=train_seed,
        test_days=test_days,
        window_hours=window_hours,
        epochs=epochs,
        dim=dim,
        lr=lr,
        batch_size=batch_size,
        update=FollowConfig(
            epochs=update_epochs, lr=update_lr, batch_size=update_batch_size, validate_fraction=validate_fraction
        ),
        threads=threads,
        n_boot=n_boot,
        bars=bars,
    )
    try:
        make_windows(0, test_days, window_hours)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    res = run(cfg, workdir=workdir, say=lambda s: typer.echo(s))
    if workdir is not None:  # the result itself, to re-render the report or the plot without a rerun
        (workdir / "result.pkl").write_bytes(pickle.dumps(res))
    plot(res, plot_path)
    command = (
        "insession " + " ".join(sys.argv[1:])
        if sys.argv and sys.argv[0].endswith("insession")
        else ("insession prequential")
    )
    link = os.path.relpath(plot_path, doc.parent) if doc is not None else str(plot_path)
    body = report(res, command, link)
    typer.echo(body)
    if doc is not None:
        from insession.evaluate.cli import write_section

        write_section(doc, "prequential", body)
        typer.echo(f"wrote the prequential section of {doc}")
