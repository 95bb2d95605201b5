"""Benchmark of the Dual Sequence ReRanker: training time and examples/s, and encode-once scoring latency."""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.common import percentiles_ms, table
from insession.datasets import Imported, generate_shop
from insession.train import TrainConfig, train_on_events
from insession.train.build import as_history
from insession.train.replay import stage_proposer
from insession.train.trainer import category_auc

TAOBAO = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao_userbehavior_head84k.parquet"
N_CANDIDATES = 60


def taobao_history() -> pa.Table:
    with Imported("normalised", TAOBAO) as im:
        items = pa.Table.from_pylist(list(im.item_rows()))
        events = pa.Table.from_batches(list(im.event_batches()))
    return as_history(events, items)


def synthetic_history(target_events: int) -> tuple[pa.Table, dict[str, str]]:
    n_users = max(200, target_events // 150)
    shop = generate_shop(
        n_users=n_users, n_items=max(1200, n_users // 10), days=14, seed=7, target_events=target_events
    )
    events = pa.concat_tables(shop.iter_event_tables())
    items = pa.Table.from_pylist(shop.items)
    sessions = shop.sessions
    intents = dict(zip(sessions["session_id"].to_pylist(), sessions["intent_category"].to_pylist(), strict=True))
    return as_history(events, items), intents


def peak_rss_gib() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_row(name: str, events: pa.Table, epochs: int, intents: dict[str, str] | None) -> tuple[list, object]:
    print(f"[bench_train] {name}: {events.num_rows:,} events, training {epochs} epoch(s) ...", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        done = train_on_events(
            events,
            Path(out),
            train_config=TrainConfig(epochs=epochs, progress=bool(os.environ.get("BENCH_PROGRESS"))),
            proposer=stage_proposer(events, progress=False),  # what `insession train` does by default
        )
    total = time.perf_counter() - t0
    steps = ", ".join(f"{k} {v:.0f}" for k, v in done.data.seconds.items())
    print(f"[bench_train] {name}: build steps (s): {steps}; total {total:.0f} s", flush=True)
    fit_s = sum(e.seconds for e in done.result.epochs)
    examples = sum(e.groups for e in done.result.epochs)
    auc = float("nan")
    if intents is not None:
        targets = [intents.get(s) for s in done.data.val_requests["session_id"].to_pylist()]
        auc = category_auc(done.result.model, done.data.val, done.data.vocab, targets)
    best = done.result.metrics()
    row = [
        name,
        events.num_rows,
        len(done.data.train),
        len(done.result.epochs),
        done.seconds["build"],
        done.seconds.get("item2vec", 0.0),
        fit_s,
        examples / fit_s,
        total,
        peak_rss_gib(),
        best["val_ndcg10"],
        "n/a" if np.isnan(auc) else auc,
    ]
    return row, done


def build_rows(name: str, done: object) -> list[list]:
    """The build's steps (seconds) for one data set."""
    return [[name, step, seconds] for step, seconds in done.data.seconds.items()]  # type: ignore[attr-defined]


def scoring_rows(done: object, repeats: int) -> list[list]:
    """Latency of ranking 60 candidates for one request: encode once + one batched score, against the
    baseline of one full forward pass per candidate (what encode-once saves)."""
    model = done.result.model  # type: ignore[attr-defined]
    val = done.data.val  # type: ignore[attr-defined]
    batch = val.collate(np.arange(1), model.cfg)
    rng = np.random.default_rng(0)
    cands = torch.from_numpy(rng.integers(1, model.cfg.n_items, N_CANDIDATES))
    counters = torch.zeros(N_CANDIDATES, 3)
    once, per = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = model.encode(batch.history, batch.session, batch.request_ts)
            model.score(enc, cands, counters)
            once.append(time.perf_counter() - t0)
        for _ in range(max(repeats // 10, 5)):
            t0 = time.perf_counter()
            for c in range(N_CANDIDATES):
                enc = model.encode(batch.history, batch.session, batch.request_ts)
                model.score(enc, cands[c : c + 1], counters[c : c + 1])
            per.append(time.perf_counter() - t0)
    a, b = percentiles_ms(once), percentiles_ms(per)
    return [
        ["encode once + batched score", a["p50"], a["p99"], a["p99.9"], a["n"], 1.0],
        ["baseline: full pass per candidate", b["p50"], b["p99"], b["p99.9"], b["n"], b["p50"] / a["p50"]],
    ]


def _targets(rows: list[list]) -> str:
    """The issue's targets against the measured totals: taobao under 10 minutes, the shop under 30 minutes
    (the shop's target is for >= 5M events; a smaller shop says so)."""
    (taobao, t_total), (shop, s_total) = ((r[0], r[8]) for r in rows)
    verdict = {True: "met", False: "not met"}
    return (
        f"Targets: {taobao} end to end in {t_total / 60:.1f} min (under 10 min: {verdict[t_total < 600]}); "
        f"{shop} in {s_total / 60:.1f} min (under 30 min: {verdict[s_total < 1800]}"
        + ("" if rows[1][1] >= 4_900_000 else "; the target is for a shop of 5 million events")
        + ")."
    )


def run(quick: bool) -> str:
    epochs = 1 if quick else 8
    # The reference size is 5M events; BENCH_SYNTHETIC_EVENTS overrides it and BENCH_SYNTHETIC_EPOCHS
    # the synthetic shop's epochs (the table says what ran).
    synthetic_events = 100_000 if quick else int(os.environ.get("BENCH_SYNTHETIC_EVENTS", 5_000_000))
    synthetic_epochs = int(os.environ.get("BENCH_SYNTHETIC_EPOCHS", epochs))
    rows, steps = [], []
    row, done = train_row("taobao_userbehavior_head84k", taobao_history(), epochs, None)
    rows.append(row)
    steps += build_rows("taobao_userbehavior_head84k", done)
    print(f"[bench_train] synthetic shop of ~{synthetic_events:,} events ...", flush=True)
    events, intents = synthetic_history(synthetic_events)
    name = f"synthetic shop ({events.num_rows:,} events)"
    row, shop = train_row(name, events, synthetic_epochs, intents)
    rows.append(row)
    steps += build_rows(name, shop)
    print("[bench_train] scoring latency ...", flush=True)
    torch.set_num_threads(1)  # as the ranking service scores (training used every core)
    scoring = scoring_rows(done, 200 if quick else 2000)
    heads = [
        "data",
        "events",
        "train groups",
        "epochs",
        "build s",
        "item2vec s",
        "fit s",
        "examples/s",
        "total s",
        "peak RSS GiB",
        "val NDCG@10",
        "intent AUC",
    ]
    return "\n\n".join(
        [
            "## Dual Sequence ReRanker training" + (" (quick)" if quick else ""),
            "Default model and training configuration (dim 128, 1 layer per encoder, 2 heads; batch 128, "
            "hybrid loss, torch on every core, bf16 autocast where the CPU has native bf16, epochs of at most "
            "100,000 groups); "
            "training data from the offline feature engine (point-in-time), negatives from the serving "
            "candidate stage replayed at each add-to-cart (only add-to-carts it proposed are kept). `build s` "
            "is the training-data build (the replay included), `examples/s` counts example groups (one "
            "add-to-cart with its candidates) per second of training. Intent AUC: P(a validation candidate "
            "of the session's intended category outscores one of another category), 0.5 = chance. Up to "
            f"{epochs} epochs with early stopping (patience 2); the synthetic shop: {synthetic_epochs} "
            f"(`BENCH_SYNTHETIC_EPOCHS`), ~{synthetic_events:,} events asked (`BENCH_SYNTHETIC_EVENTS`).",
            table(heads, rows),
            _targets(rows),
            "### Training-data build, step by step (seconds)",
            "`candidate stage` replays the serving candidate stage at every request (its point-in-time state, "
            "co-visitation lists, popular-item snapshots and proposals); `counters` reads the three real-time "
            "counters for every (request, candidate) pair; the build reuses the stage's sequences and `covisit` "
            "lists of each request's session items (without a stage it reads them itself); `examples` "
            "assembles the columnar examples and their SIGNALS. Peak RSS "
            "is the whole process's so far (the synthetic row includes the taobao run).",
            table(["data", "step", "s"], steps),
            f"### Scoring {N_CANDIDATES} candidates for one request (model trained on taobao)",
            table(["path", "p50 ms", "p99 ms", "p99.9 ms", "n", "x faster than baseline"], scoring),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))
