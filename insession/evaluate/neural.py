"""Neural baselines on the reranker's own training data: SASRec, DIN and BST, small and briefly trained.

All three read the same `Examples` (history + session as one behaviour sequence, oldest first, the same
vocabulary indices, the same candidate groups) and train with a listwise softmax over each group:

- SASRec (Kang & McAuley 2018): a causal transformer over the sequence; a candidate scores by the dot
  product of the last position's state with its embedding (no target inside the encoder).
- DIN (Zhou et al. 2018): attention of the candidate over the sequence (an MLP on [e, c, e-c, e*c]),
  weighted-sum pooling, then an MLP on [pooled, candidate, pooled*candidate].
- BST (Chen et al. 2019): the candidate appended to the sequence, one transformer over the whole, an MLP
  on the flattened output; the target sits inside the encoder, so it runs once per candidate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from insession.model.reranker import Batch, RerankerConfig
from insession.train.examples import Examples, bucketed_batches, prefetch


def _sequence(batch: Batch) -> tuple[Tensor, Tensor]:
    """History then session, left-aligned per row with padding at the end: (items [B, L], mask [B, L])."""
    items = torch.cat([batch.history.items, batch.session.items], 1)
    mask = items != 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid first, keep time order
    items = torch.gather(items, 1, order)
    return items, items != 0


class SASRec(nn.Module):
    def __init__(self, n_rows: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_rows, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, 0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, batch: Batch) -> Tensor:
        items, mask = _sequence(batch)
        L = items.shape[1]
        x = self.emb(items) + self.pos(torch.arange(L))
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        h = self.enc(x, mask=causal, src_key_padding_mask=~mask)
        last = (mask.sum(1) - 1).clamp(min=0)
        state = h[torch.arange(len(items)), last] * mask.any(1, keepdim=True)
        return torch.einsum("bd,bcd->bc", state, self.emb(batch.candidates))


class DIN(nn.Module):
    def __init__(self, n_rows: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_rows, dim, padding_idx=0)
        self.att = nn.Sequential(nn.Linear(4 * dim, 64), nn.ReLU(), nn.Linear(64, 1))
        self.head = nn.Sequential(nn.Linear(3 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, batch: Batch) -> Tensor:
        items, mask = _sequence(batch)
        e = self.emb(items)[:, None]  # [B, 1, L, D]
        c = self.emb(batch.candidates)[:, :, None]  # [B, C, 1, D]
        e, c2 = torch.broadcast_tensors(e, c)
        w = self.att(torch.cat([e, c2, e - c2, e * c2], -1)).squeeze(-1) * mask[:, None]
        pooled = (w.unsqueeze(-1) * e).sum(2)  # DIN keeps unnormalised weights
        cand = c.squeeze(2)
        return self.head(torch.cat([pooled, cand, pooled * cand], -1)).squeeze(-1)


class BST(nn.Module):
    def __init__(self, n_rows: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_rows, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, 0.1, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, batch: Batch) -> Tensor:
        items, mask = _sequence(batch)
        B, C = batch.candidates.shape
        L = items.shape[1]
        seq = torch.cat([items[:, None].expand(B, C, L), batch.candidates[:, :, None]], 2).reshape(B * C, L + 1)
        m = torch.cat([mask[:, None].expand(B, C, L), torch.ones(B, C, 1, dtype=torch.bool)], 2).reshape(B * C, -1)
        h = self.enc(self.emb(seq) + self.pos(torch.arange(L + 1)), src_key_padding_mask=~m)
        pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
        return self.head(torch.cat([pooled, h[:, -1]], -1)).reshape(B, C)


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {"sasrec": SASRec, "din": DIN, "bst": BST}


def fit_neural(
    name: str,
    train: Examples,
    n_rows: int,
    cfg: RerankerConfig,
    epochs: int = 3,
    dim: int = 32,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Train one baseline with a listwise softmax over each example group (labels: 1 = carted)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MODELS[name](n_rows, dim, cfg.max_history + cfg.max_session)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    lengths = train.lengths()
    for epoch in range(epochs):
        model.train()
        batches = bucketed_batches(lengths, batch_size, rng)
        for batch in tqdm(
            prefetch(train, batches, cfg),
            total=len(batches),
            desc=f"{name} epoch {epoch + 1}",
            disable=not progress,
            leave=False,
        ):
            s = model(batch).masked_fill(batch.candidates == 0, -1e9)
            target = batch.labels / batch.labels.sum(1, keepdim=True).clamp(min=1.0)
            loss = -(target * torch.log_softmax(s, 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def score_examples(
    model: Callable[[Batch], Tensor], examples: Examples, cfg: RerankerConfig, batch_size: int = 64
) -> list[np.ndarray]:
    """Scores of every group's candidates, in group order and candidate order."""
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    batches = bucketed_batches(examples.lengths(), batch_size, None)
    counts = np.diff(examples.cand_offsets)
    for idx, batch in zip(batches, prefetch(examples, batches, cfg), strict=True):
        s = model(batch).float().numpy()
        for row, g in enumerate(idx.tolist()):
            out[g] = s[row, : counts[g]].astype(np.float64)
    return out
