"""The training loop: bucketed prefetched batches, validation NDCG@10, early stopping, seeds, curves."""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from insession.model.reranker import DualSequenceReranker
from insession.model.vocab import Vocab
from insession.train.examples import Examples, bucketed_batches, prefetch
from insession.train.loss import LossWeights, descend, hybrid_loss
from insession.train.pretrain import PretrainConfig, PretrainLog


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 2  # epochs without a better validation NDCG@10 before stopping
    seed: int = 0
    # intra-op threads, 0 = torch's default: every core unless OMP_NUM_THREADS says otherwise (the build is
    # over when fitting starts; on a machine shared with other jobs, 1 avoids thrashing: 2 threads ran 14x
    # slower beside another job on 2 cores)
    threads: int = 0
    # bf16 autocast for the training passes (weights, optimiser and validation stay float32); None: on when
    # the CPU multiplies bf16 natively (AVX512-BF16/AMX), where it measured 2.1x faster per batch
    bf16: bool | None = None
    # an epoch is at most this many groups, drawn from a shuffled cycle through all of them (every group is
    # seen once before any is seen twice): validation, early stopping and the curve stay frequent on big shops
    epoch_groups: int | None = 100_000
    loss: LossWeights = field(default_factory=LossWeights)
    # pre-training of the item table and both encoders on every training-period interaction (masked or next
    # items, `PretrainConfig.objective`), before fitting (`insession.train.pretrain`); epochs 0 (the default) is off
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    progress: bool = True


@dataclass
class EpochLog:
    epoch: int
    groups: int  # example groups trained on in this epoch
    train_loss: float
    val_ndcg10: float
    val_hit10: float
    seconds: float
    examples_per_s: float


@dataclass
class TrainResult:
    model: DualSequenceReranker  # the best epoch's weights, in eval mode
    epochs: list[EpochLog]
    best_epoch: int
    pretrain: list[PretrainLog] = field(default_factory=list)  # the pre-training epochs before fitting, if any

    def metrics(self) -> dict:
        best = self.epochs[self.best_epoch - 1] if self.epochs else None
        return {
            "best_epoch": self.best_epoch,
            "pretrain": [asdict(p) for p in self.pretrain],
            "val_ndcg10": best.val_ndcg10 if best else float("nan"),
            "val_hit10": best.val_hit10 if best else float("nan"),
            "epochs": [asdict(e) for e in self.epochs],
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# torch's own choice at import: every core, or OMP_NUM_THREADS where the environment sets it (the test
# suite's workers run with 1 beside each other, tests/conftest.py)
DEFAULT_THREADS = torch.get_num_threads()


def set_threads(threads: int) -> None:
    """Intra-op threads for the matmuls; 0 = torch's default (`DEFAULT_THREADS`), else at most every core."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(DEFAULT_THREADS if threads <= 0 else min(threads, cores))


def use_bf16(flag: bool | None) -> bool:
    """Whether training passes run under bf16 autocast: `flag`, or (None) whether the CPU has native bf16."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if flag is None else flag


def epoch_orders(n: int, epoch_groups: int | None, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The group indices of each epoch: all n (shuffled) when epoch_groups is None or >= n, else consecutive
    `epoch_groups`-long slices of shuffled passes over range(n), so every group is seen once per pass."""
    size = n if epoch_groups is None else min(epoch_groups, n)
    queue = np.zeros(0, np.int64)
    while True:
        while len(queue) < size:
            queue = np.concatenate([queue, rng.permutation(n)])
        yield queue[:size]
        queue = queue[size:]


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per group [B, 2]: NDCG@k and hit@k of the labelled candidates among the valid ones (ties lose)."""
    s = scores.masked_fill(~mask, float("-inf"))
    pos = (labels > 0) & mask
    # rank of each positive = number of valid candidates scoring at least as high, other than itself
    higher = ((s.unsqueeze(1) >= s.unsqueeze(2)) & mask.unsqueeze(1)).sum(-1) - 1  # [B, C]
    gain = torch.where(pos & (higher < k), 1.0 / torch.log2(higher.float() + 2.0), 0.0).sum(-1)
    n_pos = pos.sum(-1)
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(k).float() + 2.0), 0)[(n_pos.clamp(1, k) - 1)]
    ndcg = gain / ideal.clamp(min=1e-9)
    hit = (pos & (higher < k)).any(-1).float()
    return torch.stack([ndcg, hit], -1)[n_pos > 0]


@torch.no_grad()
def evaluate(model: DualSequenceReranker, examples: Examples, batch_size: int = 256) -> dict[str, float]:
    """Mean NDCG@10 and hit@10 over the example groups, each ranking its own candidate list."""
    model.eval()
    rows = []
    for batch in prefetch(examples, bucketed_batches(examples.lengths(), batch_size, None), model.cfg):
        rows.append(ranking_metrics(model(batch), batch.labels, batch.candidates != 0))
    m = torch.cat(rows).mean(0) if rows else torch.full((2,), float("nan"))
    return {"ndcg10": float(m[0]), "hit10": float(m[1])}


@torch.no_grad()
def category_auc(model: DualSequenceReranker, examples: Examples, vocab: Vocab, targets: list[str | None]) -> float:
    """How well scores put the candidates of a target category (e.g. the session's known intent) above the
    others: per group, P(a target-category candidate outscores a non-target one), averaged over groups that
    hold both. 0.5 is chance. `targets[g]` is group g's category (None: skip the group)."""
    model.eval()
    aucs = []
    for idx in bucketed_batches(examples.lengths(), 256, None):
        batch = examples.collate(idx, model.cfg)
        scores = model(batch)
        for row, g in enumerate(idx.tolist()):
            n = int((batch.candidates[row] != 0).sum())
            if targets[g] is None:
                continue
            hit = np.array([c == targets[g] for c in vocab.category_of(batch.candidates[row, :n].numpy())])
            if hit.all() or not hit.any():
                continue
            s = scores[row, :n].numpy()
            aucs.append(float((s[hit][:, None] > s[~hit][None, :]).mean()))
    return float(np.mean(aucs)) if aucs else float("nan")


def finetune_optimizer(
    model: DualSequenceReranker, tc: TrainConfig, pretrained: Collection[nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over every parameter of `model` at `tc.lr`; the `pretrained` ones (what pre-training fitted,
    `insession.train.pretrain.pretrained_parameters`) in a second group at `tc.lr` x
    `tc.pretrain.finetune_lr_scale`. Without `pretrained`, one group, exactly the optimiser of before."""
    ids = {id(p) for p in pretrained}
    groups: list[dict] = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if pretrained:
        groups.append({"params": list(pretrained), "lr": tc.lr * tc.pretrain.finetune_lr_scale})
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def fit(
    model: DualSequenceReranker,
    train: Examples,
    val: Examples,
    tc: TrainConfig,
    pretrained: Collection[nn.Parameter] = (),
) -> TrainResult:
    """Train with AdamW on the hybrid loss; keep the weights of the best validation NDCG@10.

    `pretrained`: the parameters a pre-training fitted (empty when none ran). They learn at
    `tc.pretrain.finetune_lr_scale` times the rate (`finetune_optimizer`) and are frozen (no gradient, so
    AdamW leaves them and their moments untouched, weight decay included) during the first
    `tc.pretrain.freeze_epochs` epochs; every parameter is trainable again when `fit` returns."""
    seed_everything(tc.seed)
    set_threads(tc.threads)
    rng = np.random.default_rng(tc.seed)
    opt = finetune_optimizer(model, tc, pretrained)
    logs: list[EpochLog] = []
    best, best_state, stale = -1.0, copy.deepcopy(model.state_dict()), 0
    lengths = train.lengths()
    bf16 = use_bf16(tc.bf16)
    orders = epoch_orders(len(train), tc.epoch_groups, rng)
    for epoch in range(1, tc.epochs + 1):
        model.train()
        for p in pretrained:
            p.requires_grad_(epoch > tc.pretrain.freeze_epochs)
        t0 = time.perf_counter()
        chosen = next(orders)
        batches = [chosen[b] for b in bucketed_batches(lengths[chosen], tc.batch_size, rng)]
        total, n = 0.0, 0
        bar = tqdm(
            prefetch(train, batches, model.cfg),
            total=len(batches),
            desc=f"epoch {epoch}",
            disable=not tc.progress,
            leave=False,
        )
        for batch in bar:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = hybrid_loss(model, batch, tc.loss)
            descend(opt, loss, model)
            total += float(loss.detach()) * len(batch)
            n += len(batch)
            bar.set_postfix(loss=f"{total / n:.4f}")
        seconds = time.perf_counter() - t0
        val_metrics = evaluate(model, val)
        logs.append(
            EpochLog(
                epoch,
                n,
                total / max(n, 1),
                val_metrics["ndcg10"],
                val_metrics["hit10"],
                seconds,
                n / seconds if seconds > 0 else 0.0,
            )
        )
        if tc.progress:
            tqdm.write(
                f"epoch {epoch}: loss {total / max(n, 1):.4f}  val NDCG@10 {val_metrics['ndcg10']:.4f}  "
                f"{n / seconds:,.0f} examples/s"
            )
        if val_metrics["ndcg10"] > best or (len(val) == 0):  # no validation groups: keep the latest
            best, best_state, stale = val_metrics["ndcg10"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= tc.patience:
                break
    for p in pretrained:
        p.requires_grad_(True)
    model.load_state_dict(best_state)
    model.eval()
    best_epoch = max(range(len(logs)), key=lambda i: logs[i].val_ndcg10) + 1 if logs else 0
    return TrainResult(model, logs, best_epoch)
