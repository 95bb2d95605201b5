"""Next-item sequential recommenders as published: SASRec and GRU4Rec (the networks only).

Both read a shopper's interactions as item indices, oldest first and **left-padded** with 0 to a fixed
length (the newest item is always the last column), and return one state per position; the score of
item j after position t is the dot product of that state with item j's embedding (the input and output
embeddings are tied, as in both papers' common implementations). Training (full-softmax cross-entropy over
the catalogue at every position) and scoring live with the evaluation (`insession.evaluate.sequential`).

- SASRec (Kang & McAuley 2018): learned positions, causal self-attention blocks (pre-norm here), dropout
  on embeddings and inside the blocks; the paper's settings: 2 blocks, 1 head, hidden 64, length 50.
- GRU4Rec (Hidasi et al. 2016; the cross-entropy form of Hidasi & Karatzoglou 2018): an embedding, a GRU,
  a linear projection back to the embedding space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SASRec(nn.Module):
    def __init__(
        self, n_items: int, dim: int = 64, layers: int = 2, heads: int = 1, max_len: int = 50, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.heads = heads
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)  # row 0: padding
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim, dropout, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.item.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, items: Tensor) -> Tensor:
        """items [B, L] (L <= max_len, left-padded) -> states [B, L, D]; padded positions are zeroed."""
        B, L = items.shape
        valid = items != 0
        x = self.item(items) * self.item.embedding_dim**0.5 + self.pos(torch.arange(self.max_len - L, self.max_len))
        x = self.drop(x) * valid.unsqueeze(-1)
        # position t attends to positions <= t that hold an item, and always to itself (no all-masked row)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = causal & (valid[:, None, :] | torch.eye(L, dtype=torch.bool))
        mask = (~allowed).repeat_interleave(self.heads, 0)
        h = self.enc(x, mask=mask)
        return self.norm(h) * valid.unsqueeze(-1)

    def logits(self, states: Tensor) -> Tensor:
        """states [..., D] -> a score for every item row [..., n_items + 1] (column 0 is padding)."""
        return states @ self.item.weight.T


class GRU4Rec(nn.Module):
    def __init__(self, n_items: int, dim: int = 64, layers: int = 1, max_len: int = 50, dropout: float = 0.2) -> None:
        super().__init__()
        self.max_len = max_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, layers, batch_first=True)
        self.out = nn.Linear(dim, dim)
        nn.init.normal_(self.item.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def forward(self, items: Tensor) -> Tensor:
        """items [B, L] left-padded -> states [B, L, D]: each row's items are run through the GRU from a zero
        state (packed, so padding never enters it) and put back in place; padded positions are zero."""
        B, L = items.shape
        valid = items != 0
        n = valid.sum(1)
        shift = (L - n).unsqueeze(1)  # row r's items sit at columns shift..L-1
        cols = torch.arange(L).unsqueeze(0)
        left = torch.gather(items, 1, (cols + shift) % L) * (cols < n.unsqueeze(1))  # items first, then padding
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.item(left)), n.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        h, _ = self.gru(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=L)
        back = torch.gather(h, 1, ((cols - shift) % L).unsqueeze(-1).expand_as(h))  # padding first again
        return self.out(self.drop(back)) * valid.unsqueeze(-1)

    def logits(self, states: Tensor) -> Tensor:
        return states @ self.item.weight.T


SEQUENTIAL: dict[str, type[nn.Module]] = {"sasrec": SASRec, "gru4rec": GRU4Rec}
