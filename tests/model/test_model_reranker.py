"""The Dual Sequence ReRanker: shapes, masking, gate fallback, encode-once serving, cold start, ablations."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.model import (
    COUNTERS,
    SIGNALS,
    Batch,
    DualSequenceReranker,
    RerankerConfig,
    Sequence,
    Vocab,
    signal_rows,
)
from insession.model.reranker import COVISIT_DECAY, QUERY_BUCKETS, calendar_fields, query_match, words
from insession.model.vocab import QUERY_GRAMS

T0 = 1_700_000_000_000
HOUR = 3_600_000


def tiny_config(**kw: object) -> RerankerConfig:
    # 30 items in 6 subcategories in 3 categories
    base = RerankerConfig(
        n_items=31,
        n_subcats=6,
        n_cats=3,
        dim=16,
        n_heads=2,
        dropout=0.0,
        max_history=12,
        max_session=6,
        item_subcat=[-1] + [i % 6 for i in range(30)],
        subcat_cat=[s % 3 for s in range(6)],
        n_surfaces=4,
    )
    return replace(base, **kw)


def random_queries(g: torch.Generator, b: int, counts: list[int], width: int = 3) -> torch.Tensor:
    """[B, Q, G] hashed n-gram rows: counts[i] real queries in row i (the rest all-padding), each with
    1..G grams."""
    q = max(max(counts), 1)
    grams = torch.randint(1, QUERY_BUCKETS, (b, q, width), generator=g)
    used = torch.arange(width).view(1, 1, -1) < torch.randint(1, width + 1, (b, q, 1), generator=g)
    real = (torch.arange(q).view(1, -1) < torch.tensor(counts).view(-1, 1)).unsqueeze(-1)
    return grams * used * real


def random_sequence(g: torch.Generator, b: int, length: int, lengths: list[int], n_items: int) -> Sequence:
    items = torch.randint(1, n_items, (b, length), generator=g)
    actions = torch.randint(1, 6, (b, length), generator=g)
    ts = T0 - torch.randint(1, 200 * HOUR, (b, length), generator=g).sort(dim=1, descending=True).values
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Sequence(items * mask, actions * mask, ts * mask)


def random_batch(cfg: RerankerConfig, lengths_h: list[int], lengths_s: list[int], c: int = 7, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths_h)
    cands = torch.randint(1, cfg.n_items, (b, c), generator=g)
    labels = torch.zeros(b, c)
    labels[:, 0] = 1
    return Batch(
        history=random_sequence(g, b, max(max(lengths_h), 1), lengths_h, cfg.n_items),
        session=random_sequence(g, b, max(max(lengths_s), 1), lengths_s, cfg.n_items),
        request_ts=torch.full((b,), T0) + torch.randint(0, 10 * HOUR, (b,), generator=g),
        candidates=cands,
        counters=torch.randint(0, 20, (b, c, len(COUNTERS)), generator=g).float(),
        labels=labels,
        signals=torch.rand(b, c, len(SIGNALS), generator=g),
        surface=torch.randint(0, cfg.n_surfaces + 1, (b,), generator=g),
        queries=random_queries(g, b, [i % 3 for i in range(b)]),
    )


def model_for(cfg: RerankerConfig, seed: int = 0) -> DualSequenceReranker:
    torch.manual_seed(seed)
    return DualSequenceReranker(cfg).eval()


def test_shapes_and_forward_equals_encode_then_score() -> None:
    cfg = tiny_config(use_queries=True)  # every input, the query tokens too
    m = model_for(cfg)
    batch = random_batch(cfg, [12, 3, 0, 5], [6, 0, 2, 1])
    scores = m(batch)
    assert scores.shape == (4, 7)
    assert torch.isfinite(scores).all()
    enc = m.encode(batch.history, batch.session, batch.request_ts, batch.surface, batch.queries)
    assert batch.queries is not None and batch.queries.shape[1] == 2
    assert enc.history.shape == (4, 12, 16) and enc.session.shape == (4, 6 + 2, 16)  # events, then queries
    torch.testing.assert_close(m.score(enc, batch.candidates, batch.counters, signals=batch.signals), scores)


@pytest.mark.parametrize(
    "ablation",
    [
        {},
        {"shared_encoder": True},
        {"target_pooling": False},
        {"learned_gate": False},
        {"use_counters": False},
        {"use_time": False},
        {"cold_start": False},
        {"use_surface": False},
        {"surface_adapter": False},
        {"use_queries": True},
        {"use_query_match": False},
    ],
)
def test_encode_once_equals_per_candidate_forward(ablation: dict) -> None:
    """Serving shape: one encode, all candidates scored at once == one full forward pass per candidate
    (with a surface and two search queries among the request's inputs)."""
    cfg = tiny_config(**ablation)
    m = model_for(cfg)
    with torch.no_grad():  # adapters start at zero: give them weights, so the test can see them
        for p in m.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.1)
    batch = random_batch(cfg, [9], [4], c=20, seed=3)
    batch = replace(batch, surface=torch.tensor([2]), queries=random_queries(torch.Generator().manual_seed(1), 1, [2]))
    batch.candidates[0, 5] = 40  # a cold item (subcategory row) among them
    enc = m.encode_batch(batch)
    once = m.score(enc, batch.candidates[0], batch.counters[0], signals=batch.signals[0])  # [C] for one request
    assert once.shape == (20,)
    for c in range(20):
        single = replace(
            batch,
            candidates=batch.candidates[:, c : c + 1],
            counters=batch.counters[:, c : c + 1],
            labels=batch.labels[:, c : c + 1],
            signals=batch.signals[:, c : c + 1],
        )
        torch.testing.assert_close(m(single)[0, 0], once[c], atol=1e-5, rtol=0)


def test_encoded_state_is_shared_not_copied_across_candidates() -> None:
    cfg = tiny_config()
    m = model_for(cfg)
    batch = random_batch(cfg, [5], [2])
    enc = m.encode(batch.history, batch.session, batch.request_ts)
    before = enc.history.clone()
    m.score(enc, torch.arange(1, 31), torch.zeros(30, 3))
    assert torch.equal(enc.history, before)  # scoring never writes into the encoded state
    ctx = enc.calendar.unsqueeze(1).expand(1, 30, -1)  # the view score() builds for request-level context
    assert ctx.data_ptr() == enc.calendar.data_ptr() and ctx.stride(1) == 0


def test_padding_contents_do_not_matter() -> None:
    cfg = tiny_config()
    m = model_for(cfg)
    batch = random_batch(cfg, [4, 12], [2, 6])
    ref = m(batch)
    noisy = replace(
        batch, history=Sequence(batch.history.items, batch.history.actions.clone(), batch.history.ts.clone())
    )
    pad = ~batch.history.mask
    noisy.history.actions[pad] = 3
    noisy.history.ts[pad] = T0 - 5 * HOUR
    torch.testing.assert_close(m(noisy), ref)


def test_masking_and_gate_fallback() -> None:
    cfg = tiny_config()
    m = model_for(cfg)
    batch = random_batch(cfg, [5, 0, 3, 0], [3, 3, 0, 0])
    enc = m.encode(batch.history, batch.session, batch.request_ts)
    scores, why = m.score(enc, batch.candidates, batch.counters, explain=True)
    assert torch.isfinite(scores).all()
    assert (why.gate[1] == 1.0).all()  # no history: everything from the session
    assert (why.gate[2] == 0.0).all()  # no session: everything from the history
    assert ((why.gate[0] > 0) & (why.gate[0] < 1)).all()
    torch.testing.assert_close(why.history_attention[0].sum(-1), torch.ones(7))
    torch.testing.assert_close(why.history_attention[2].sum(-1), torch.ones(7))
    assert (why.history_attention[2][:, 3:] == 0).all()  # padding gets no attention
    assert (why.history_attention[1] == 0).all() and (why.session_attention[2] == 0).all()
    assert (why.history_attention[3] == 0).all() and (why.session_attention[3] == 0).all()


def test_empty_side_output_ignores_that_side() -> None:
    """With an empty session, changing the history changes scores; the (empty) session cannot."""
    cfg = tiny_config()
    m = model_for(cfg)
    a = random_batch(cfg, [6], [0], seed=1)
    b = replace(a, history=random_sequence(torch.Generator().manual_seed(9), 1, 6, [6], cfg.n_items))
    assert not torch.allclose(m(a), m(b))


def test_fixed_gate_is_half_when_both_sides_present() -> None:
    m = model_for(tiny_config(learned_gate=False))
    batch = random_batch(m.cfg, [5, 0], [3, 3])
    _, why = m.score(
        m.encode(batch.history, batch.session, batch.request_ts),
        batch.candidates,
        batch.counters,
        explain=True,
    )
    assert (why.gate[0] == 0.5).all() and (why.gate[1] == 1.0).all()


def test_repeat_boost_raises_attention_on_add_to_cart() -> None:
    cfg = tiny_config()
    m = model_for(cfg)
    batch = random_batch(cfg, [6], [0])
    enc = m.encode(batch.history, batch.session, batch.request_ts)
    _, before = m.score(enc, batch.candidates, batch.counters, explain=True)
    enc.history_atc[0, 2] = 1.0
    with torch.no_grad():
        m.history_pool.repeat_boost.fill_(3.0)
    _, after = m.score(enc, batch.candidates, batch.counters, explain=True)
    assert (after.history_attention[0, :, 2] > before.history_attention[0, :, 2]).all()


def test_cold_start_chain() -> None:
    vocab = Vocab.build(
        pa.array(["a", "b", "c", "d", "e"]),
        pa.array(["X", "X", "X", "Y", None]),
        pa.array(["x1", "x1", "x2", "y", None]),
    )
    cfg = vocab.config(dim=8, n_heads=2)
    m = model_for(cfg)
    w = m.item_embed.weight.weight
    new = vocab.lookup(
        pa.array(["a", "new", "new", "new", "new"]),
        pa.array(["X", "X", "X", "Z", None]),
        pa.array(["x1", "x1", "x9", "z", None]),
    )
    got = m.item_embed(torch.from_numpy(new))
    row = {item: i + 1 for i, item in enumerate(vocab.items)}
    torch.testing.assert_close(got[0], w[row["a"]])  # known item: its own vector
    torch.testing.assert_close(got[1], (w[row["a"]] + w[row["b"]]) / 2)  # subcategory X/x1
    torch.testing.assert_close(got[2], (w[row["a"]] + w[row["b"]] + w[row["c"]]) / 3)  # category X
    torch.testing.assert_close(got[3], w[1:].mean(0))  # unknown category: global average
    torch.testing.assert_close(got[4], w[1:].mean(0))
    off = model_for(replace(cfg, cold_start=False))
    assert (off.item_embed(torch.from_numpy(new))[1:] == 0).all()


def test_cold_rows_follow_training() -> None:
    cfg = tiny_config()
    m = model_for(cfg)
    with torch.no_grad():
        m.item_embed.weight.weight[1:] += 1.0
    m.train()
    m.eval()  # entering eval re-derives the cold rows
    torch.testing.assert_close(m.item_embed.cold[-1], m.item_embed.weight.weight[1:].mean(0))


@pytest.mark.parametrize(
    "ablation",
    [
        "shared_encoder", "target_pooling", "learned_gate", "use_counters", "use_time", "cold_start", "use_surface",
        "surface_adapter", "use_queries", "use_query_match",
    ],
)
def test_every_ablation_trains(ablation: str) -> None:
    cfg = tiny_config(**{ablation: not getattr(RerankerConfig(), ablation)})
    m = DualSequenceReranker(cfg).train()
    batch = random_batch(cfg, [5, 12, 0], [2, 0, 3])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(batch), batch.labels)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    if ablation == "shared_encoder":
        assert m.history_encoder is m.session_encoder


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=4_000_000_000_000))
def test_calendar_fields_match_datetime(ts: int) -> None:
    d = datetime.fromtimestamp(ts / 1000, UTC)
    got = calendar_fields(torch.tensor([ts]))[0].tolist()
    assert got == [d.hour, d.weekday(), (d.day - 1) // 7]


def test_signal_rows_by_hand() -> None:
    """Repeat, recency, co-visitation, category and past actions of each candidate, by item id (cold items
    never merge)."""
    h = HOUR
    events = (("a", "view", "k1", 90), ("b", "add_to_cart", "k2", 91), ("a", "view", "k1", 92), ("c", "view", "k2", 93))
    session = [{"item_id": i, "action": a, "category": k, "ts": t * h} for i, a, k, t in events]
    history = [
        {"item_id": "b", "action": "view", "category": "k2", "ts": 10 * h},
        {"item_id": "z", "action": "view", "ts": 20 * h},
        {"item_id": "z", "action": "purchase", "ts": 21 * h},
        {"item_id": "y", "action": "favorite", "ts": 22 * h},
    ]
    covisit = {"c": {"a": 2, "x": 4}, "a": {"x": 1, "b": 3}}  # most recent distinct session item first
    cats = ["k1", "k2", "k2", None, None, None]
    rows = dict(zip("abxqzy", signal_rows(list("abxqzy"), cats, session, history, covisit, 100 * h), strict=True))
    col = {name: i for i, name in enumerate(SIGNALS)}
    assert rows["a"][col["session_count"]] == pytest.approx(math.log1p(2))
    assert rows["a"][col["session_recency"]] == pytest.approx(1 / 2)  # one event (c) after its latest
    assert rows["b"][col["session_recency"]] == pytest.approx(1 / 3)
    assert rows["b"][col["session_carted"]] == 1.0 and rows["a"][col["session_carted"]] == 0.0
    assert rows["b"][col["history_count"]] == pytest.approx(math.log1p(1))
    assert rows["b"][col["history_recency"]] == pytest.approx(1 / 4)  # z, z, y came after it
    assert rows["x"][col["covisit_recent"]] == pytest.approx(math.log1p(4 + COVISIT_DECAY * 1))
    assert rows["x"][col["covisit_total"]] == pytest.approx(math.log1p(5))
    assert rows["a"][col["covisit_recent"]] == pytest.approx(math.log1p(2))
    assert rows["a"][col["session_category_share"]] == pytest.approx(2 / 4)
    assert rows["x"][col["last_category_match"]] == 1.0 and rows["a"][col["last_category_match"]] == 0.0
    # hours since the latest event on the item, session or history: b's is its session add-to-cart (9 h)
    assert rows["a"][col["touch_recency"]] == pytest.approx(1 / (1 + math.log1p(8)))
    assert rows["b"][col["touch_recency"]] == pytest.approx(1 / (1 + math.log1p(9)))
    assert rows["z"][col["touch_recency"]] == pytest.approx(1 / (1 + math.log1p(79)))
    assert rows["x"][col["touch_recency"]] == 0.0
    assert rows["z"][col["history_carted"]] == 1.0 and rows["b"][col["history_carted"]] == 0.0  # b: session only
    assert rows["y"][col["history_favorited"]] == 1.0 and rows["z"][col["history_favorited"]] == 0.0
    assert rows["q"] == [0.0] * len(SIGNALS)  # never touched, no co-visitation, unknown category


def test_query_match_is_the_best_share_of_a_query_s_words_naming_the_candidate() -> None:
    queries = ["Acme milk 03", "soap"]
    asked = [words(q) for q in queries]
    assert asked == [{"acme", "milk", "03"}, {"soap"}]
    assert query_match(asked, "dairy", "milk_03") == pytest.approx(2 / 3)  # milk, 03; not the brand
    assert query_match(asked, "dairy", "milk_04") == pytest.approx(1 / 3)
    assert query_match(asked, "soap", None) == 1.0  # the second query, every word
    assert query_match([words("café au lait")], "Café", "au_lait_drinks") == 1.0  # letters beyond ASCII count
    assert query_match([], "dairy", "milk_03") == 0.0
    assert query_match(asked, None, None) == 0.0  # not in the catalogue
    col = SIGNALS.index("query_match")
    assert signal_rows(["i1"], ["dairy"], [], [], {}, 0, ["milk"], ["--", ""])[0][col] == 0.0  # queries of no words
    rows = signal_rows(["i1", "i2", "i3"], ["dairy", "dairy", None], [], [], {}, 0, ["milk_03", "cheese_01", None],
                       queries)
    assert [r[col] for r in rows] == [pytest.approx(2 / 3), 0.0, 0.0]
    assert signal_rows(["i1"], ["dairy"], [], [], {}, 0)[0][col] == 0.0  # no subcategories, no queries


@pytest.mark.parametrize("use_counters", [True, False])
def test_signals_reach_the_head_unless_ablated(use_counters: bool) -> None:
    cfg = tiny_config(use_counters=use_counters)
    m = model_for(cfg)
    batch = random_batch(cfg, [5, 3], [4, 2])
    enc = m.encode(batch.history, batch.session, batch.request_ts)
    with_signals = m.score(enc, batch.candidates, batch.counters, signals=batch.signals)
    without = m.score(enc, batch.candidates, batch.counters)
    assert torch.allclose(with_signals, without) != use_counters  # type: ignore[arg-type]


@pytest.mark.parametrize("use_query_match", [True, False])
def test_the_query_match_signal_reaches_the_head_unless_ablated(use_query_match: bool) -> None:
    m = model_for(tiny_config(use_query_match=use_query_match))
    batch = random_batch(m.cfg, [5, 3], [4, 2])
    assert batch.signals is not None
    col = SIGNALS.index("query_match")
    matched, unmatched = batch.signals.clone(), batch.signals.clone()
    matched[..., col], unmatched[..., col] = 1.0, 0.0
    one, zero = (_scores_with(m, batch, signals=s) for s in (matched, unmatched))
    assert not torch.allclose(one, zero) if use_query_match else torch.equal(one, zero)
    other = unmatched.clone()
    other[..., SIGNALS.index("session_count")] += 1.0  # the other signals still count under the ablation
    assert not torch.allclose(_scores_with(m, batch, signals=other), zero)


def _scores_with(m: DualSequenceReranker, batch: Batch, **inputs: object) -> torch.Tensor:
    return m(replace(batch, **inputs)).detach()


@pytest.mark.parametrize("use_surface", [True, False])
def test_the_surface_reaches_the_head_unless_ablated(use_surface: bool) -> None:
    m = model_for(tiny_config(use_surface=use_surface))
    batch = random_batch(m.cfg, [5, 2], [3, 1])
    home, cart = (_scores_with(m, batch, surface=torch.tensor([s, s])) for s in (1, 3))
    assert not torch.allclose(home, cart) if use_surface else torch.equal(home, cart)
    assert torch.equal(_scores_with(m, batch, surface=None), _scores_with(m, batch, surface=torch.tensor([0, 0])))


def test_surface_adapters_start_shared_and_learn_only_their_surface() -> None:
    """Zero at start (the adapter model scores like the one without), and a batch of surface 2 trains
    surface 2's adapter rows only."""
    cfg = tiny_config()
    torch.manual_seed(0)
    m = DualSequenceReranker(cfg).train()
    torch.manual_seed(0)
    shared = DualSequenceReranker(replace(cfg, surface_adapter=False))
    shared.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("adapter_")})
    batch = replace(random_batch(cfg, [5, 3], [2, 4]), surface=torch.tensor([2, 2]))
    m.eval()
    shared.eval()
    torch.testing.assert_close(m(batch), shared(batch))
    m.train()
    torch.nn.functional.binary_cross_entropy_with_logits(m(batch), batch.labels).backward()
    for table in (m.adapter_wide, m.adapter_out):
        assert table is not None and table.weight.grad is not None
        grads = table.weight.grad.abs().sum(-1)
        assert grads[2] > 0 and grads[[0, 1, 3, 4]].sum() == 0


@pytest.mark.parametrize("use_queries", [True, False])
def test_queries_are_tokens_of_the_session_unless_ablated(use_queries: bool) -> None:
    m = model_for(tiny_config(use_queries=use_queries))
    batch = random_batch(m.cfg, [5, 2], [3, 0])
    g = torch.Generator().manual_seed(5)
    one, other = random_queries(g, 2, [2, 1]), random_queries(g, 2, [2, 1])
    a, b = _scores_with(m, batch, queries=one), _scores_with(m, batch, queries=other)
    assert not torch.allclose(a, b) if use_queries else torch.equal(a, b)
    # no query at all, all-padding queries and an absent input are the same request
    none = _scores_with(m, batch, queries=None)
    torch.testing.assert_close(_scores_with(m, batch, queries=torch.zeros(2, 3, QUERY_GRAMS, dtype=torch.long)), none)
    # padding grams inside a query do not change it
    padded = torch.cat([one, torch.zeros(2, 2, 4, dtype=torch.long)], -1)
    torch.testing.assert_close(_scores_with(m, batch, queries=padded), a)
    if use_queries:  # the queries follow the session's events in the attention; padding ones get none
        enc = m.encode(batch.history, batch.session, batch.request_ts, batch.surface, one)
        _, why = m.score(enc, batch.candidates, batch.counters, explain=True)
        assert why.session_attention.shape == (2, 7, 3 + 2)
        assert (why.session_attention[1, :, 3 + 1] == 0).all()  # request 1 has one query
        assert (why.session_attention[1, :, 3] > 0).all()  # an empty session still attends to its query
        torch.testing.assert_close(why.session_attention.sum(-1), torch.ones(2, 7))


def test_query_grams_are_stable_words_and_trigrams() -> None:
    grams = Vocab.query_grams("Cereals 24")
    assert grams == Vocab.query_grams("cereals  24!")  # lower-cased, split on non-word characters
    assert len(grams) == 2 + 7 + 2  # 2 words, then the trigrams of #cereals# (7) and #24# (2)
    assert all(0 < g < QUERY_BUCKETS for g in grams)
    assert len(Vocab.query_grams("word " * 40)) == QUERY_GRAMS and Vocab.query_grams(" !? ") == []
    rows = Vocab.query_rows(["milk", "urban diapers 45"])
    assert rows.shape == (2, QUERY_GRAMS) and (rows[0, 5:] == 0).all() and (rows[1] > 0).sum() == 3 + 5 + 7 + 2


def test_surfaces_index_from_one_and_unknown_is_zero(tmp_path: Path) -> None:
    vocab = Vocab.build(pa.array(["a"]), pa.array(["X"]), pa.array(["x"]), ["pdp", "home", None, "pdp"])
    assert vocab.surfaces == ["home", "pdp"] and vocab.config().n_surfaces == 2
    assert vocab.surface_index(["home", "pdp", "cart", None]).tolist() == [1, 2, 0, 0]
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json").surface_index(["pdp"]).tolist() == [2]
