"""From an event history to a versioned model artefact: build data, pre-train item vectors, fit, save."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch

from insession.features.declare import FeatureRegistry
from insession.model.artefact import CURVE, new_version, save_artefact
from insession.model.reranker import DualSequenceReranker
from insession.offline import OfflineEngine
from insession.train.build import BuildConfig, Proposer, TrainingData, build
from insession.train.item2vec import item2vec
from insession.train.plots import plot_curve
from insession.train.pretrain import pretrain, pretrained_parameters
from insession.train.trainer import TrainConfig, TrainResult, fit, seed_everything, set_threads, use_bf16


@dataclass
class Trained:
    path: Path  # the artefact's version directory
    data: TrainingData
    result: TrainResult
    seconds: dict[str, float]  # build / item2vec / fit wall time


def pretrain_vectors(data: TrainingData, dim: int, epochs: int, seed: int, progress: bool = True) -> torch.Tensor:
    """Item2vec vectors [n_items, dim] learnt on the training period's sessions (the item table's init)."""
    s = data.stream
    return item2vec(s.items, s.session, data.vocab.n_items, dim, epochs=epochs, seed=seed, progress=progress)


def train_model(
    data: TrainingData,
    tc: TrainConfig,
    vectors: torch.Tensor | None = None,
    **model_overrides: object,
) -> TrainResult:
    """The training step: a reranker sized by the data's vocabulary (+ overrides), initialised from
    `vectors` when given, pre-trained on every training-period interaction when `tc.pretrain.epochs` > 0
    (masked or next items, `insession.train.pretrain`), then fitted with early stopping on the data's validation
    groups (the pre-trained parameters at `tc.pretrain`'s fine-tuning rate and frozen epochs, if it ran)."""
    set_threads(tc.threads)
    seed_everything(tc.seed)
    model = DualSequenceReranker(data.vocab.config(**model_overrides))
    if vectors is not None:
        model.init_item_vectors(vectors)
    logs = pretrain(
        model, data.stream, data.vocab.unknown, tc.pretrain, seed=tc.seed, bf16=use_bf16(tc.bf16), progress=tc.progress
    )
    result = fit(model, data.train, data.val, tc, pretrained_parameters(model) if logs else ())
    result.pretrain = logs
    return result


def train_on_events(
    events: pa.Table,
    out: Path,
    *,
    train_config: TrainConfig | None = None,
    build_config: BuildConfig | None = None,
    registry: FeatureRegistry | None = None,
    proposer: Proposer | None = None,
    item2vec_epochs: int = 2,
    engine: OfflineEngine | None = None,
    **model_overrides: object,
) -> Trained:
    """The whole of `insession train`: the data step (`build`, its features from `engine`: DuckDB by
    default), item2vec, the training step, artefact + curve."""
    tc = train_config or TrainConfig()
    set_threads(tc.threads)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data = build(
        events,
        build_config or BuildConfig(seed=tc.seed),
        registry,
        progress=tc.progress,
        proposer=proposer,
        engine=engine,
    )
    seconds["build"] = time.perf_counter() - t0
    cfg = data.vocab.config(**model_overrides)
    vectors = None
    if item2vec_epochs > 0:
        t0 = time.perf_counter()
        vectors = pretrain_vectors(data, cfg.dim, item2vec_epochs, tc.seed, tc.progress)
        seconds["item2vec"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_model(data, tc, vectors, **model_overrides)
    seconds["pretrain"] = sum(p.seconds for p in result.pretrain)
    seconds["fit"] = time.perf_counter() - t0 - seconds["pretrain"]
    version = new_version(Path(out))
    metrics = {
        **result.metrics(),
        "train_groups": len(data.train),
        "val_groups": len(data.val),
        "items": cfg.n_items - 1,
        "split_ts": data.split_ts,
        "candidate_stage_negatives": proposer is not None,
        "seconds": seconds,
        "train_config": asdict(tc),
    }
    save_artefact(version, result.model, data.vocab, data.feature_hash, metrics)
    plot_curve(result.epochs, version / CURVE)
    return Trained(version, data, result, seconds)
