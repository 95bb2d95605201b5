"""Training the Dual Sequence ReRanker: point-in-time data, item2vec, the hybrid loss, the loop, artefacts."""

from insession.model.artefact import Artefact, load_artefact, save_artefact
from insession.train.build import BuildConfig, Proposer, TrainingData, assemble_examples, build, load_events
from insession.train.pipeline import Trained, pretrain_vectors, train_model, train_on_events
from insession.train.trainer import TrainConfig, TrainResult, evaluate, fit

__all__ = [
    "Artefact",
    "BuildConfig",
    "Proposer",
    "TrainConfig",
    "TrainResult",
    "Trained",
    "TrainingData",
    "assemble_examples",
    "build",
    "evaluate",
    "fit",
    "load_artefact",
    "load_events",
    "pretrain_vectors",
    "save_artefact",
    "train_model",
    "train_on_events",
]
