"""Model artefacts: a versioned directory with weights, config, vocabulary, feature hash, metrics, curve.

The format lives beside the model so that what serves it (`insession.rank`) and what writes it
(`insession.train`) share it without the server importing the trainer. Error messages name a
version by its directory name, never by where it lives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from insession.model.reranker import SIGNALS, DualSequenceReranker, RerankerConfig
from insession.model.vocab import Vocab

WEIGHTS, CONFIG, VOCAB, FEATURES, METRICS, CURVE = (
    "model.pt",
    "config.json",
    "vocab.json",
    "features.json",
    "metrics.json",
    "curve.png",
)


@dataclass
class Artefact:
    """A trained model ready to serve (eval mode, cold-start rows derived) and what it was trained on."""

    path: Path
    model: DualSequenceReranker
    vocab: Vocab
    feature_hash: str
    metrics: dict


def new_version(out: Path) -> Path:
    """`out/<UTC timestamp>` (with a numeric suffix if that exists already), created."""
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path, n = out / base, 1
    while path.exists():
        path, n = out / f"{base}-{n}", n + 1
    path.mkdir(parents=True)
    return path


def save_artefact(
    version_dir: Path, model: DualSequenceReranker, vocab: Vocab, feature_hash: str, metrics: dict
) -> Path:
    """Write weights, config, vocabulary, feature-declaration hash and metrics into `version_dir`."""
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), version_dir / WEIGHTS)
    (version_dir / CONFIG).write_text(json.dumps(model.cfg.to_dict()))
    vocab.save(version_dir / VOCAB)
    (version_dir / FEATURES).write_text(json.dumps({"feature_hash": feature_hash, "signals": list(SIGNALS)}))
    (version_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    return version_dir


def versions(out: Path) -> list[Path]:
    """`out` itself when it is a version (holds weights), else its version directories, newest first.

    Raises FileNotFoundError when there is none."""
    out = Path(out)
    if (out / WEIGHTS).exists():
        return [out]
    found = sorted((p for p in out.iterdir() if (p / WEIGHTS).exists()), reverse=True) if out.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no model artefact in {out.name!r}")
    return found


def latest_version(out: Path) -> Path:
    """The newest version directory under `out` that holds weights."""
    return versions(out)[0]


def load_artefact(path: Path) -> Artefact:
    """A version directory (or a directory of versions: the newest) -> a model ready to score."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        path = latest_version(path)
    features = json.loads((path / FEATURES).read_text())
    trained = features.get("signals", "of an older version")
    if trained != list(SIGNALS):
        raise ValueError(
            f"model artefact {path.name} was trained on the per-candidate signals {trained}, but this code computes "
            f"{list(SIGNALS)}; retrain it with `insession train`"
        )
    cfg = RerankerConfig(**json.loads((path / CONFIG).read_text()))
    model = DualSequenceReranker(cfg)
    try:
        model.load_state_dict(torch.load(path / WEIGHTS, weights_only=True))
    except RuntimeError as e:  # weights of another network (e.g. before surfaces and queries were inputs)
        raise ValueError(
            f"model artefact {path.name} holds weights of another version of the network ({str(e)[:200]}); "
            "retrain it with `insession train`"
        ) from e
    model.eval()
    return Artefact(
        path=path,
        model=model,
        vocab=Vocab.load(path / VOCAB),
        feature_hash=features["feature_hash"],
        metrics=json.loads((path / METRICS).read_text()) if (path / METRICS).exists() else {},
    )
