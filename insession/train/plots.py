"""The training-curve figure: training loss and validation NDCG@10 per epoch (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from insession.train.trainer import EpochLog  # noqa: E402


def plot_curve(epochs: list[EpochLog], path: Path, title: str = "Dual Sequence ReRanker") -> Path:
    """Write a PNG with loss (left axis) and validation NDCG@10 (right axis) per epoch."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    x = [e.epoch for e in epochs]
    ax.plot(x, [e.train_loss for e in epochs], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [e.val_ndcg10 for e in epochs], "s-", color="tab:orange", label="validation NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:orange")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
