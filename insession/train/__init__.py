"""Training the Dual Sequence ReRanker: point-in-time data, item2vec, the hybrid loss, the loop, artefacts."""

from insession.train.artefact import Artefact, load_artefact, save_artefact
from insession.train.build import BuildConfig, TrainingData, build, load_events
from insession.train.pipeline import Trained, train_on_events
from insession.train.trainer import TrainConfig, TrainResult, evaluate, fit

__all__ = [
    "Artefact",
    "BuildConfig",
    "TrainConfig",
    "TrainResult",
    "Trained",
    "TrainingData",
    "build",
    "evaluate",
    "fit",
    "load_artefact",
    "load_events",
    "save_artefact",
    "train_on_events",
]
