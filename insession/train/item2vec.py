"""Pre-trained item vectors: item2vec (skip-gram with negative sampling over in-session co-occurrence)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def cooccurrence_pairs(items: np.ndarray, sequence: np.ndarray, window: int) -> np.ndarray:
    """(centre, context) pairs of items at most `window` apart in the same sequence, both directions.

    items/sequence: parallel int arrays, rows of one sequence contiguous and in time order; item 0 skipped.
    """
    out = []
    for k in range(1, window + 1):
        same = (sequence[k:] == sequence[:-k]) & (items[k:] != 0) & (items[:-k] != 0) & (items[k:] != items[:-k])
        a, b = items[:-k][same], items[k:][same]
        out += [np.stack([a, b], 1), np.stack([b, a], 1)]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def item2vec(
    items: np.ndarray,
    sequence: np.ndarray,
    n_items: int,
    dim: int,
    *,
    window: int = 3,
    epochs: int = 2,
    negatives: int = 5,
    steps_per_epoch: int = 300,
    max_pairs: int = 2_000_000,
    seed: int = 0,
    scale: float = 0.1,
    progress: bool = True,
) -> torch.Tensor:
    """Item vectors [n_items, dim] (row 0 = padding = 0) learnt by SGNS; items never seen keep small noise.

    Negatives come from the unigram distribution to the power 0.75 (Mikolov et al. 2013). The result is
    centred and rescaled to standard deviation `scale`, the scale the reranker's item table starts at.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = cooccurrence_pairs(items.astype(np.int64), sequence, window)
    if len(pairs) > max_pairs:
        pairs = pairs[rng.choice(len(pairs), max_pairs, replace=False)]
    emb_in = torch.nn.Embedding(n_items, dim, sparse=True)
    emb_out = torch.nn.Embedding(n_items, dim, sparse=True)
    torch.nn.init.normal_(emb_in.weight, std=0.5 / dim, generator=gen)
    torch.nn.init.zeros_(emb_out.weight)
    if len(pairs):
        freq = np.bincount(pairs[:, 0], minlength=n_items).astype(np.float64) ** 0.75
        noise = torch.from_numpy(freq / freq.sum())
        opt = torch.optim.SparseAdam([emb_in.weight, emb_out.weight], lr=0.02)
        tensor_pairs = torch.from_numpy(pairs)
        batch_size = int(np.clip(len(pairs) // steps_per_epoch, 256, 8192))
        steps = epochs * ((len(pairs) + batch_size - 1) // batch_size)
        bar = tqdm(total=steps, desc="item2vec", disable=not progress, leave=False)
        for _ in range(epochs):
            for chunk in tensor_pairs[torch.randperm(len(pairs), generator=gen)].split(batch_size):
                centre, context = emb_in(chunk[:, 0]), emb_out(chunk[:, 1])
                neg = emb_out(torch.multinomial(noise, len(chunk) * negatives, True, generator=gen))
                neg = neg.view(len(chunk), negatives, dim)
                pos_logit = (centre * context).sum(-1)
                neg_logit = torch.bmm(neg, centre.unsqueeze(-1)).squeeze(-1)
                loss = -(F.logsigmoid(pos_logit).mean() + F.logsigmoid(-neg_logit).sum(-1).mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update()
        bar.close()
    vectors = emb_in.weight.detach().clone()
    vectors -= vectors[1:].mean(0)  # drop the direction all items share: it carries no similarity
    vectors[0] = 0
    return vectors * (scale / vectors[1:].std().clamp(min=1e-12))
