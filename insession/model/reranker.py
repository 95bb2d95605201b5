"""The Dual Sequence ReRanker: one readable module, every component switchable for ablations.

Reading order: config -> inputs -> token embedding -> encoder blocks -> target-aware pooling -> gate ->
head -> the model (`encode` once per request, `score` all candidates in one pass, `forward` for training).

Item index space (built by `insession.model.vocab.Vocab`), one table shared by every item input:

    0            padding
    1 .. N       items with a trained embedding          (rows of `item_emb`)
    N+1 .. N+S   "unknown item of subcategory s"          (cold-start rows, derived, not trained)
    .. + K       "unknown item of category k"
    last         "unknown item, unknown category": the global average

The cold-start rows are means of the trained item embeddings over the subcategory / category / all
items (the chain SKU -> subcategory -> category -> global average); they are recomputed from the
current item embeddings whenever the model enters eval mode (`refresh_cold_start`).

Past the write-up (issue 17), two request-level inputs:

- the request's **surface** (home, search, pdp, cart, ...; `Vocab.surfaces`, 0 = unknown): an embedding the
  head reads beside the calendar, and a per-surface adapter (a surface's own offsets to the wide path's
  weights and a vector on the deep head's last hidden layer, both zero at start, so a surface departs
  from the shared head only as far as its data asks);
- the session's **search queries** (`session_queries`, the most recent distinct ones; `use_queries`, off by
  default: measured harmful on the realistic shop, see `RerankerConfig`): each a token
  appended to the session sequence, embedded as the mean of its hashed word and character-trigram rows
  (`Vocab.query_grams`; no downloaded model), plus the search action and "now" as its time, so the
  session encoder and target-aware pooling see what the shopper typed;
- and, among the head's signals, **query_match**: how much of a session query names the candidate's category
  or subcategory (`query_match`, a match of words: it needs no training data to say "this is what was
  searched for", which the query tokens must learn from a few hundred groups).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from collections.abc import Sequence as Sequence_
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from insession.schema import ACTIONS

ADD_TO_CART = ACTIONS.index("add_to_cart") + 1  # action index 0 is padding
SEARCH = ACTIONS.index("search") + 1
QUERIES = "session_queries"  # the feature of the session's search queries, tokens of the session sequence
QUERY_BUCKETS = 1 << 14  # rows of the hashed query n-gram table (`Vocab.query_grams`); row 0 is padding
COUNTERS: tuple[str, ...] = ("user_item_count_28d", "item_count_28d", "item_trending_2h")
# Per-(request, candidate) signals of the shopper's own sequences, by item id (so cold items, which share a
# cold-start row, are still told apart), computed by `signal_rows` from the served state.
SIGNALS: tuple[str, ...] = (
    "session_count",  # log1p(events of the candidate in the session so far)
    "session_recency",  # 1 / (1 + events since the candidate's latest session event); 0 if absent
    "session_carted",  # 1 if the candidate was already added to cart in this session
    "history_count",  # log1p(events of the candidate in the history sequence)
    "history_recency",  # 1 / (1 + events since its latest history event); 0 if absent
    "covisit_recent",  # log1p(sum_j 0.5^j covisit(session item j, candidate)), j = 0 most recent distinct
    "covisit_total",  # log1p(sum_j covisit(session item j, candidate))
    "session_category_share",  # share of the session's events in the candidate's category
    "last_category_match",  # 1 if the candidate's category is that of the session's newest event
    "touch_recency",  # 1 / (1 + log1p(hours since the shopper's latest event on it, session or history)); 0 if none
    "history_carted",  # 1 if the history holds an add-to-cart or purchase of the candidate
    "history_favorited",  # 1 if the history holds a favourite of the candidate
    "query_match",  # the largest share of a session query's words in the candidate's category and subcategory
)
COVISIT_DECAY = 0.5
MS_PER_HOUR = 3_600_000


def counter_value(v: Any) -> float:
    """One counter input of the head from a feature value as the feature engine returns it: a count by
    action ({"view": 3, "add_to_cart": 1, ...}) counts every action; a missing value counts 0. Training data
    (`counter_matrix`, column by column) and serving both follow this one rule."""
    if type(v) is dict or isinstance(v, Mapping):  # the exact type first: the ABC check is slow per call
        return float(sum(v.values()))
    return float(v or 0)


def _recency_counts(events: Sequence_[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """item -> (events of it, events since its latest one: 0 = the newest event)."""
    out: dict[str, tuple[int, int]] = {}
    n = len(events)
    for j, e in enumerate(events):
        count = out.get(e["item_id"], (0, 0))[0]
        out[e["item_id"]] = (count + 1, n - 1 - j)
    return out


@lru_cache(maxsize=1 << 16)
def words(text: str) -> frozenset[str]:
    """The lower-case words of a query or catalogue name: runs of letters and digits (`milk_03` and
    `Milk 03` are both {milk, 03}). Cached: every ranking asks for its ~60 candidates' category names, which
    repeat from request to request, and training for every candidate of every group."""
    return frozenset(re.findall(r"[^\W_]+", text.lower()))


def query_match(queries: Sequence_[frozenset[str]], category: str | None, subcategory: str | None) -> float:
    """The `query_match` signal: the largest share of one query's words (`words` of each query, none empty)
    that name the candidate's category or subcategory (1.0: every word of a query does; 0 without a query or
    a catalogue entry). Query tokens in the session sequence must learn which item a query's hashed n-grams
    point to, and on the realistic shop they did not (10 seeds, docs/evaluation.md); a match of words needs
    no learning to say it."""
    if not queries or (category is None and subcategory is None):
        return 0.0
    names = words(f"{category or ''} {subcategory or ''}")
    return max(len(q & names) / len(q) for q in queries)


def signal_rows(
    candidates: Sequence_[str],
    categories: Sequence_[str | None],
    session: Sequence_[Mapping[str, Any]],
    history: Sequence_[Mapping[str, Any]],
    covisit: Mapping[str, Mapping[str, int]],
    now_ms: int,
    subcategories: Sequence_[str | None] | None = None,
    queries: Sequence_[str] = (),
) -> list[list[float]]:
    """The head's SIGNALS for each candidate, from the served state (training, evaluation and serving all
    go through this one function).

    categories / subcategories: each candidate's catalogue category and subcategory (None: unknown; no
    subcategories: all unknown); session / history: the `session_seq` / `history_seq` features (events
    oldest -> newest, dicts with item_id, action, ts and category); covisit: the `covisit` feature
    ({neighbour: count}) of the session's distinct items, most recent first (the candidate stage reads the
    same lists); now_ms: the request instant (the model's request_ts); queries: the `session_queries` feature.
    """
    subs = subcategories if subcategories is not None else [None] * len(candidates)
    query_words = [w for w in map(words, queries) if w]
    sess, hist = _recency_counts(session), _recency_counts(history)
    carted = {e["item_id"] for e in session if e["action"] == "add_to_cart"}
    latest: dict[str, int] = {}  # item -> ts of the shopper's latest event on it
    for e in (*history, *session):
        latest[e["item_id"]] = max(latest.get(e["item_id"], e["ts"]), e["ts"])
    hist_carted = {e["item_id"] for e in history if e["action"] in ("add_to_cart", "purchase")}
    hist_fav = {e["item_id"] for e in history if e["action"] == "favorite"}
    in_category: dict[str, int] = {}
    for e in session:
        if e.get("category") is not None:
            in_category[e["category"]] = in_category.get(e["category"], 0) + 1
    last = session[-1].get("category") if session else None
    rows = []
    for c, cat, sub in zip(candidates, categories, subs, strict=True):
        s_n, s_age = sess.get(c, (0, 0))
        h_n, h_age = hist.get(c, (0, 0))
        recent = total = 0.0
        for j, nbrs in enumerate(covisit.values()):
            n = nbrs.get(c, 0)
            recent += COVISIT_DECAY**j * n
            total += n
        rows.append(
            [
                math.log1p(s_n),
                1.0 / (1 + s_age) if s_n else 0.0,
                float(c in carted),
                math.log1p(h_n),
                1.0 / (1 + h_age) if h_n else 0.0,
                math.log1p(recent),
                math.log1p(total),
                in_category.get(cat, 0) / len(session) if cat is not None and session else 0.0,
                float(cat is not None and cat == last),
                1.0 / (1.0 + math.log1p(max(now_ms - latest[c], 0) / MS_PER_HOUR)) if c in latest else 0.0,
                float(c in hist_carted),
                float(c in hist_fav),
                query_match(query_words, cat, sub),
            ]
        )
    return rows


@dataclass
class RerankerConfig:
    """Sizes and ablation switches. Defaults are the full model, sized for a 2-core CPU."""

    n_items: int = 2  # rows of the trained item table: padding + N items
    n_subcats: int = 0
    n_cats: int = 0
    dim: int = 128  # item embedding width = token width = encoder width
    n_layers: int = 1
    n_heads: int = 2
    dropout: float = 0.1
    max_history: int = 50  # longest history sequence fed to the encoder (most recent kept)
    max_session: int = 20
    calendar_dim: int = 8
    n_surfaces: int = 0  # surfaces known to the model (`Vocab.surfaces`); index 0 is "unknown or none"
    # ablation switches (issue 6): each False/True below departs from the full model
    shared_encoder: bool = False  # one encoder for history and session instead of two
    target_pooling: bool = True  # False: masked mean pooling, the same profile for every candidate
    learned_gate: bool = True  # False: fixed g = 0.5 (the masked-side fallback still applies)
    use_counters: bool = True  # False: the head sees no real-time counters
    use_time: bool = True  # False: position index instead of the MLP on hours-to-request
    cold_start: bool = True  # False: unknown items embed as the zero vector
    use_surface: bool = True  # False: the head sees no surface (neither the embedding nor the adapter)
    surface_adapter: bool = True  # False: the surface is only a head input; every surface shares the head
    # True: the session's search queries are tokens of the session sequence. Off by default since 2026-12-01:
    # on the realistic shop they cost NDCG@10 in two 10-seed runs (forced view -0.012 and -0.013, the search
    # surface too), where `query_match` helps on search (docs/evaluation.md, sections realistic_*)
    use_queries: bool = False
    use_query_match: bool = True  # False: the head reads the `query_match` signal as 0
    loss: str = "hybrid"  # "hybrid" or "bce" (read by insession.train.loss)
    item_subcat: list[int] = field(default_factory=list)  # subcategory of each trained item row (-1: pad)
    subcat_cat: list[int] = field(default_factory=list)  # category of each subcategory

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sequence:
    """One padded side (history or session) of B requests, oldest -> newest, padding at the end."""

    items: Tensor  # [B, L] long, item index, 0 = padding
    actions: Tensor  # [B, L] long, 1 + ACTIONS.index(action), 0 = padding
    ts: Tensor  # [B, L] long, event time in epoch ms

    @property
    def mask(self) -> Tensor:
        return self.items != 0


@dataclass
class Batch:
    """B example groups of C candidates each: everything `forward` and the loss need."""

    history: Sequence
    session: Sequence
    request_ts: Tensor  # [B] long epoch ms
    candidates: Tensor  # [B, C] long item index, 0 = padding
    counters: Tensor  # [B, C, len(COUNTERS)] float, as of just before the request
    labels: Tensor  # [B, C] float, 1 = added to cart
    signals: Tensor | None = None  # [B, C, len(SIGNALS)] float (`signal_rows`); None reads as zeros
    surface: Tensor | None = None  # [B] long, 1 + Vocab.surfaces index, 0 = unknown; None reads as zeros
    queries: Tensor | None = None  # [B, Q, G] long hashed query n-grams (`Vocab.query_grams`), 0 = padding

    def __len__(self) -> int:
        return self.candidates.shape[0]


@dataclass
class Encoded:
    """What `encode` computes once per request and `score` reuses for every candidate."""

    history: Tensor  # [B, Lh, D] encoder output
    session: Tensor  # [B, Ls + Q, D]: the session's events, then its query tokens
    history_items: Tensor  # [B, Lh] item index (masks and repeat counts)
    session_items: Tensor  # [B, Ls + Q], 0 on the query tokens
    session_mask: Tensor  # [B, Ls + Q] bool: the session's events and its queries
    history_hours: Tensor  # [B, Lh] hours between event and request (or position from the end)
    session_hours: Tensor
    history_atc: Tensor  # [B, Lh] float, 1 where the event is an add-to-cart
    session_atc: Tensor
    calendar: Tensor  # [B, 3 * calendar_dim]
    surface: Tensor  # [B] long


@dataclass
class Explanation:
    """Why each candidate scored as it did: pooling attention over both sequences and the gate."""

    history_attention: Tensor  # [B, C, Lh], rows sum to 1 (0 where the history is empty)
    session_attention: Tensor  # [B, C, Ls + Q]: the session's events, then its query tokens
    gate: Tensor  # [B, C] weight of the session side in the fused profile


def calendar_fields(ts_ms: Tensor) -> Tensor:
    """[..] epoch ms -> [.., 3] long: hour of day (0-23), day of week (Monday 0), week of month (0-4), UTC."""
    days = torch.div(ts_ms, 86_400_000, rounding_mode="floor")
    hour = torch.div(ts_ms - days * 86_400_000, MS_PER_HOUR, rounding_mode="floor")
    dow = (days + 3) % 7  # 1970-01-01 was a Thursday
    # day of month from days since epoch (H. Hinnant, "chrono-compatible low-level date algorithms")
    z = days + 719_468
    era = torch.div(z, 146_097, rounding_mode="floor")
    doe = z - era * 146_097
    yoe = torch.div(doe - doe // 1460 + doe // 36_524 - doe // 146_096, 365, rounding_mode="floor")
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day_of_month = doy - (153 * mp + 2) // 5 + 1
    return torch.stack([hour, dow, (day_of_month - 1) // 7], dim=-1)


class TokenEmbedding(nn.Module):
    """token = item embedding + action embedding + MLP(log1p hours to request) (or a position embedding)."""

    def __init__(self, cfg: RerankerConfig, item_embed: ItemEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = item_embed
        self.action = nn.Embedding(len(ACTIONS) + 1, cfg.dim, padding_idx=0)
        if cfg.use_time:
            self.time = nn.Sequential(nn.Linear(1, 16), nn.GELU(), nn.Linear(16, cfg.dim))
        else:
            self.position = nn.Embedding(max(cfg.max_history, cfg.max_session), cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, items: Tensor, actions: Tensor, hours: Tensor) -> Tensor:
        # with use_time=False, `hours` holds the position from the newest event instead
        return self.drop(self.items(items) + self.action(actions) + self._when(hours))

    def _when(self, hours: Tensor) -> Tensor:
        return self.time(torch.log1p(hours).unsqueeze(-1)) if self.cfg.use_time else self.position(hours.long())

    def searches(self, queries: Tensor) -> Tensor:
        """Query vectors [B, Q, D] as tokens: + the search action, at "now" (hours 0, position 0)."""
        now = queries.new_zeros(queries.shape[:-1])
        return self.drop(queries + self.action(torch.full_like(now, SEARCH, dtype=torch.long)) + self._when(now))


class SelfAttention(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # a row with no valid key would give NaN; let it attend to its padding (its output is masked later)
        keys = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim),
            nn.GELU(),
            nn.Linear(4 * cfg.dim, cfg.dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """Token embedding + pre-norm blocks + final norm; padded positions come out as zeros."""

    def __init__(self, cfg: RerankerConfig, tokens: TokenEmbedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.dim)

    def forward(
        self, items: Tensor, actions: Tensor, hours: Tensor, queries: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor:
        """Events [B, L] (and query vectors [B, Q, D] with their mask, appended as tokens) -> [B, L(+Q), D]."""
        mask = items != 0
        x = self.tokens(items, actions, hours)
        if queries is not None and query_mask is not None:
            x = torch.cat([x, self.tokens.searches(queries)], 1)
            mask = torch.cat([mask, query_mask], 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x) * mask.unsqueeze(-1)


class QueryEmbedding(nn.Module):
    """A query's vector: the mean of its hashed word and character-trigram rows (`Vocab.query_grams`)."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.grams = nn.Embedding(QUERY_BUCKETS, cfg.dim, padding_idx=0)
        nn.init.normal_(self.grams.weight, std=0.1)
        with torch.no_grad():
            self.grams.weight[0].zero_()

    def forward(self, grams: Tensor) -> tuple[Tensor, Tensor]:
        """[B, Q, G] n-gram rows (0 = padding) -> vectors [B, Q, D] and the mask [B, Q] of real queries."""
        present = grams != 0
        n = present.sum(-1, keepdim=True)
        return self.grams(grams).sum(-2) / n.clamp(min=1), n.squeeze(-1) > 0


class ItemEmbedding(nn.Module):
    """Trained item rows plus the derived cold-start rows (see the module docstring)."""

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Embedding(cfg.n_items, cfg.dim, padding_idx=0)
        nn.init.normal_(self.weight.weight, std=0.1)
        with torch.no_grad():
            self.weight.weight[0].zero_()
        subcat = cfg.item_subcat or [-1] * cfg.n_items
        self.register_buffer("item_subcat", torch.tensor(subcat, dtype=torch.long), persistent=True)
        self.register_buffer("subcat_cat", torch.tensor(cfg.subcat_cat, dtype=torch.long), persistent=True)
        self.register_buffer("cold", torch.zeros(cfg.n_subcats + cfg.n_cats + 1, cfg.dim), persistent=True)

    @torch.no_grad()
    def refresh_cold_start(self) -> None:
        """cold rows := mean trained embedding of each subcategory, each category, and of all items."""
        self.cold.zero_()
        if not self.cfg.cold_start or self.cfg.n_items < 2:
            return
        w = self.weight.weight[1:]
        sub = self.item_subcat[1:]
        known = sub >= 0
        d = w.shape[1]
        s, k = self.cfg.n_subcats, self.cfg.n_cats
        sub_sum = torch.zeros(s, d).index_add_(0, sub[known], w[known])
        sub_n = torch.zeros(s).index_add_(0, sub[known], torch.ones(int(known.sum())))
        cat_of_item = self.subcat_cat[sub[known]] if s else sub[known]
        cat_sum = torch.zeros(k, d).index_add_(0, cat_of_item, w[known])
        cat_n = torch.zeros(k).index_add_(0, cat_of_item, torch.ones(int(known.sum())))
        glob = w.mean(0)
        self.cold[:s] = torch.where(sub_n[:, None] > 0, sub_sum / sub_n.clamp(min=1)[:, None], glob)
        self.cold[s : s + k] = torch.where(cat_n[:, None] > 0, cat_sum / cat_n.clamp(min=1)[:, None], glob)
        self.cold[-1] = glob

    def forward(self, idx: Tensor) -> Tensor:
        n = self.cfg.n_items
        trained = self.weight(idx.clamp(max=n - 1))
        cold = F.embedding((idx - n).clamp(min=0, max=self.cold.shape[0] - 1), self.cold)
        return torch.where((idx >= n).unsqueeze(-1), cold, trained)


class TargetPooling(nn.Module):
    """Candidate-as-query attention over one encoded sequence: one profile per (request, candidate).

    logit(c, t) = <Wq c, Wk h_t> / sqrt(D) - softplus(decay) * log1p(hours_t)
                  + repeat_boost * [event t is an add-to-cart]
    """

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.decay = nn.Parameter(torch.tensor(-1.0))
        self.repeat_boost = nn.Parameter(torch.tensor(0.5))

    def forward(self, cand: Tensor, h: Tensor, mask: Tensor, hours: Tensor, atc: Tensor) -> tuple[Tensor, Tensor]:
        """cand [B, C, D], h [B, L, D], mask/hours/atc [B, L] -> pooled [B, C, D], weights [B, C, L]."""
        b, c, _ = cand.shape
        if not self.cfg.target_pooling:  # masked mean, the same for every candidate (expanded, not copied)
            w = mask.float() / mask.sum(-1, keepdim=True).clamp(min=1)
            w = w.unsqueeze(1).expand(b, c, -1)
            return torch.bmm(w, h), w
        # h is broadcast across the C candidates by the batched matmul: no per-candidate copy of it
        logits = torch.bmm(self.q(cand), self.k(h).transpose(1, 2)) / math.sqrt(self.cfg.dim)
        bias = -F.softplus(self.decay) * torch.log1p(hours) + self.repeat_boost * atc
        logits = (logits + bias.unsqueeze(1)).masked_fill(~mask.unsqueeze(1), float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an empty sequence pools to zeros
        return torch.bmm(w, self.v(h)), w


class DualSequenceReranker(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_embed = ItemEmbedding(cfg)
        self.history_encoder = Encoder(cfg, TokenEmbedding(cfg, self.item_embed))
        self.session_encoder = (
            self.history_encoder if cfg.shared_encoder else Encoder(cfg, TokenEmbedding(cfg, self.item_embed))
        )
        self.history_pool = TargetPooling(cfg)
        self.session_pool = TargetPooling(cfg)
        self.hour = nn.Embedding(24, cfg.calendar_dim)
        self.weekday = nn.Embedding(7, cfg.calendar_dim)
        self.week_of_month = nn.Embedding(5, cfg.calendar_dim)
        self.queries = QueryEmbedding(cfg) if cfg.use_queries else None
        # 1 for each signal the head reads, 0 for `query_match` under its ablation (a buffer: exported with the model)
        keep = torch.ones(len(SIGNALS))
        keep[SIGNALS.index("query_match")] = float(cfg.use_query_match)
        self.register_buffer("keep_signals", keep, persistent=False)
        n_meta = 4 + len(SIGNALS)  # lengths (2), similarities (2), the candidate's repeat signals
        self.gate = nn.Sequential(nn.Linear(3 * d + n_meta, d), nn.GELU(), nn.Linear(d, 1))
        self.cand_proj = nn.Linear(d, d)
        n_wide = len(COUNTERS) + len(SIGNALS)
        surface_dim = cfg.calendar_dim if cfg.use_surface else 0
        self.surface = nn.Embedding(cfg.n_surfaces + 1, surface_dim) if cfg.use_surface else None
        head_in = 3 * d + n_wide + 3 * cfg.calendar_dim + surface_dim
        self.head = nn.Sequential(
            nn.Linear(head_in, 2 * d),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(2 * d, d),
            nn.GELU(),
        )
        self.head_out = nn.Linear(d, 1)
        # a linear ("wide") path from the real-time counters and signals straight to the logit: the deep head
        # above learns interactions, this learns the strong monotone effects (recency, repeats) in few steps
        self.wide = nn.Linear(n_wide, 1)
        # the per-surface adapter: each surface's offsets to the wide weights (+ a bias) and its own output
        # vector on the head's last hidden layer; zero at start, i.e. the shared head
        self.adapter_wide = self.adapter_out = None
        if cfg.use_surface and cfg.surface_adapter:
            self.adapter_wide = nn.Embedding(cfg.n_surfaces + 1, n_wide + 1)
            self.adapter_out = nn.Embedding(cfg.n_surfaces + 1, d)
            nn.init.zeros_(self.adapter_wide.weight)
            nn.init.zeros_(self.adapter_out.weight)

    # --- the item table --------------------------------------------------------------------------
    def init_item_vectors(self, vectors: Tensor) -> None:
        """Copy pre-trained item vectors [n_items, dim] (row 0 = padding) into the item table."""
        with torch.no_grad():
            self.item_embed.weight.weight.copy_(vectors)
            self.item_embed.weight.weight[0].zero_()
        self.item_embed.refresh_cold_start()

    def refresh_cold_start(self) -> None:
        self.item_embed.refresh_cold_start()

    def train(self, mode: bool = True) -> DualSequenceReranker:
        """Entering eval mode re-derives the cold-start rows from the current item embeddings."""
        if not mode:
            self.item_embed.refresh_cold_start()
        return super().train(mode)

    # --- serving shape: encode once, score many --------------------------------------------------
    def _hours(self, seq: Sequence, request_ts: Tensor) -> Tensor:
        if self.cfg.use_time:
            return ((request_ts.unsqueeze(1) - seq.ts).clamp(min=0) / MS_PER_HOUR).float() * seq.mask
        # position from the most recent event (0 = newest), used instead of elapsed time
        n = seq.mask.sum(-1, keepdim=True)
        pos = n - 1 - torch.arange(seq.items.shape[1]).unsqueeze(0)
        return (pos.clamp(min=0) * seq.mask).float()

    def encoder_states(self, side: str, seq: Sequence, request_ts: Tensor) -> Tensor:
        """One side's encoder output [B, L, D] ("history" or "session"), as `encode` computes it; the
        pre-training objective (`insession.train.pretrain`) reads it too."""
        if side not in ("history", "session"):
            raise ValueError(f"encoder side {side!r}: use 'history' or 'session'")
        encoder = self.history_encoder if side == "history" else self.session_encoder
        return encoder(seq.items, seq.actions, self._hours(seq, request_ts))

    def encode(
        self, history: Sequence, session: Sequence, request_ts: Tensor, surface: Tensor | None = None,
        queries: Tensor | None = None,
    ) -> Encoded:
        """Run both encoders once per request. request_ts [B] epoch ms; surface [B] (None: unknown);
        queries [B, Q, G] hashed n-grams of the session's search queries (None: none)."""
        h_hours, s_hours = self._hours(history, request_ts), self._hours(session, request_ts)
        s_items, s_mask = session.items, session.mask
        s_atc = (session.actions == ADD_TO_CART).float()
        if self.queries is not None and queries is not None:
            q, q_mask = self.queries(queries)
            s_state = self.session_encoder(session.items, session.actions, s_hours, q, q_mask)
            pad = q_mask.new_zeros(q_mask.shape, dtype=torch.long)
            s_items, s_mask = torch.cat([s_items, pad], 1), torch.cat([s_mask, q_mask], 1)
            s_hours, s_atc = torch.cat([s_hours, pad.float()], 1), torch.cat([s_atc, pad.float()], 1)
        else:
            s_state = self.encoder_states("session", session, request_ts)
        cal = calendar_fields(request_ts)
        return Encoded(
            history=self.encoder_states("history", history, request_ts),
            session=s_state,
            history_items=history.items,
            session_items=s_items,
            session_mask=s_mask,
            history_hours=h_hours,
            session_hours=s_hours,
            history_atc=(history.actions == ADD_TO_CART).float(),
            session_atc=s_atc,
            calendar=torch.cat([self.hour(cal[:, 0]), self.weekday(cal[:, 1]), self.week_of_month(cal[:, 2])], -1),
            surface=request_ts.new_zeros(request_ts.shape) if surface is None else surface,
        )

    def score(
        self,
        enc: Encoded,
        candidates: Tensor,
        counters: Tensor,
        explain: bool = False,
        signals: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Explanation]:
        """Scores (logits) of all candidates in one batched pass.

        candidates [B, C] (or [C] for one request), counters [B, C, 3] (or [C, 3]) in COUNTERS order,
        signals [B, C, len(SIGNALS)] (or [C, len(SIGNALS)]) in SIGNALS order (None: zeros, i.e. "never touched,
        no co-visitation").
        Returns [B, C] (or [C]); with explain=True also the attention weights and the gate.
        """
        single = candidates.dim() == 1
        if signals is None:
            signals = counters.new_zeros(*counters.shape[:-1], len(SIGNALS))
        if single:
            candidates, counters, signals = candidates.unsqueeze(0), counters.unsqueeze(0), signals.unsqueeze(0)
        b, c = candidates.shape
        if not self.cfg.use_counters:  # the "no real-time counters" ablation drops every real-time signal
            counters, signals = torch.zeros_like(counters), torch.zeros_like(signals)
        elif not self.cfg.use_query_match:
            signals = signals * self.keep_signals
        cand = self.item_embed(candidates)  # [B, C, D]
        h_mask, s_mask = enc.history_items != 0, enc.session_mask
        ph, wh = self.history_pool(cand, enc.history, h_mask, enc.history_hours, enc.history_atc)
        ps, ws = self.session_pool(cand, enc.session, s_mask, enc.session_hours, enc.session_atc)

        h_empty = (~h_mask.any(-1)).view(b, 1, 1).expand(b, c, 1)
        s_empty = (~s_mask.any(-1)).view(b, 1, 1).expand(b, c, 1)
        if self.cfg.learned_gate:
            meta = torch.stack(
                [
                    torch.log1p(h_mask.sum(-1).float()).view(b, 1).expand(b, c),
                    torch.log1p((enc.session_items != 0).sum(-1).float()).view(b, 1).expand(b, c),
                    F.cosine_similarity(cand, ph, dim=-1),
                    F.cosine_similarity(cand, ps, dim=-1),
                ],
                dim=-1,
            )
            meta = torch.cat([meta, signals.float()], -1)
            g = torch.sigmoid(self.gate(torch.cat([ps, ph, cand, meta], -1)))
        else:
            g = torch.full((b, c, 1), 0.5)
        g = torch.where(s_empty, 0.0, torch.where(h_empty, 1.0, g))  # a fully masked side gets no weight
        fused = g * ps + (1 - g) * ph

        wide = torch.cat([torch.log1p(counters.float()), signals.float()], -1)
        context = [enc.calendar]  # request-level context, a view per candidate
        if self.surface is not None:
            context.append(self.surface(enc.surface))
        request = torch.cat(context, -1).unsqueeze(1).expand(b, c, -1)
        x = torch.cat([fused, self.cand_proj(cand), fused * cand, wide, request], dim=-1)
        hidden = self.head(x)
        scores = self.head_out(hidden) + self.wide(wide)
        if self.adapter_wide is not None and self.adapter_out is not None:
            own = self.adapter_wide(enc.surface).unsqueeze(1)  # [B, 1, n_wide + 1]
            scores = scores + (wide * own[..., :-1]).sum(-1, keepdim=True) + own[..., -1:]
            scores = scores + (hidden * self.adapter_out(enc.surface).unsqueeze(1)).sum(-1, keepdim=True)
        scores = scores.squeeze(-1)
        if single:
            scores = scores.squeeze(0)
        if not explain:
            return scores
        return scores, Explanation(history_attention=wh, session_attention=ws, gate=g.squeeze(-1))

    def forward(self, batch: Batch) -> Tensor:
        """Training path: exactly encode + score. Returns logits [B, C]."""
        enc = self.encode_batch(batch)
        return self.score(enc, batch.candidates, batch.counters, signals=batch.signals)  # type: ignore[return-value]

    def encode_batch(self, batch: Batch) -> Encoded:
        """`encode` of a training batch's request-level inputs (the loss scores extra candidates with it)."""
        return self.encode(batch.history, batch.session, batch.request_ts, batch.surface, batch.queries)
