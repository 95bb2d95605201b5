"""The hybrid ranking loss: in-session listwise + in-batch sampled softmax + repeat-weighted BCE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insession.model.reranker import COUNTERS, Batch, DualSequenceReranker, Encoded

USER_ITEM = COUNTERS.index("user_item_count_28d")


@dataclass
class LossWeights:
    listwise: float = 1.0
    inbatch: float = 0.5
    bce: float = 1.0
    repeat_alpha: float = 1.0  # a positive with historical count n weighs 1 + alpha * log1p(n) in the BCE
    inbatch_negatives: int = 31  # other groups' positives each request is contrasted with


def listwise_loss(scores: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Softmax cross-entropy within each group over its valid candidates, averaged over the positives.

    Only groups holding at least one positive and one negative take part; 0 when there are none.
    """
    logp = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    pos = (labels > 0) & mask
    neg = (labels <= 0) & mask
    groups = pos.any(-1) & neg.any(-1)
    if not bool(groups.any()):
        return scores.sum() * 0.0
    per_group = -(logp.masked_fill(~pos, 0.0)).sum(-1) / pos.sum(-1).clamp(min=1)
    return per_group[groups].mean()


def inbatch_softmax_loss(logits: Tensor, items: Tensor) -> Tensor:
    """logits [B, 1 + K]: request b scored against its own positive (column 0) and K positives of other
    groups, items [B, 1 + K] those items. Cross-entropy with target 0; a sampled item that is the same as
    the request's own positive is not a negative: it is masked out."""
    collision = items[:, 1:] == items[:, :1]
    masked = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(collision, float("-inf"))], dim=1)
    return F.cross_entropy(masked, torch.zeros(len(logits), dtype=torch.long))


def weighted_bce(scores: Tensor, labels: Tensor, mask: Tensor, repeat: Tensor, alpha: float) -> Tensor:
    """BCE over valid candidates; a positive weighs 1 + alpha * log1p(its user-item repeat count)."""
    w = torch.where(labels > 0, 1.0 + alpha * torch.log1p(repeat.float()), 1.0) * mask
    bce = F.binary_cross_entropy_with_logits(scores, labels.float(), reduction="none")
    return (w * bce).sum() / w.sum().clamp(min=1e-9)


def inbatch_logits(model: DualSequenceReranker, enc: Encoded, batch: Batch, k: int) -> tuple[Tensor, Tensor]:
    """Score every request against its own positive and the positives of k other groups of the batch
    (other users' add-to-carts are the sampled negatives). Returns (logits [B, 1 + k], items [B, 1 + k]).

    The per-user counter and the SIGNALS (the candidate in this shopper's sequences) are unknown for cross
    pairs, so they are zeroed for all pairs, the own positive included: otherwise the true positive could be
    told apart by a feature its negatives never carry. The item-level counters are the positive's own row's.
    """
    b = len(batch)
    first_pos = batch.labels.argmax(-1)
    items = batch.candidates.gather(1, first_pos.unsqueeze(1)).squeeze(1)
    counters = batch.counters.gather(1, first_pos.view(-1, 1, 1).expand(-1, 1, len(COUNTERS))).squeeze(1).clone()
    counters[:, USER_ITEM] = 0.0
    k = min(k, b - 1)
    # group b's negatives: the positives of groups b+1 .. b+k (mod B) of a random permutation of the batch
    perm = torch.randperm(b)
    shifts = torch.arange(k + 1)
    pos_in_perm = torch.empty(b, dtype=torch.long)
    pos_in_perm[perm] = torch.arange(b)
    others = perm[(pos_in_perm.unsqueeze(1) + shifts.unsqueeze(0)) % b]  # [B, 1 + k], column 0 = b itself
    logits = model.score(enc, items[others], counters[others])
    return logits, items[others]  # type: ignore[return-value]


def hybrid_loss(model: DualSequenceReranker, batch: Batch, weights: LossWeights) -> tuple[Tensor, dict[str, float]]:
    """The training objective for one batch (BCE alone when model.cfg.loss == "bce"); (loss, its parts)."""
    enc = model.encode_batch(batch)
    scores = model.score(enc, batch.candidates, batch.counters, signals=batch.signals).float()  # bf16 under autocast
    mask = batch.candidates != 0
    bce = weighted_bce(scores, batch.labels, mask, batch.counters[..., USER_ITEM], weights.repeat_alpha)
    if model.cfg.loss == "bce":
        return bce, {"bce": float(bce.detach())}
    listwise = listwise_loss(scores, batch.labels, mask)
    logits, items = inbatch_logits(model, enc, batch, weights.inbatch_negatives)
    inbatch = inbatch_softmax_loss(logits.float(), items)
    total = weights.listwise * listwise + weights.inbatch * inbatch + weights.bce * bce
    parts = {"listwise": listwise, "inbatch": inbatch, "bce": bce}
    return total, {k: float(v.detach()) for k, v in parts.items()}


def descend(opt: torch.optim.Optimizer, loss: Tensor, model: nn.Module, clip: float = 1.0) -> None:
    """One optimiser step on `loss`: gradients zeroed, back-propagated, the model's clipped to norm `clip`
    (fine-tuning and pre-training alike)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
