"""Ranking metrics per request (NDCG@k, HR@k, MRR, AUC), GAUC, and seeded bootstrap intervals over sessions.

Every request ranks one candidate list holding exactly one positive (the carted item). Ties are broken
pessimistically: the positive ranks below every candidate with an equal score, so a method that scores
everything alike gets no credit for the list's order.

GAUC follows DIN (Zhou et al. 2018): each user's AUC over all of the user's impressions pooled (every
positive against every negative of any of the user's requests, so scores must be comparable across
requests), averaged with the user's impression count as weight. With one positive per fixed-size list,
the plain mean of per-request AUCs would equal that weighted mean; pooling is what makes GAUC differ.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

METRICS: tuple[str, ...] = ("ndcg10", "hr10", "mrr", "auc", "gauc")
PER_REQUEST: tuple[str, ...] = METRICS[:4]


def positive_rank(scores: np.ndarray, positive: int) -> int:
    """0-based rank of candidate `positive` among `scores` (higher is better; ties count against it)."""
    s = scores[positive]
    return int(np.sum(scores >= s) - 1)


def request_metrics(scores: np.ndarray, positive: int, k: int = 10) -> dict[str, float]:
    """NDCG@k, HR@k, reciprocal rank and AUC of one request's candidate list with one positive."""
    n = len(scores)
    r = positive_rank(scores, positive)
    return {
        "ndcg10": 1.0 / np.log2(r + 2.0) if r < k else 0.0,
        "hr10": 1.0 if r < k else 0.0,
        "mrr": 1.0 / (r + 1.0),
        "auc": (n - 1 - r) / (n - 1) if n > 1 else float("nan"),
    }


def truncated_rank_metrics(ranks: np.ndarray, k: int = 20) -> dict[str, float]:
    """Full-catalogue HR@k and MRR@k from 0-based ranks of the positive (-1: not retrieved at all)."""
    hit = (ranks >= 0) & (ranks < k)
    if not len(ranks):
        return {f"hr{k}": float("nan"), f"mrr{k}": float("nan")}
    return {
        f"hr{k}": float(hit.mean()),
        f"mrr{k}": float(np.where(hit, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).mean()),
    }


@dataclass
class Pairs:
    """Cross-request pair counts within each user: `count[t]` negatives of request `b[t]` score strictly
    below the positive of request `a[t]` (a and b of the same user; a == b included)."""

    a: np.ndarray
    b: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, scores: list[np.ndarray], positives: np.ndarray, user: np.ndarray) -> Pairs:
        a, b, c = [], [], []
        pos = np.array([s[p] for s, p in zip(scores, positives, strict=True)]) if scores else np.zeros(0)
        negs = [np.sort(np.delete(s, p)) for s, p in zip(scores, positives, strict=True)]
        for u in np.unique(user):
            rows = np.flatnonzero(user == u)
            for j in rows:
                a.extend([j] * len(rows))
                b.extend(rows.tolist())
                c.extend(np.searchsorted(negs[r], pos[j], side="left") for r in rows)
        return cls(np.array(a, np.int64), np.array(b, np.int64), np.array(c, np.float64))

    def subset(self, mask: np.ndarray) -> Pairs:
        new = np.cumsum(mask) - 1
        keep = mask[self.a] & mask[self.b]
        return Pairs(new[self.a[keep]], new[self.b[keep]], self.count[keep])


def gauc_weighted(pairs: Pairs, user: np.ndarray, n_candidates: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """GAUC for each row of `mult` [R, N]: request multiplicities (1 = the sample itself; a bootstrap
    replicate counts how often each request's session was drawn)."""
    mult = np.atleast_2d(mult)
    if not len(user):
        return np.full(len(mult), np.nan)
    _, u = np.unique(user, return_inverse=True)
    n_users = int(u.max()) + 1
    onehot = np.zeros((len(user), n_users))
    onehot[np.arange(len(user)), u] = 1.0
    order = np.argsort(u[pairs.a], kind="stable")
    a, b, c = pairs.a[order], pairs.b[order], pairs.count[order]
    pair_user = u[a]
    starts = np.searchsorted(pair_user, np.arange(n_users))
    present = np.isin(np.arange(n_users), pair_user)
    num = np.zeros((len(mult), n_users))
    if len(a):
        sums = np.add.reduceat(mult[:, a] * mult[:, b] * c, np.minimum(starts, len(a) - 1), axis=1)
        num[:, present] = sums[:, present]
    n_pos = mult @ onehot  # one positive per request
    n_neg = (mult * (n_candidates - 1)) @ onehot
    impressions = (mult * n_candidates) @ onehot
    den = n_pos * n_neg
    ok = den > 0
    auc = np.divide(num, den, out=np.zeros_like(num), where=ok)
    w = np.where(ok, impressions, 0.0)
    total = w.sum(1)
    return np.divide((auc * w).sum(1), total, out=np.full(len(mult), np.nan), where=total > 0)


@dataclass
class PerRequest:
    """Per-request metric arrays of one method on one request set, with the keys the aggregates need."""

    ndcg10: np.ndarray
    hr10: np.ndarray
    mrr: np.ndarray
    auc: np.ndarray
    user: np.ndarray  # GAUC groups by user
    session: np.ndarray  # the bootstrap resamples whole sessions
    n_candidates: np.ndarray  # GAUC weight (impressions)
    pairs: Pairs

    def __len__(self) -> int:
        return len(self.ndcg10)

    def subset(self, mask: np.ndarray) -> PerRequest:
        arrays = {f.name: getattr(self, f.name)[mask] for f in fields(self) if f.name != "pairs"}
        return PerRequest(**arrays, pairs=self.pairs.subset(mask))

    def gauc(self, mult: np.ndarray | None = None) -> np.ndarray:
        return gauc_weighted(self.pairs, self.user, self.n_candidates, np.ones(len(self)) if mult is None else mult)

    def point(self) -> dict[str, float]:
        out = {m: float(np.nanmean(getattr(self, m))) if len(self) else float("nan") for m in PER_REQUEST}
        out["gauc"] = float(self.gauc()[0])
        return out


def score_requests(
    scores: list[np.ndarray], positives: np.ndarray, user: np.ndarray, session: np.ndarray
) -> PerRequest:
    """Metrics of every request: `scores[i]` ranks request i's candidates; `positives[i]` is the positive."""
    rows = [request_metrics(s, int(p)) for s, p in zip(scores, positives, strict=True)]
    col = {m: np.array([r[m] for r in rows], dtype=np.float64) for m in PER_REQUEST}
    user, session = np.asarray(user), np.asarray(session)
    return PerRequest(
        **col,
        user=user,
        session=session,
        n_candidates=np.array([len(s) for s in scores], dtype=np.float64),
        pairs=Pairs.of(scores, np.asarray(positives), user),
    )


def average(pers: list[PerRequest]) -> PerRequest:
    """Runs (seeds) of one method on the same requests: per-request metrics and pair counts averaged."""
    first = pers[0]
    cols = {m: np.mean([getattr(p, m) for p in pers], 0) for m in PER_REQUEST}
    pairs = Pairs(first.pairs.a, first.pairs.b, np.mean([p.pairs.count for p in pers], 0))
    return PerRequest(**cols, user=first.user, session=first.session, n_candidates=first.n_candidates, pairs=pairs)


@dataclass
class Estimate:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _multiplicities(session: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, N]: how often each request's session is drawn when resampling sessions with replacement."""
    _, sess = np.unique(session, return_inverse=True)
    n_sess = int(sess.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_sess, size=(n_boot, n_sess))
    per_session = np.stack([np.bincount(d, minlength=n_sess) for d in draws]).astype(np.float64)
    return per_session[:, sess]


def bootstrap(per: PerRequest, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Estimate]:
    """Every metric with a percentile interval from resampling whole sessions with replacement (seeded)."""
    point = per.point()
    if len(per) == 0:
        return {m: Estimate(float("nan"), float("nan"), float("nan")) for m in METRICS}
    mult = _multiplicities(per.session, n_boot, seed)
    reps: dict[str, np.ndarray] = {}
    for m in PER_REQUEST:
        v = getattr(per, m)
        ok = ~np.isnan(v)
        reps[m] = (mult[:, ok] @ v[ok]) / np.maximum(mult[:, ok].sum(1), 1e-12)
    reps["gauc"] = per.gauc(mult)
    alpha = (1.0 - level) / 2.0
    return {
        m: Estimate(point[m], float(np.nanquantile(reps[m], alpha)), float(np.nanquantile(reps[m], 1 - alpha)))
        for m in METRICS
    }


def paired_difference(
    a: PerRequest, b: PerRequest, metric: str = "ndcg10", n_boot: int = 1000, seed: int = 0
) -> Estimate:
    """Mean of a - b over the same requests with a paired session-bootstrap interval (is a better than b?)."""
    if len(a) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    delta = getattr(a, metric) - getattr(b, metric)
    mult = _multiplicities(a.session, n_boot, seed)
    reps = (mult @ delta) / mult.sum(1)
    return Estimate(float(delta.mean()), float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975)))
