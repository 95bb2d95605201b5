"""Sequential recommenders trained as the field trains them, scored on the evaluation's candidate lists.

Issue 20: SASRec and GRU4Rec learn next-item prediction from **every interaction** (views, add-to-carts,
favourites, purchases) of the period before the one they rank, with a full-softmax cross-entropy over the
catalogue at every position, sequences of at most 50 items, and early stopping on a held-out tail of that
period (the last `holdout` share of its time span: the model trains on the interactions before it and stops
when the next-item NDCG@10 over the whole catalogue on the tail stops improving). This is unlike the
`insession.evaluate.neural` variants, which see only the add-to-cart example groups (458 on Taobao).

Contracts:
- `Interactions.of(events, end_ts)`: only events with ts < end_ts enter (point-in-time; validation requests
  are ranked by a model fitted before the validation period, test requests by one fitted before the test
  period). The vocabulary is the items that occur as training targets (before the held-out tail); an item
  outside it is *unknown* to the model.
- `request_sequence(history, session)`: the one model input at ranking time, built from the served
  `history_seq` + `session_seq` features (the shopper's latest interactions, oldest first), exactly what the
  ranking service holds; its newest `max_len` known items are the model's input.
- `score_lists`: a candidate scores by the model's logit; an unknown candidate scores `UNKNOWN` (below any
  logit), so the model is given no credit for items it never saw (ties count against the positive).
- `hybrid_scores`: the best sequential model for the items it knows, shopper recency for the items it does
  not (one list; the mix tuned on validation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn
from tqdm import tqdm

from insession.model.sequential import SEQUENTIAL
from insession.train.replay import CandidateSets

UNKNOWN = -1e6  # score of a candidate outside the model's vocabulary


@dataclass
class SeqConfig:
    """The published settings (SASRec: 2 blocks, 1 head, hidden 64, length 50); dropout and learning rate
    are the grid tuned on validation (`SEQ_GRID`)."""

    dim: int = 64
    layers: int = 2  # SASRec blocks; GRU4Rec uses 1 GRU layer, as published
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 64  # windows per step
    max_epochs: int = 40
    patience: int = 3  # epochs without a better held-out NDCG@10 before stopping
    holdout: float = 0.1  # share of the fitting period's time span held out at its end for early stopping
    holdout_max: int = 3000  # held-out targets evaluated per epoch (a fixed, seeded subsample)


# Tuned on validation (first seed): dropout 0.2 (dense data) and 0.5 (sparse data) are SASRec's two published
# values; two learning rates.
SEQ_GRID: tuple[dict[str, float], ...] = tuple({"dropout": p, "lr": lr} for p in (0.2, 0.5) for lr in (1e-3, 3e-3))


@dataclass
class Interactions:
    """Every interaction before `end_ts`, per shopper in log order, as item indices (0: not in the vocabulary)."""

    vocab: dict[str, int]  # item -> 1..V: the items that occur as training targets
    seqs: list[np.ndarray]  # per shopper, item index of each interaction
    times: list[np.ndarray]  # per shopper, ts of each interaction
    tail_start: int  # interactions at or after it are held out (early stopping)
    end_ts: int

    @classmethod
    def of(cls, events: pa.Table, end_ts: int, holdout: float = 0.1) -> Interactions:
        ev = events.filter(pc.less(events["ts"], end_ts)).sort_by([("offset", "ascending")])
        users = ev["user_id"].to_numpy(zero_copy_only=False)
        items = ev["item_id"].to_numpy(zero_copy_only=False)
        ts = ev["ts"].to_numpy()
        lo = int(ts.min()) if len(ts) else end_ts
        tail_start = end_ts - int((end_ts - lo) * holdout)
        train_items = np.unique(items[ts < tail_start])
        vocab = {str(it): j + 1 for j, it in enumerate(train_items.tolist())}
        idx = np.array([vocab.get(str(it), 0) for it in items], np.int64)
        _, u = np.unique(users, return_inverse=True)
        order = np.argsort(u, kind="stable")  # per shopper, log order kept
        bounds = np.flatnonzero(np.diff(u[order])) + 1
        seqs = np.split(idx[order], bounds) if len(order) else []
        times = np.split(ts[order], bounds) if len(order) else []
        return cls(vocab, seqs, times, tail_start, end_ts)

    def windows(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Training windows over the interactions before the tail: (inputs, targets) [N, max_len], left-padded;
        every interaction after a shopper's first is a target exactly once, with up to max_len items before it."""
        xs, ys = [], []
        for s, t in zip(self.seqs, self.times, strict=True):
            arr = s[t < self.tail_start]
            for end in range(len(arr), 1, -max_len):
                w = arr[max(0, end - max_len - 1) : end]
                x, y = np.zeros(max_len, np.int64), np.zeros(max_len, np.int64)
                x[max_len - len(w) + 1 :], y[max_len - len(w) + 1 :] = w[:-1], w[1:]
                xs.append(x)
                ys.append(y)
        if not xs:
            return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
        return np.stack(xs), np.stack(ys)

    def held_out(self, max_len: int, limit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Next-item cases of the tail whose target is known: (inputs [N, max_len] left-padded, targets [N])."""
        xs, ys = [], []
        for s, t in zip(self.seqs, self.times, strict=True):
            for j in np.flatnonzero((t >= self.tail_start) & (s > 0)).tolist():
                prev = s[:j]
                xs.append(left_pad(prev[prev > 0][-max_len:], max_len))
                ys.append(s[j])
        if not xs:
            return np.zeros((0, max_len), np.int64), np.zeros(0, np.int64)
        x, y = np.stack(xs), np.array(ys, np.int64)
        keep = np.random.default_rng(seed).permutation(len(y))[:limit]
        return x[np.sort(keep)], y[np.sort(keep)]


def left_pad(items: np.ndarray, max_len: int) -> np.ndarray:
    """The last max_len items, right-aligned after zero padding (0 = no item)."""
    out = np.zeros(max_len, np.int64)
    items = items[-max_len:]
    if len(items):
        out[max_len - len(items) :] = items
    return out


def request_sequence(history: list[dict] | None, session: list[dict] | None) -> list[str]:
    """The model input at a request: the served history then session items, oldest first (every action)."""
    return [e["item_id"] for e in (history or [])] + [e["item_id"] for e in (session or [])]


def build_model(kind: str, n_items: int, cfg: SeqConfig) -> nn.Module:
    if kind == "sasrec":
        return SEQUENTIAL[kind](n_items, cfg.dim, cfg.layers, 1, cfg.max_len, cfg.dropout)
    return SEQUENTIAL[kind](n_items, cfg.dim, 1, cfg.max_len, cfg.dropout)


@torch.no_grad()
def catalogue_ndcg10(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Mean next-item NDCG@10 over the whole vocabulary (ties count against the target)."""
    model.eval()
    total = 0.0
    for i in range(0, len(y), batch):
        xb, yb = torch.from_numpy(x[i : i + batch]), torch.from_numpy(y[i : i + batch])
        logits = model.logits(model(xb)[:, -1])
        logits[:, 0] = -torch.inf
        target = logits.gather(1, yb[:, None])
        rank = (logits >= target).sum(1) - 1
        total += float(torch.where(rank < 10, 1.0 / torch.log2(rank.double() + 2.0), 0.0).sum())
    return total / max(len(y), 1)


@dataclass
class SeqFit:
    model: nn.Module
    vocab: dict[str, int]
    cfg: SeqConfig
    best_epoch: int
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, held-out NDCG@10


def fit_sequential(kind: str, data: Interactions, cfg: SeqConfig, seed: int = 0, progress: bool = True) -> SeqFit:
    """Full-softmax next-item training on every window; the state of the best held-out epoch is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = data.windows(cfg.max_len)
    hx, hy = data.held_out(cfg.max_len, cfg.holdout_max, seed=0)
    model = build_model(kind, len(data.vocab), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    best, best_epoch, best_state, stale = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    curve: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{kind} (next item)", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(x))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            xb, yb = torch.from_numpy(x[b]), torch.from_numpy(y[b])
            loss = next_item_loss(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        score = catalogue_ndcg10(model, hx, hy)
        curve.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_ndcg10": score})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", held_out_ndcg10=f"{score:.4f}")
        if progress:
            tqdm.write(f"{kind} epoch {epoch}: loss {curve[-1]['loss']:.3f}, held-out NDCG@10 {score:.4f}")
        if score > best:
            best, best_epoch, best_state, stale = score, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return SeqFit(model.eval(), data.vocab, cfg, best_epoch, curve)


def next_item_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of every target position over the whole vocabulary (padding never a class)."""
    h = model(x)
    keep = y > 0
    # the [targets, catalogue] product is nearly all of the cost: bfloat16 runs it ~3x faster on this CPU
    # (AVX-512 BF16); the loss itself is computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(h[keep])
    logits = logits.float()
    logits[:, 0] = -torch.inf
    return nn.functional.cross_entropy(logits, y[keep])


@torch.no_grad()
def score_lists(fit: SeqFit, sets: CandidateSets, rows: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Each request's candidate scores from its served sequence (`request_sequence`), in list order."""
    fit.model.eval()
    hist = sets.state["history_seq"].to_pylist()
    sess = sets.state["session_seq"].to_pylist()
    L = fit.cfg.max_len
    out: list[np.ndarray] = []
    rows_l = rows.tolist()
    for i in range(0, len(rows_l), batch):
        chunk = rows_l[i : i + batch]
        x = np.stack(
            [
                left_pad(
                    np.array(
                        [j for j in (fit.vocab.get(it, 0) for it in request_sequence(hist[r], sess[r])) if j], np.int64
                    ),
                    L,
                )
                for r in chunk
            ]
        )
        state = fit.model(torch.from_numpy(x))[:, -1]
        for k, r in enumerate(chunk):
            cand = np.array([fit.vocab.get(it, 0) for it in sets.lists[r]], np.int64)
            s = (state[k] @ fit.model.item.weight[torch.from_numpy(cand)].T).double().numpy()
            out.append(np.where(cand > 0, s, UNKNOWN))
    return out


def known_mask(vocab: dict[str, int], sets: CandidateSets, rows: np.ndarray) -> np.ndarray:
    """Whether each request's positive is in the model's vocabulary (it saw the item as a training target)."""
    pos = sets.requests["item_id"].to_pylist()
    return np.array([pos[r] in vocab for r in rows.tolist()], bool)


def hybrid_scores(
    model_scores: list[np.ndarray], recency: list[np.ndarray], pop: list[np.ndarray], p: dict[str, float]
) -> list[np.ndarray]:
    """One list from two rankers: a known candidate scores its softmax share among the list's known
    candidates (in [0, 1]); every unknown candidate scores `weight` * shopper recency (in [0, 1]); with
    `recency_on_known` the known ones get that recency term too; `tie` * log1p(28-day count) breaks ties."""
    out = []
    for s, r, q in zip(model_scores, recency, pop, strict=True):
        known = s > UNKNOWN
        share = np.zeros(len(s))
        if known.any():
            z = s[known] - s[known].max()
            share[known] = np.exp(z) / np.exp(z).sum()
        rec = p["weight"] * r * (np.ones(len(s)) if p["recency_on_known"] else ~known)
        out.append(share + rec + p["tie"] * np.log1p(q))
    return out


HYBRID_GRID: tuple[dict[str, float], ...] = tuple(
    {"weight": w, "recency_on_known": k, "tie": t} for w in (0.1, 0.3, 1.0, 3.0) for k in (0, 1) for t in (0.0, 1e-3)
)
