"""Self-supervised pre-training of the reranker's sequence side on every interaction (issue 20).

The reranker's fine-tuning data is one example group per add-to-cart (458 groups on Taobao's training
split), while the same period holds tens of thousands of views, carts, purchases and favourites. Before
fine-tuning with the hybrid loss, `pretrain` fits the item table and both encoders (history and session)
on that whole stream with one of two objectives (`PretrainConfig.objective`). The default, "masked", is
a masked-item (Cloze) objective, as BERT4Rec does for a bidirectional encoder:

- windows: the history encoder reads each shopper's stream cut into windows of at most `max_history`
  events (all sessions, oldest first), the session encoder each session cut into windows of at most
  `max_session`; both exactly as `Examples.collate` pads a request's sequences (`pad_ragged`);
- masking: a `mask_rate` share of each window's events whose item has a trained row (at least one per
  window) is replaced by the "unknown item" row (`Vocab.unknown`, the global-average cold-start row:
  what serving feeds for an item it cannot place), keeping the event's action and time, as BERT4Rec keeps
  the position of a masked item;
- prediction: the encoder's output at a masked event, through a small head (a linear map and a bias per
  item, discarded after pre-training), scores every trained item row by the dot product with the item
  table (tied weights); the loss is the full-softmax cross-entropy of the masked item;
- time: each window is encoded as if requested at its newest event (hours to that instant), as the
  fine-tuned model encodes a request's sequences.

Measured (docs/evaluation.md, Taobao, 3 seeds, paired): 5 epochs cost -0.063 [-0.088, -0.041] NDCG@10
against the same reranker without pre-training, on known and unknown positives alike, and item2vec is
not subsumed (dropping it alone costs -0.017), so pre-training is off by default (`PretrainConfig.epochs`
0) and item2vec stays. 20 epochs (loss 10.5 -> ~5) still cost -0.061 [-0.095, -0.032] on the served
lists, and helped only on positives outside them (forced view +0.023 [+0.015, +0.032]). Fine-tuning the
pre-trained parts gently does not rescue it (2026-11-30, the same runs on the current model, where the full
rate costs -0.066 [-0.091, -0.044]): at 0.1 x the rate -0.041 [-0.065, -0.021], frozen in the first epoch
-0.077 [-0.103, -0.056]; 20 pre-training epochs -0.102 [-0.139, -0.069] at the full rate and -0.083
[-0.119, -0.051] at 0.1 x. A lower rate recovers about 0.02, never the loss. The control (the same
0.1 x rate for the item table and encoders without pre-training, `insession evaluate --only-pretraining
finetune_rate_only`) ties the reranker on the served lists, +0.0018 [-0.0095, +0.0118], and gains only in
the forced view, +0.0068 [+0.0040, +0.0098]: the 0.1 x rows' recovery on the served lists is the rate
protecting what pre-training learnt, not the rate helping by itself, and it leaves no pre-training gain.

The other, "next", is SASRec's next-item prediction made sound for the reranker's bidirectional encoders
without a causal mask: instead of one causal pass over a window, every event is its own instance, the
encoder reading only the events before it (`next_item_prefixes`: the shopper's, across sessions as the
masked objective's history windows, for the history encoder, the session's for the session encoder; the
newest `max_history` / `max_session` of them, as a request's sequences are cut) and encoded as requested at
that event's instant, so it attends both ways over the past alone, as it does when serving a request (whose
history stops at the session's start). The state at the prefix's newest event, through the same
head (`ItemHead`, tied to the item table), scores every trained item row; the loss is the full-softmax
cross-entropy of the event's item (targets: events whose item has a trained row, never a group's first).
An epoch draws at most `max_windows` prefixes, as the masked objective draws windows.

Measured (docs/evaluation.md, Taobao, 3 seeds, paired, 2026-11-30): 5 epochs (loss 10.6 -> 9.3-10.2, chance
10.5) cost -0.020 [-0.043, +0.001] NDCG@10 against the reranker without pre-training with the pre-trained
parts fine-tuned at 0.1 x the rate, and -0.028 [-0.052, -0.006] at the full rate: half the masked objective's
loss, but no gain anywhere (known positives -0.038 and -0.032); 20 epochs (loss 1.5-2.5) cost -0.028 [-0.052,
-0.009] at 0.1 x. So "masked" stays the default objective and pre-training stays off.

Point in time: the stream is `TrainingData.stream`, the events before the build's `split_ts` (the
instant the vocabulary is built before and the fine-tuning's validation groups start after); `pretrain`
refuses a stream holding any event at or after its `cutoff`, so no validation or test interaction can
reach the weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from insession.model.reranker import DualSequenceReranker, Sequence
from insession.train.examples import pad_ragged
from insession.train.loss import descend

OBJECTIVES = ("masked", "next")  # masked items (Cloze, the default) or the next item of every prefix


@dataclass
class PretrainConfig:
    """Pre-training switch and settings. `epochs` 0 is off (the ablation's "no pre-training"); `objective` is
    one of OBJECTIVES (anything else is refused when the config is made)."""

    epochs: int = 0
    objective: str = "masked"
    lr: float = 1e-2  # on Taobao 1e-3 left the masked-item loss at chance (10.56 -> 10.48 in 3 epochs; ln V = 10.52)
    batch_size: int = 128  # windows per step
    mask_rate: float = 0.2  # share of a window's trained-item events masked (BERT4Rec: 0.2 on sparse data)
    # the item rows are rescaled to this standard deviation before pre-training. At the reranker's initial
    # 0.1 an item is a faint part of its token beside the action and time terms (std ~1): the hand-made case
    # (tests/train/test_train_pretrain.py) stays at chance for 10 epochs, and learns in a few at 1.0. On
    # Taobao 1.0 made the loss oscillate (13.6, 11.1, 11.4, 10.6, 10.9, 10.2, 10.8 at lr 3e-3, mask rate 0.4)
    # while 0.1 at lr 1e-2 fell steadily (10.75 -> 10.19 in 5 epochs), so 0.1 (no rescale) is the default
    item_scale: float = 0.1
    max_windows: int | None = 20_000  # windows (prefixes: next) per epoch at most (a seeded sample; bounds big shops)
    # how the fine-tuning after pre-training treats `pretrained_parameters` (`insession.train.trainer.fit`):
    # their learning rate is the fine-tuning's times `finetune_lr_scale`, and they are frozen for the first
    # `freeze_epochs` epochs, so that fine-tuning at the full rate does not overwrite what pre-training
    # learnt. 1.0 and 0 (the defaults) fine-tune every weight alike, as before: on Taobao no setting tried made
    # pre-training beat the reranker without it (the figures: this module's docstring)
    finetune_lr_scale: float = 1.0
    freeze_epochs: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"pre-training objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}")


@dataclass
class Stream:
    """Every accepted interaction before `cutoff`, per shopper in log order (sessions contiguous)."""

    items: np.ndarray  # [N] int64 reranker item index (cold-start rows for items outside the vocabulary)
    actions: np.ndarray  # [N] int64 1 + ACTIONS.index(action)
    ts: np.ndarray  # [N] int64 epoch ms
    shopper: np.ndarray  # [N] int64 dense shopper number, non-decreasing
    session: np.ndarray  # [N] int64 dense session number over all shoppers, non-decreasing
    cutoff: int  # every event is strictly before this instant

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """Refuse a stream that holds an event at or after its cutoff (a point-in-time leak)."""
        if len(self.ts) and int(self.ts.max()) >= self.cutoff:
            raise ValueError(
                f"pre-training stream holds events at or after its cutoff {self.cutoff} (latest "
                f"{int(self.ts.max())}): build it from the events before the training split only "
                "(TrainingData.stream does)"
            )


def pretrained_parameters(model: DualSequenceReranker) -> list[nn.Parameter]:
    """The parameters `pretrain` fits, each once: the item table and both encoders (their action, time and
    position embeddings included; one encoder when they are shared). Everything else (pooling, gate, head,
    query and surface embeddings) is the fine-tuning's alone."""
    seen: dict[int, nn.Parameter] = {}
    for module in (model.item_embed, model.history_encoder, model.session_encoder):
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def window_offsets(group: np.ndarray, max_len: int) -> np.ndarray:
    """Offsets [W + 1] of consecutive windows of at most `max_len` rows that never cross a change of `group`
    (a non-decreasing array); each group's last window ends at its newest row, its first may be shorter."""
    n = len(group)
    if n == 0:
        return np.zeros(1, np.int64)
    change = np.r_[True, group[1:] != group[:-1]]
    ends = np.r_[np.flatnonzero(change)[1:], n]  # per group, one past its newest row
    end = np.repeat(ends, np.diff(np.r_[np.flatnonzero(change), n]))
    window = (end - 1 - np.arange(n)) // max_len  # 0: the newest window of the row's group
    cut = change | np.r_[True, window[1:] != window[:-1]]
    return np.r_[np.flatnonzero(cut), n].astype(np.int64)


def next_item_prefixes(group: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The next-item objective's instances over one side's groups (shoppers or sessions, `group`
    non-decreasing): every row whose item has a trained row (1 <= item < n_items) and that is not its group's
    first. Returns (bounds [2U], targets [U]): instance u reads rows [bounds[2u], bounds[2u + 1]) (its group's
    rows before the target; `pad_ragged` keeps the newest `max_len` of them) and predicts row targets[u]."""
    off = window_offsets(group, max(len(group), 1))  # one window per group: the group boundaries
    first = np.repeat(off[:-1], np.diff(off))  # per row, its group's first row
    rows = np.arange(len(group))
    targets = rows[(rows > first) & (items > 0) & (items < n_items)]
    return np.stack([first[targets], targets], 1).ravel().astype(np.int64), targets.astype(np.int64)


class ItemHead(nn.Module):
    """Both objectives' head: encoder state -> a score for every trained item row (tied to the item table)."""

    def __init__(self, dim: int, n_items: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(n_items))

    def forward(self, states: Tensor, table: Tensor) -> Tensor:
        """states [M, D], table [n_items, D] (row 0 padding) -> logits [M, n_items], padding column -inf."""
        logits = self.proj(states) @ table.T + self.bias
        return logits.masked_fill(torch.arange(logits.shape[-1]) == 0, float("-inf"))

    def loss(self, states: Tensor, model: DualSequenceReranker, targets: Tensor) -> Tensor:
        """Full-softmax cross-entropy of `targets` [M] (trained item rows) given `states` [M, D]."""
        return F.cross_entropy(self(states, model.item_embed.weight.weight).float(), targets)


def mask_window(items: Tensor, n_items: int, unknown: int, rate: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(masked inputs, targets) of a padded batch [B, L]: each event whose item has a trained row (1 <= item <
    n_items) is masked with probability `rate`, and one such event at least per row that has one; a masked
    item becomes `unknown`; targets hold the original item where masked, 0 elsewhere."""
    maskable = (items > 0) & (items < n_items)
    pick = (torch.rand(items.shape, generator=gen) < rate) & maskable
    # rows with nothing picked: mask one maskable event at random (the largest random key among them)
    key = torch.rand(items.shape, generator=gen).masked_fill(~maskable, -1.0)
    one = F.one_hot(key.argmax(-1), items.shape[1]).bool() & maskable
    pick = pick | (one & ~pick.any(-1, keepdim=True))
    return torch.where(pick, torch.full_like(items, unknown), items), torch.where(pick, items, torch.zeros_like(items))


def masked_item_loss(
    model: DualSequenceReranker,
    head: ItemHead,
    side: str,
    seq: Sequence,
    unknown: int,
    rate: float,
    gen: torch.Generator,
) -> Tensor | None:
    """Cross-entropy of the masked items of one side's windows (None: nothing maskable in the batch)."""
    n_items = model.cfg.n_items
    masked, targets = mask_window(seq.items, n_items, unknown, rate, gen)
    keep = targets > 0
    if not keep.any():
        return None
    request_ts = seq.ts.masked_fill(~seq.mask, torch.iinfo(seq.ts.dtype).min).amax(-1)  # the newest event
    states = model.encoder_states(side, Sequence(masked, seq.actions, seq.ts), request_ts)
    return head.loss(states[keep], model, targets[keep])


def next_item_loss(
    model: DualSequenceReranker, head: ItemHead, side: str, prefix: Sequence, request_ts: Tensor, targets: Tensor
) -> Tensor:
    """Cross-entropy of each prefix's next item `targets` [B], from the encoder's state at the prefix's newest
    event, the prefix [B, L] (right-padded, at least one event each) encoded as requested at `request_ts` [B]
    (the next event's instant), as a request's sequences are encoded."""
    states = model.encoder_states(side, prefix, request_ts)
    newest = states[torch.arange(len(states)), prefix.mask.sum(-1) - 1]
    return head.loss(newest, model, targets)


@dataclass
class PretrainLog:
    epoch: int
    windows: int  # windows (masked) or prefixes (next) seen in the epoch
    loss: float
    seconds: float


@dataclass
class _Side:
    """One encoder's training units: unit u reads rows [bounds[keys[u]], bounds[keys[u] + 1]) (the newest
    `max_len` of them, `pad_ragged`); `targets` [U] (next objective) the row each unit predicts."""

    bounds: np.ndarray
    keys: np.ndarray
    max_len: int
    targets: np.ndarray | None


def _sides(stream: Stream, model: DualSequenceReranker, objective: str) -> dict[str, _Side]:
    """Each encoder's units: its windows of 2 events or more (masked; a lone event has no context to predict
    from), or its prefixes and their next items (next)."""
    mc = model.cfg
    sides = {}
    for side, group, max_len in (
        ("history", stream.shopper, mc.max_history),
        ("session", stream.session, mc.max_session),
    ):
        if objective == "masked":
            off = window_offsets(group, max_len)
            sides[side] = _Side(off, np.flatnonzero(np.diff(off) >= 2), max_len, None)
        else:
            bounds, targets = next_item_prefixes(group, stream.items, mc.n_items)
            sides[side] = _Side(bounds, 2 * np.arange(len(targets), dtype=np.int64), max_len, targets)
    return sides


def pretrain(
    model: DualSequenceReranker,
    stream: Stream,
    unknown: int,
    cfg: PretrainConfig,
    *,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = True,
    head: ItemHead | None = None,
) -> list[PretrainLog]:
    """Fit `model`'s item table and both encoders on `stream` with `cfg.objective`, in place.

    `unknown`: the vocabulary's global-average row (`Vocab.unknown`), the mask token. Each epoch draws at
    most `cfg.max_windows` units (windows, or prefixes for the next objective; both sides together,
    shuffled). The cold-start rows are re-derived from the item table at every epoch start (the mask token
    follows the table). Returns one log per epoch; the model is left in eval mode."""
    stream.check()
    if cfg.epochs <= 0 or len(stream) == 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    mc = model.cfg
    sides = _sides(stream, model, cfg.objective)
    windows = [(side, u) for side, s in sides.items() for u in range(len(s.keys))]
    if not windows:
        return []
    with torch.no_grad():
        rows = model.item_embed.weight.weight[1:]
        rows.mul_(cfg.item_scale / rows.std().clamp(min=1e-12))
    head = head or ItemHead(mc.dim, mc.n_items)  # the objective's own (a caller may pass one to read it)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=0.0)
    logs: list[PretrainLog] = []
    columns = (stream.items, stream.actions, stream.ts)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.item_embed.refresh_cold_start()  # the mask token: the mean of the current item rows
        model.train()
        order = rng.permutation(len(windows))[: cfg.max_windows]
        chosen = [windows[i] for i in order.tolist()]
        batches = []
        for side in sides:  # one side per batch (each side has its own encoder and length)
            idx = np.array([w for s, w in chosen if s == side], np.int64)
            batches += [(side, idx[i : i + cfg.batch_size]) for i in range(0, len(idx), cfg.batch_size)]
        rng.shuffle(batches)  # type: ignore[arg-type]
        total, n = 0.0, 0
        bar = tqdm(batches, desc=f"pre-train {epoch}", disable=not progress, leave=False)
        for side, idx in bar:
            s = sides[side]
            it, ac, ts = (torch.from_numpy(a) for a in pad_ragged(s.bounds, columns, s.keys[idx], s.max_len))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if s.targets is None:
                    loss = masked_item_loss(model, head, side, Sequence(it, ac, ts), unknown, cfg.mask_rate, gen)
                else:
                    nxt = s.targets[idx]
                    loss = next_item_loss(
                        model,
                        head,
                        side,
                        Sequence(it, ac, ts),
                        torch.from_numpy(stream.ts[nxt]),
                        torch.from_numpy(stream.items[nxt]),
                    )
            if loss is None:
                continue
            descend(opt, loss, model)
            total += float(loss.detach()) * len(idx)
            n += len(idx)
            bar.set_postfix(loss=f"{total / max(n, 1):.3f}")
        logs.append(PretrainLog(epoch, n, total / max(n, 1), time.perf_counter() - t0))
        if progress:
            tqdm.write(f"pre-train epoch {epoch}: {cfg.objective}-item loss {logs[-1].loss:.3f} over {n:,} units")
    with torch.no_grad():
        model.item_embed.weight.weight[0].zero_()
    model.eval()
    return logs
