"""From an event history to a versioned model artefact: build data, pre-train item vectors, fit, save."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from insession.features.declare import FeatureRegistry
from insession.model.reranker import DualSequenceReranker
from insession.train.artefact import CURVE, new_version, save_artefact
from insession.train.build import BuildConfig, TrainingData, build
from insession.train.item2vec import item2vec
from insession.train.plots import plot_curve
from insession.train.trainer import TrainConfig, TrainResult, fit, seed_everything, set_threads


@dataclass
class Trained:
    path: Path  # the artefact's version directory
    data: TrainingData
    result: TrainResult
    seconds: dict[str, float]  # build / item2vec / fit wall time


def train_on_events(
    events: pa.Table,
    out: Path,
    *,
    train_config: TrainConfig | None = None,
    build_config: BuildConfig | None = None,
    registry: FeatureRegistry | None = None,
    item2vec_epochs: int = 2,
    **model_overrides: object,
) -> Trained:
    """The whole of `insession train`: examples, item2vec initialisation, training, artefact + curve."""
    tc = train_config or TrainConfig()
    set_threads(tc.threads)
    seed_everything(tc.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data = build(events, build_config or BuildConfig(seed=tc.seed), registry, progress=tc.progress)
    seconds["build"] = time.perf_counter() - t0
    cfg = data.vocab.config(**model_overrides)
    model = DualSequenceReranker(cfg)
    if item2vec_epochs > 0:
        t0 = time.perf_counter()
        items, sequence = data.item_sequences
        vectors = item2vec(
            items, sequence, cfg.n_items, cfg.dim, epochs=item2vec_epochs, seed=tc.seed, progress=tc.progress
        )
        model.init_item_vectors(vectors)
        seconds["item2vec"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fit(model, data.train, data.val, tc)
    seconds["fit"] = time.perf_counter() - t0
    version = new_version(Path(out))
    metrics = {
        **result.metrics(),
        "train_groups": len(data.train),
        "val_groups": len(data.val),
        "items": cfg.n_items - 1,
        "split_ts": data.split_ts,
        "seconds": seconds,
        "train_config": asdict(tc),
    }
    save_artefact(version, result.model, data.vocab, data.feature_hash, metrics)
    plot_curve(result.epochs, version / CURVE)
    return Trained(version, data, result, seconds)
