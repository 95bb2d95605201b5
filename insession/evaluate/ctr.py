"""DIN and BST trained as the CTR models they were published as, on impressions built from the views.

Taobao's sample has no impression log, so impressions are built from the views (issue 20), the way DIN's
public benchmarks build them from review or rating logs:

- **positive**: every view of the fitting period (an item the shopper clicked, i.e. opened);
- **negatives**: `negatives` items per view drawn at random, in proportion to their view count in the
  fitting period (popular items are the ones a shop shows most, so they stand in for shown-but-not-opened
  impressions); an item equal to the viewed one is redrawn;
- **behaviour sequence**: the shopper's interactions (every action) strictly before the view, oldest first,
  the newest `max_len` (DIN: 50; BST: 20, as in its paper), from the same `request_sequence` input at ranking;
- each item is its id embedding plus its category's embedding (goods_id + cate_id in both papers), so an
  item outside the vocabulary still scores through its category.

Training: binary cross-entropy; early stopping on the AUC of the impressions of the held-out tail of the
fitting period (its last `holdout` share of time). A candidate of an evaluation list scores by its logit.
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

from insession.evaluate.sequential import left_pad, request_sequence
from insession.train.replay import CandidateSets


@dataclass
class CtrConfig:
    dim: int = 32
    negatives: int = 4
    lr: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 8
    patience: int = 2
    holdout: float = 0.1
    holdout_max: int = 20_000  # held-out impressions evaluated per epoch (seeded subsample)


MAX_LEN = {"din": 50, "bst": 20}


class DINCtr(nn.Module):
    """DIN (Zhou et al. 2018): local activation unit over the behaviours, unnormalised weighted sum, MLP."""

    def __init__(self, n_items: int, n_cats: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.cat = nn.Embedding(n_cats + 1, dim, padding_idx=0)
        self.att = nn.Sequential(nn.Linear(4 * dim, 36), nn.Sigmoid(), nn.Linear(36, 1))
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 80), nn.PReLU(), nn.Linear(80, 40), nn.PReLU(), nn.Linear(40, 1))

    def embed(self, items: Tensor, cats: Tensor) -> Tensor:
        return self.item(items) + self.cat(cats)

    def forward(self, seq: Tensor, seq_cat: Tensor, target: Tensor, target_cat: Tensor) -> Tensor:
        e = self.embed(seq, seq_cat)  # [B, L, D]
        c = self.embed(target, target_cat)[:, None].expand_as(e)
        w = self.att(torch.cat([e, c, e - c, e * c], -1)).squeeze(-1) * (seq != 0)
        pooled = (w.unsqueeze(-1) * e).sum(1)
        t = c[:, 0]
        return self.mlp(torch.cat([pooled, t, pooled * t], -1)).squeeze(-1)


class BSTCtr(nn.Module):
    """BST (Chen et al. 2019): the target appended to the behaviours, one transformer block, MLP."""

    def __init__(self, n_items: int, n_cats: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.cat = nn.Embedding(n_cats + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, 0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.LeakyReLU(), nn.Linear(64, 1))

    def forward(self, seq: Tensor, seq_cat: Tensor, target: Tensor, target_cat: Tensor) -> Tensor:
        items = torch.cat([seq, target[:, None]], 1)
        cats = torch.cat([seq_cat, target_cat[:, None]], 1)
        L = items.shape[1]
        x = self.item(items) + self.cat(cats) + self.pos(torch.arange(L))
        valid = items != 0
        valid[:, -1] = True  # the target always attends (an unknown target still has its category)
        h = self.enc(x, src_key_padding_mask=~valid)
        pooled = (h * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
        return self.mlp(torch.cat([pooled, h[:, -1]], -1)).squeeze(-1)


CTR_MODELS: dict[str, type[nn.Module]] = {"din": DINCtr, "bst": BSTCtr}


@dataclass
class Impressions:
    """Views of a fitting period as click impressions with sampled negatives (see the module docstring)."""

    items: dict[str, int]
    cats: dict[str, int]
    item_cat: np.ndarray  # item index -> category index
    seq: np.ndarray  # [N, L] behaviour item indices, left-padded
    target: np.ndarray  # [N]
    label: np.ndarray  # [N] float
    held: np.ndarray  # [N] bool: in the held-out tail

    @classmethod
    def of(cls, events: pa.Table, end_ts: int, max_len: int, cfg: CtrConfig, seed: int = 0) -> Impressions:
        ev = events.filter(pc.less(events["ts"], end_ts)).sort_by([("offset", "ascending")])
        users = ev["user_id"].to_numpy(zero_copy_only=False)
        items = ev["item_id"].to_numpy(zero_copy_only=False).astype(str)
        cats_s = np.array([c or "" for c in ev["category"].to_pylist()])
        action = ev["action"].to_numpy(zero_copy_only=False)
        ts = ev["ts"].to_numpy()
        tail_start = end_ts - int((end_ts - (int(ts.min()) if len(ts) else end_ts)) * cfg.holdout)
        vocab_items = np.unique(items[ts < tail_start])
        vocab = {it: j + 1 for j, it in enumerate(vocab_items.tolist())}
        cat_vocab = {c: j + 1 for j, c in enumerate(np.unique(cats_s).tolist())}
        item_cat = np.zeros(len(vocab) + 1, np.int64)
        idx = np.array([vocab.get(it, 0) for it in items], np.int64)
        cidx = np.array([cat_vocab[c] for c in cats_s], np.int64)
        item_cat[idx[idx > 0]] = cidx[idx > 0]
        is_view = (action == "view") & (idx > 0)
        views = np.bincount(idx[is_view & (ts < tail_start)], minlength=len(vocab) + 1).astype(np.float64)
        views[0] = 0.0
        p = views / views.sum() if views.sum() else np.full(len(views), 1.0 / max(len(views) - 1, 1))
        rng = np.random.default_rng(seed)
        seqs, targets, held = [], [], []
        _, u = np.unique(users, return_inverse=True)
        order = np.argsort(u, kind="stable")  # per shopper, log order kept
        for rows in np.split(order, np.flatnonzero(np.diff(u[order])) + 1) if len(order) else []:
            s = idx[rows]
            for k in np.flatnonzero(is_view[rows]).tolist():
                if k == 0:
                    continue
                prev = s[:k]
                seqs.append(left_pad(prev[prev > 0], max_len))
                targets.append(s[k])
                held.append(ts[rows[k]] >= tail_start)
        n, K = len(targets), cfg.negatives
        tgt = np.array(targets, np.int64)
        negs = rng.choice(len(p), size=(n, K), p=p)
        clash = negs == tgt[:, None]
        negs[clash] = rng.choice(len(p), size=int(clash.sum()), p=p)  # redrawn once (a clash again is rare)
        seq = np.stack(seqs) if seqs else np.zeros((0, max_len), np.int64)
        seqs = np.repeat(seq, K + 1, 0)
        targets = np.concatenate([tgt[:, None], negs], 1).reshape(-1) if n else np.zeros(0, np.int64)
        labels = np.tile(np.array([1.0] + [0.0] * K, np.float32), n)
        held = np.repeat(np.array(held, bool), K + 1)
        return cls(vocab, cat_vocab, item_cat, seqs, targets, labels, held)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels > 0].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class CtrFit:
    model: nn.Module
    data: Impressions
    max_len: int
    best_epoch: int
    curve: list[dict[str, float]] = field(default_factory=list)


def _forward(model: nn.Module, data: Impressions, seq: np.ndarray, target: np.ndarray, cats: np.ndarray) -> Tensor:
    s = torch.from_numpy(seq)
    return model(s, torch.from_numpy(data.item_cat[seq]), torch.from_numpy(target), torch.from_numpy(cats))


def fit_ctr(kind: str, data: Impressions, cfg: CtrConfig, seed: int = 0, progress: bool = True) -> CtrFit:
    """BCE on the impressions before the tail; the epoch with the best held-out AUC is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    max_len = data.seq.shape[1]
    model = CTR_MODELS[kind](len(data.items), len(data.cats), cfg.dim, max_len)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = np.flatnonzero(~data.held)
    held = np.flatnonzero(data.held)
    held = np.sort(np.random.default_rng(0).permutation(held)[: cfg.holdout_max])
    best, best_epoch, best_state, stale = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    curve: list[dict[str, float]] = []
    for epoch in tqdm(range(1, cfg.max_epochs + 1), desc=f"{kind} (CTR)", disable=not progress, leave=False):
        model.train()
        order = rng.permutation(train)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            logit = _forward(model, data, data.seq[b], data.target[b], data.item_cat[data.target[b]])
            loss = nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(data.label[b]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            s = (
                np.concatenate(
                    [
                        _forward(model, data, data.seq[b], data.target[b], data.item_cat[data.target[b]]).numpy()
                        for b in np.array_split(held, max(1, len(held) // 1024))
                    ]
                )
                if len(held)
                else np.zeros(0)
            )
        auc = _auc(s, data.label[held]) if len(held) else float("nan")
        curve.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_auc": auc})
        if progress:
            tqdm.write(f"{kind} CTR epoch {epoch}: loss {curve[-1]['loss']:.4f}, held-out AUC {auc:.4f}")
        if not auc <= best:  # nan (no tail) keeps the latest epoch
            best, best_epoch, best_state, stale = auc, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return CtrFit(model.eval(), data, max_len, best_epoch, curve)


@torch.no_grad()
def score_ctr(fit: CtrFit, sets: CandidateSets, rows: np.ndarray, categories: dict[str, str]) -> list[np.ndarray]:
    """Each request's candidates by their logit, behind the request's served sequence (`request_sequence`)."""
    hist = sets.state["history_seq"].to_pylist()
    sess = sets.state["session_seq"].to_pylist()
    d = fit.data
    out = []
    for r in rows.tolist():
        seq = np.array([j for j in (d.items.get(it, 0) for it in request_sequence(hist[r], sess[r])) if j], np.int64)
        x = np.repeat(left_pad(seq, fit.max_len)[None], len(sets.lists[r]), 0)
        cand = np.array([d.items.get(it, 0) for it in sets.lists[r]], np.int64)
        cats = np.array([d.cats.get(categories.get(it) or "", 0) for it in sets.lists[r]], np.int64)
        out.append(_forward(fit.model, d, x, cand, cats).double().numpy())
    return out
