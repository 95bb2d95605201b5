"""Benchmark of ranking: model-only encode-once vs naive per-candidate forwards, and `/v1/rank` over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from bench.common import latency_histogram, paced, percentiles_ms, table
from insession.datasets import generate_shop
from insession.embedded import Insession
from insession.model import Batch, DualSequenceReranker, Sequence, Vocab
from insession.model.artefact import new_version, save_artefact
from insession.model.reranker import SIGNALS
from insession.rank.inputs import query_tensor
from insession.rank.onnx import ONNX_FILE, OnnxScorer, export
from insession.serve.process import ServerProcess

N_CANDIDATES, N_HISTORY, N_SESSION = 60, 100, 20
SURFACES = ("home", "search", "pdp", "cart", "checkout")
QUERIES = ("urban running shoes", "running shoes 42", "socks")  # the session's searches, latest first
ENCODE_ONCE, NAIVE = "encode once, eager PyTorch", "naive: one full eager forward per candidate"
ENCODE_ONCE_ORT = "encode once, ONNX Runtime"
HOUR_MS = 3_600_000


def _model(n_items: int, seed: int = 0) -> tuple[DualSequenceReranker, Vocab]:
    """The default model (randomly initialised, seeded) over a vocabulary of n_items in 40 subcategories."""
    ids = [f"i{n}" for n in range(n_items)]
    cats = pa.array([f"c{n % 8}" for n in range(n_items)])
    vocab = Vocab.build(pa.array(ids), cats, pa.array([f"s{n % 40}" for n in range(n_items)]), SURFACES)
    torch.manual_seed(seed)
    # max_history covers the whole 100-event history (the default config keeps the last 50)
    return DualSequenceReranker(vocab.config(max_history=N_HISTORY, max_session=N_SESSION)).eval(), vocab


def _request(vocab: Vocab, rng: np.random.Generator) -> tuple[Sequence, Sequence, torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    now = 1_788_220_800_000

    def side(n: int, span_h: float) -> Sequence:
        items = torch.from_numpy(rng.integers(1, vocab.n_items, (1, n)))
        actions = torch.from_numpy(rng.choice([1, 2, 4], (1, n), p=[0.8, 0.15, 0.05]))
        ts = torch.from_numpy(np.sort(now - (rng.random((1, n)) * span_h * HOUR_MS).astype(np.int64)))
        return Sequence(items, actions, ts)

    cands = torch.from_numpy(rng.integers(1, vocab.n_items, N_CANDIDATES))
    counters = torch.from_numpy(rng.integers(0, 50, (N_CANDIDATES, 3)).astype(np.float32))
    return side(N_HISTORY, 24 * 30), side(N_SESSION, 0.5), torch.tensor([now]), cands, counters


def _request_context(vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's surface and its session's search queries, as the service builds them."""
    return torch.from_numpy(vocab.surface_index(["search"])), query_tensor(QUERIES)


def _time(fn: object, n: int, desc: str) -> list[float]:
    out = []
    for _ in tqdm(range(n), desc=desc, leave=False):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def model_latency(quick: bool) -> str:
    model, vocab = _model(20_000)
    rng = np.random.default_rng(0)
    history, session, now, cands, counters = _request(vocab, rng)
    surface, queries = _request_context(vocab)
    signals = torch.rand(N_CANDIDATES, len(SIGNALS), generator=torch.Generator().manual_seed(0))
    n_fast, n_naive = (200, 10) if quick else (3_000, 100)

    def encode_once() -> torch.Tensor:
        enc = model.encode(history, session, now, surface, queries)
        return model.score(enc, cands, counters, signals=signals)  # type: ignore[return-value]

    def naive() -> list[torch.Tensor]:  # one full forward (both encoders + scoring) per candidate
        return [model(Batch(history, session, now, cands[c].view(1, 1), counters[c].view(1, 1, -1),
                            torch.zeros(1, 1), signals[c].view(1, 1, -1), surface, queries))
                for c in range(N_CANDIDATES)]

    with tempfile.TemporaryDirectory() as tmp:
        print("bench_rank: exporting the model to ONNX")
        export(model, Path(tmp) / ONNX_FILE)
        onnx = OnnxScorer(Path(tmp), threads=1)

    def encode_once_ort() -> np.ndarray:
        return onnx(history, session, now, surface, queries, cands, counters, signals)[0]

    rows = []
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, list[float]] = {}
    with torch.inference_mode():
        fast = encode_once()
        slow = torch.cat([s.view(-1) for s in naive()])
        max_diff = float((fast - slow).abs().max())
        max_diff_ort = float(np.abs(encode_once_ort() - fast.numpy()).max())
        # the serving setting is 1 thread (RankConfig.torch_threads) and ORT; the others for reference
        for threads, name, fn, n in ((1, ENCODE_ONCE_ORT, encode_once_ort, n_fast),
                                     (1, ENCODE_ONCE, encode_once, n_fast), (1, NAIVE, naive, n_naive),
                                     (2, ENCODE_ONCE, encode_once, n_fast // 4)):
            torch.set_num_threads(threads)
            _time(fn, max(3, n // 20), f"warm {name}")
            samples[f"{name}/{threads}"] = _time(fn, n, f"{name} ({threads} thread)")
            p = percentiles_ms(samples[f"{name}/{threads}"])
            results[f"{name}/{threads}"] = p
            rows.append([name, threads, p["n"], p["p50"], p["p99"], p["mean"]])
    slow_p = results[f"{NAIVE}/1"]
    ratio = [[name, slow_p["p50"] / results[f"{name}/1"]["p50"], slow_p["p99"] / results[f"{name}/1"]["p99"]]
             for name in (ENCODE_ONCE_ORT, ENCODE_ONCE)]
    return "\n\n".join([
        f"### Model only: {N_CANDIDATES} candidates, {N_HISTORY}-event history, {N_SESSION}-event session, "
        f"{len(QUERIES)} search queries, a surface",
        f"Default model (dim {model.cfg.dim}, {model.cfg.n_layers} layer(s) per encoder, "
        f"{model.cfg.n_heads} heads, {vocab.n_items - 1:,} items), CPU. Eager PyTorch runs under "
        "torch.inference_mode; ONNX Runtime runs the same encode-once graph exported with torch.export (the "
        f"service's default backend). Largest score difference from the naive path: eager {max_diff:.2e}, "
        f"ORT {max_diff_ort:.2e}.",
        table(["path", "threads", "n", "p50 ms", "p99 ms", "mean ms"], rows),
        table(["encode-once path, 1 thread", "naive / encode-once (p50)", "naive / encode-once (p99)"],
              ratio),
        latency_histogram("bench_rank_model", f"Model only, {N_CANDIDATES} candidates (1 thread)",
                          {name: samples[f"{name}/1"] for name in (ENCODE_ONCE_ORT, ENCODE_ONCE, NAIVE)}),
    ])


def _fill(data_dir: Path, quick: bool) -> list[str]:
    """A synthetic shop ingested into `data_dir`, and a seeded random model artefact beside it."""
    shop = generate_shop(n_users=300 if quick else 2_000, n_items=1_500 if quick else 5_000,
                         days=5 if quick else 14, seed=7)
    with Insession(data_dir, maintenance_interval_s=None) as db:
        db.insert("items", list(shop.items))
        events = shop.iter_events()
        users: set[str] = set()
        with tqdm(desc="ingest shop", unit="ev", leave=False) as bar:
            while chunk := list(islice(events, 10_000)):
                db.insert("events", chunk)
                users.update(str(e["user_id"]) for e in chunk)
                bar.update(len(chunk))
        cat = db.catalog.to_arrow()
        vocab = Vocab.build(cat["item_id"], cat["category"], cat["subcategory"])
        torch.manual_seed(0)
        model = DualSequenceReranker(vocab.config()).eval()
        digest = db.features.registry.hash()
        version = save_artefact(new_version(data_dir / "models"), model, vocab, digest, {})
        export(model, version / ONNX_FILE)  # what the server would do in the background at its first load
    return sorted(users)


def _load(port: int, users: list[str], rate: float, seconds: float) -> tuple[
        list[float], Counter[str], dict[str, list[float]], float]:
    """Open-loop `/v1/rank` load (`bench.common.paced`) for random users; what answered and the server's
    own stage timings come from the response bodies."""
    rng = np.random.default_rng(1)
    bodies = [json.dumps({"user_id": users[int(i)], "k": 20}).encode()
              for i in rng.integers(len(users), size=int(rate * seconds))]
    answers: list[bytes] = []
    lat, errors, _, elapsed = asyncio.run(paced(port, "/v1/rank", bodies, rate, seconds, answers))
    outcomes: Counter[str] = Counter()
    stages: dict[str, list[float]] = {}
    for raw in answers:
        body = json.loads(raw)
        outcomes[body.get("fallback_reason") or ("model" if "items" in body else "error")] += 1
        for stage, ms in body.get("timings_ms", {}).items():
            stages.setdefault(stage, []).append(ms / 1000.0)
    if errors:
        outcomes["HTTP error"] = errors
    return lat, outcomes, stages, len(lat) / elapsed


def http_latency(quick: bool, rate: float = 200.0) -> str:
    seconds = 5.0 if quick else 60.0
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        users = _fill(data_dir, quick)
        with ServerProcess(data_dir) as srv:
            deadline = time.monotonic() + 120
            while True:  # the server loads the (pre-exported) ONNX graph on a background thread
                model = httpx.get(srv.url + "/v1/admin/model")
                if model.status_code != 200:
                    raise RuntimeError(f"the server serves no model: {model.status_code} {model.text}")
                backend = model.json()["backend"]
                if backend == "onnx" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for u in users[:50]:  # warm-up: connections, model threads, popular lists
                httpx.post(srv.url + "/v1/rank", json={"user_id": u, "k": 20})
            lat, outcomes, stages, achieved = _load(srv.port, users, rate, seconds)
    p = percentiles_ms(lat)
    return "\n\n".join([
        f"### `/v1/rank` over HTTP: {rate:.0f} requests/s for {seconds:.0f} s (achieved {achieved:.0f}/s)",
        "A client in a second process (this one: a bare HTTP/1.1 client on asyncio streams over 16 keep-alive "
        "connections, open loop: each request leaves when it is due and its latency counts from then) against "
        "`insession serve` on loopback; no candidates given, so each "
        "request runs the candidate stage (~60 items), the model (random weights, default config, backend "
        f"{backend}) and hygiene; budget 25 ms. No ingest and no snapshot run during the measurement: "
        "`bench_mixed` measures ranking while ingest, snapshots and analytics run.",
        table(["n", "p50 ms", "p99 ms", "p99.9 ms", "mean ms"],
              [[p["n"], p["p50"], p["p99"], p["p99.9"], p["mean"]]]),
        "Answered by: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + ". Inside the "
        "server (the response's `timings_ms`): features = shopper features, candidate stage and counters; "
        "model = queue + model thread; total excludes HTTP.",
        table(["server stage", "p50 ms", "p99 ms", "p99.9 ms"],
              [[name, p["p50"], p["p99"], p["p99.9"]] for name, p in
               ((name, percentiles_ms(v)) for name, v in stages.items())]),
        latency_histogram(f"bench_rank_http_{rate:.0f}", f"/v1/rank at {rate:.0f} requests/s: client latency and "
                          "server stages", {"client (end to end)": lat, **{f"server {k}": v for k, v in
                                                                          stages.items() if k in ("features",
                                                                                                  "model")}}),
    ])


def run(quick: bool) -> str:
    print("bench_rank: model-only latency")
    parts = ["## Ranking", model_latency(quick)]
    for rate in (200.0, 400.0):  # the rate, then twice that (headroom)
        print(f"bench_rank: /v1/rank over HTTP at {rate:.0f}/s")
        parts.append(http_latency(quick, rate))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small and short (seconds, not minutes)")
    args = ap.parse_args()
    print(run(args.quick))
