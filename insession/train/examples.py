"""Training examples in columnar form, length-bucketed batches and a background-prefetching loader."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from insession.model.reranker import Batch, RerankerConfig, Sequence


@dataclass
class Examples:
    """G example groups (one per add-to-cart) as ragged arrays: `*_offsets[g]:*_offsets[g+1]` is group g.

    Items are vocabulary indices; sequences run oldest -> newest; the positive candidate comes first.
    """

    request_ts: np.ndarray  # [G] int64, epoch ms: the state is "just before" this instant
    hist_offsets: np.ndarray  # [G+1] int64
    hist_items: np.ndarray
    hist_actions: np.ndarray
    hist_ts: np.ndarray
    sess_offsets: np.ndarray
    sess_items: np.ndarray
    sess_actions: np.ndarray
    sess_ts: np.ndarray
    cand_offsets: np.ndarray
    cand_items: np.ndarray
    cand_labels: np.ndarray  # float32, 1 = carted
    cand_counters: np.ndarray  # [Nc, len(COUNTERS)] float32
    cand_signals: np.ndarray  # [Nc, len(SIGNALS)] float32 (`signal_rows`)
    surface: np.ndarray  # [G] int64, `Vocab.surface_index` of the request's surface (0: unknown)
    qry_offsets: np.ndarray  # [G+1] int64: the session's search queries (`session_queries`)
    qry_grams: np.ndarray  # [Nq, QUERY_GRAMS] int64, `Vocab.query_rows`

    def __len__(self) -> int:
        return len(self.request_ts)

    def lengths(self) -> np.ndarray:
        return np.diff(self.hist_offsets) + np.diff(self.sess_offsets)

    def subset(self, idx: np.ndarray) -> Examples:
        """The groups `idx` (in that order) as a new Examples."""
        parts: dict[str, np.ndarray] = {"request_ts": self.request_ts[idx], "surface": self.surface[idx]}
        for prefix, columns in (
            ("hist", ("items", "actions", "ts")),
            ("sess", ("items", "actions", "ts")),
            ("cand", ("items", "labels", "counters", "signals")),
            ("qry", ("grams",)),
        ):
            off = getattr(self, f"{prefix}_offsets")
            start, end = off[idx], off[idx + 1]
            rows = _ranges(start, end)
            parts[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(end - start)]).astype(np.int64)
            for c in columns:
                parts[f"{prefix}_{c}"] = getattr(self, f"{prefix}_{c}")[rows]
        return Examples(**parts)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> Examples:
        with np.load(path) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})

    def collate(self, idx: np.ndarray, cfg: RerankerConfig) -> Batch:
        """Padded tensors for the groups `idx`; sequences keep their most recent max_history/max_session."""
        hi, ha, ht = pad_ragged(
            self.hist_offsets, (self.hist_items, self.hist_actions, self.hist_ts), idx, cfg.max_history
        )
        si, sa, st = pad_ragged(
            self.sess_offsets, (self.sess_items, self.sess_actions, self.sess_ts), idx, cfg.max_session
        )
        ci, cl, cc, cs = pad_ragged(
            self.cand_offsets, (self.cand_items, self.cand_labels, self.cand_counters, self.cand_signals), idx, None
        )
        (qg,) = pad_ragged(self.qry_offsets, (self.qry_grams,), idx, None)
        return Batch(
            history=Sequence(torch.from_numpy(hi), torch.from_numpy(ha), torch.from_numpy(ht)),
            session=Sequence(torch.from_numpy(si), torch.from_numpy(sa), torch.from_numpy(st)),
            request_ts=torch.from_numpy(self.request_ts[idx]),
            candidates=torch.from_numpy(ci),
            counters=torch.from_numpy(cc.astype(np.float32)),
            labels=torch.from_numpy(cl.astype(np.float32)),
            signals=torch.from_numpy(cs.astype(np.float32)),
            surface=torch.from_numpy(self.surface[idx]),
            queries=torch.from_numpy(qg),
        )


def _ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start[i], end[i]) for all i, without a Python loop."""
    lens = end - start
    if lens.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(start - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return first + np.arange(lens.sum())


def pad_ragged(
    offsets: np.ndarray, columns: tuple[np.ndarray, ...], idx: np.ndarray, max_len: int | None
) -> list[np.ndarray]:
    """Right-padded [B, L] arrays (L = longest kept row, >= 1) of the ragged rows idx; keeps the tail."""
    start, end = offsets[idx], offsets[idx + 1]
    if max_len is not None:
        start = np.maximum(start, end - max_len)
    lens = end - start
    width = max(int(lens.max(initial=0)), 1)
    pos = np.arange(width)
    valid = pos[None, :] < lens[:, None]
    rows = np.where(valid, start[:, None] + pos[None, :], 0)
    out = []
    for col in columns:
        if len(col) == 0:
            out.append(np.zeros((len(idx), width, *col.shape[1:]), dtype=col.dtype))
            continue
        v = col[rows]
        mask = valid.reshape(valid.shape + (1,) * (v.ndim - 2))
        out.append(np.where(mask, v, 0).astype(col.dtype))
    return out


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Groups of similar sequence length in the same batch (little padding); batch order shuffled.

    With rng None the order is deterministic (evaluation).
    """
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    noisy = lengths + rng.uniform(0, 2, size=len(lengths))  # ties broken at random, so batches vary by epoch
    order = np.argsort(noisy, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def prefetch(examples: Examples, batches: list[np.ndarray], cfg: RerankerConfig, depth: int = 4) -> Iterator[Batch]:
    """Collate batches in a background thread, `depth` ahead of the consumer."""
    q: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for idx in batches:
                if stop.is_set():
                    return
                q.put(examples.collate(idx, cfg))
            q.put(None)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    worker = threading.Thread(target=produce, name="insession-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
