"""Pre-training of the reranker's sequence side (issue 20), masked-item and next-item: each objective on a
hand-made case, the weights it leaves, its windows and prefixes, and point-in-time correctness of its stream."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from train_shop import make_shop

from insession.model.reranker import DualSequenceReranker, RerankerConfig, Sequence
from insession.train.build import BuildConfig, TrainingData, build
from insession.train.pipeline import train_model
from insession.train.pretrain import (
    OBJECTIVES,
    ItemHead,
    PretrainConfig,
    Stream,
    mask_window,
    next_item_prefixes,
    pretrain,
    pretrained_parameters,
    window_offsets,
)
from insession.train.trainer import TrainConfig, finetune_optimizer, fit, seed_everything


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: on a machine shared with other jobs, more threads only wait on each other (the hand-made
    case took 130 s on 2 busy cores with the default threads, ~2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_ITEMS = 11  # padding + items 1..10
UNKNOWN = N_ITEMS  # the global-average row (no subcategories or categories)


def runs_stream(n: int = 240, seed: int = 0) -> Stream:
    """One 3-event session per shopper: items a, a+1, a+2 for a random a in 1..8, so the middle item of a
    window is certain given its two neighbours."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(1, 9, n)
    items = np.stack([starts, starts + 1, starts + 2], 1).ravel()
    who = np.repeat(np.arange(n), 3)
    ts = who * 3_600_000 + np.tile(np.arange(3), n) * 60_000
    return Stream(items, np.ones(len(items), np.int64), ts, who, who, cutoff=int(ts.max()) + 1)


def tiny_model(seed: int = 0) -> DualSequenceReranker:
    torch.manual_seed(seed)
    return DualSequenceReranker(RerankerConfig(n_items=N_ITEMS, dim=32, dropout=0.0))


@torch.no_grad()
def middle_accuracy(model: DualSequenceReranker, head: ItemHead | None = None) -> float:
    """Share of a in 1..8 for which the history encoder's state at a masked middle event, scored against the
    item table (through `head` when given, else the raw dot product), ranks a+1 first."""
    model.eval()
    a = torch.arange(1, 9)
    items = torch.stack([a, torch.full_like(a, UNKNOWN), a + 2], 1)
    ts = torch.tensor([[0, 60_000, 120_000]]).expand(8, 3)
    states = model.encoder_states("history", Sequence(items, torch.ones_like(items), ts), ts[:, -1])[:, 1]
    table = model.item_embed.weight.weight
    logits = head(states, table) if head is not None else states @ table.T
    logits[:, 0] = -torch.inf
    return float((logits.argmax(-1) == a + 1).float().mean())


def test_masked_item_is_predicted_after_a_few_epochs() -> None:
    """The objective learns a certain masked item: before pre-training the model ranks it first at chance,
    after 25 epochs for (nearly) every start item."""
    model = tiny_model()
    head = ItemHead(32, N_ITEMS)
    assert middle_accuracy(model, head) <= 0.5
    logs = pretrain(
        model,
        runs_stream(),
        UNKNOWN,
        PretrainConfig(epochs=25, lr=3e-3, batch_size=32, item_scale=1.0),
        progress=False,
        head=head,
    )
    assert len(logs) == 25 and logs[-1].loss < logs[0].loss / 2
    assert middle_accuracy(model, head) >= 0.85
    assert not model.training  # left in eval mode, the cold-start rows re-derived


def test_mask_window_masks_only_trained_items_and_at_least_one_per_row() -> None:
    items = torch.tensor([[3, 4, 5, 0, 0], [12, 2, 0, 0, 0], [12, 13, 0, 0, 0]])  # 12, 13: cold-start rows
    gen = torch.Generator().manual_seed(0)
    masked, targets = mask_window(items, N_ITEMS, UNKNOWN, 0.0, gen)
    assert (targets > 0).sum(-1).tolist() == [1, 1, 0]  # rate 0: exactly one per row that has a trained item
    assert targets[1].tolist() == [0, 2, 0, 0, 0]  # never a cold row, never padding
    assert torch.equal(masked[targets > 0], torch.full(((targets > 0).sum(),), UNKNOWN))
    assert torch.equal(masked[targets == 0], items[targets == 0])
    masked, targets = mask_window(items, N_ITEMS, UNKNOWN, 1.0, gen)
    assert torch.equal(targets, torch.where((items > 0) & (items < N_ITEMS), items, 0))


def test_window_offsets_never_cross_a_group_and_keep_the_newest_full() -> None:
    group = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    assert window_offsets(group, 2).tolist() == [0, 1, 3, 5, 7, 8]
    assert window_offsets(group, 10).tolist() == [0, 5, 7, 8]
    assert window_offsets(np.zeros(0, np.int64), 3).tolist() == [0]


@torch.no_grad()
def next_accuracy(model: DualSequenceReranker, head: ItemHead) -> float:
    """Share of a in 1..8 for which the history encoder's state at the newest event of the prefix (a, a+1),
    encoded as requested at the next event's instant and scored through `head`, ranks a+2 first."""
    model.eval()
    a = torch.arange(1, 9)
    items = torch.stack([a, a + 1], 1)
    ts = torch.tensor([[0, 60_000]]).expand(8, 2)
    states = model.encoder_states("history", Sequence(items, torch.ones_like(items), ts), torch.full((8,), 120_000))
    return float((head(states[:, -1], model.item_embed.weight.weight).argmax(-1) == a + 2).float().mean())


def test_next_item_is_predicted_after_a_few_epochs() -> None:
    """The next-item objective learns a certain next item: after (a, a+1) always comes a+2. Ranked first at
    chance before pre-training, for (nearly) every start item after it."""
    model = tiny_model()
    head = ItemHead(32, N_ITEMS)
    assert next_accuracy(model, head) <= 0.5
    cfg = PretrainConfig(epochs=25, lr=3e-3, batch_size=32, item_scale=1.0, objective="next")
    logs = pretrain(model, runs_stream(), UNKNOWN, cfg, progress=False, head=head)
    assert len(logs) == 25 and logs[-1].loss < logs[0].loss / 2
    assert next_accuracy(model, head) >= 0.85
    assert not model.training


def test_next_item_prefixes_read_only_their_groups_past() -> None:
    """Each prefix is its group's rows before the target (never the target, never another group's rows);
    a group's first row and a row without a trained item (cold-start row 12, padding 0) predict nothing."""
    group = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    items = np.array([3, 4, 12, 5, 6, 7, 8, 2])
    bounds, targets = next_item_prefixes(group, items, N_ITEMS)
    assert targets.tolist() == [1, 4, 7]
    assert bounds.reshape(-1, 2).tolist() == [[0, 1], [3, 4], [6, 7]]
    bounds, targets = next_item_prefixes(np.zeros(0, np.int64), np.zeros(0, np.int64), N_ITEMS)
    assert len(bounds) == len(targets) == 0


def test_an_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="objective 'nxt'"):
        PretrainConfig(objective="nxt")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pretrained_weights_load_into_the_reranker(objective: str) -> None:
    """Pre-training changes the item table and both encoders and nothing the fine-tuning owns alone (pooling,
    gate, head); its weights load into a fresh reranker of the same config with every shape matching."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PretrainConfig(epochs=2, batch_size=16, objective=objective)
    pretrain(model, runs_stream(60), UNKNOWN, cfg, progress=False)
    after = model.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert {"item_embed", "history_encoder", "session_encoder"} <= changed
    assert not changed & {"head", "wide", "gate", "history_pool", "session_pool", "cand_proj"}
    fresh = tiny_model(seed=1)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in after.items()}
    fresh.load_state_dict(after, strict=True)
    fresh.eval()
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, after[k], atol=0, rtol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_stream_stops_at_the_training_split_and_a_leak_is_refused(objective: str) -> None:
    """Point in time: `TrainingData.stream` holds exactly the events before the build's split (the validation
    period's events would be in it if the cutoff were ignored), and `pretrain` refuses a stream holding an
    event at or after its cutoff."""
    events, _ = make_shop(n_users=20, sessions_per_user=4, seed=3)
    data = build(events, BuildConfig(), progress=False)
    s = data.stream
    ts = events["ts"].to_numpy()
    assert (ts >= data.split_ts).any()  # the case has events the stream must leave out
    assert len(s) == int((ts < data.split_ts).sum()) and s.cutoff == data.split_ts
    assert int(s.ts.max()) < data.split_ts
    # in log order per shopper, and the items are the vocabulary's indices of those events
    early = events.filter(pc.less(events["ts"], data.split_ts)).sort_by(
        [("user_id", "ascending"), ("offset", "ascending")]
    )
    assert s.items.tolist() == data.vocab.lookup(early["item_id"], early["category"], early["subcategory"]).tolist()
    assert (np.diff(s.shopper) >= 0).all() and (np.diff(s.session) >= 0).all()
    leaky = Stream(s.items, s.actions, s.ts, s.shopper, s.session, cutoff=int(s.ts.max()))
    with pytest.raises(ValueError, match="at or after its cutoff"):
        pretrain(tiny_model(), leaky, UNKNOWN, PretrainConfig(epochs=1, objective=objective), progress=False)


def test_encode_once_equals_per_candidate_after_pretraining() -> None:
    """The serving shape holds for pre-trained weights: all candidates in one pass == one forward each."""
    from insession.model.reranker import Batch

    model = tiny_model()
    pretrain(model, runs_stream(60), UNKNOWN, PretrainConfig(epochs=1, batch_size=16), progress=False)
    g = torch.Generator().manual_seed(0)
    hist = Sequence(
        torch.randint(1, N_ITEMS, (1, 6), generator=g),
        torch.ones(1, 6, dtype=torch.long),
        torch.arange(6).unsqueeze(0) * 60_000,
    )
    sess = Sequence(
        torch.randint(1, N_ITEMS, (1, 3), generator=g),
        torch.ones(1, 3, dtype=torch.long),
        torch.arange(3).unsqueeze(0) * 60_000 + 600_000,
    )
    req = torch.tensor([900_000])
    cands = torch.arange(1, N_ITEMS).unsqueeze(0)
    counters = torch.rand(1, N_ITEMS - 1, 3, generator=g)
    once = model.score(model.encode(hist, sess, req), cands, counters)
    for c in range(N_ITEMS - 1):
        single = Batch(hist, sess, req, cands[:, c : c + 1], counters[:, c : c + 1], torch.zeros(1, 1))
        torch.testing.assert_close(model(single)[0, 0], once[0, c], atol=1e-5, rtol=0)


# Fine-tuning after pre-training (issue 20's follow-up): the pre-trained parameters at a lower rate and/or
# frozen for the first epochs.


@pytest.fixture(scope="module")
def small_data() -> TrainingData:
    """The training tests' shop, built (~0.5 s): 103 training and 19 validation groups."""
    events, _ = make_shop(n_users=20, sessions_per_user=4, seed=3)
    return build(events, BuildConfig(), progress=False)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pretrained_parameters_are_exactly_what_pretraining_fits(objective: str) -> None:
    """`pretrained_parameters` names every parameter `pretrain` changes and no other (each once), for separate
    and for shared encoders."""
    for shared in (False, True):
        torch.manual_seed(0)
        model = DualSequenceReranker(RerankerConfig(n_items=N_ITEMS, dim=32, dropout=0.0, shared_encoder=shared))
        before = {id(p): p.detach().clone() for p in model.parameters()}
        cfg = PretrainConfig(epochs=2, batch_size=16, objective=objective)
        pretrain(model, runs_stream(60), UNKNOWN, cfg, progress=False)
        changed = {id(p) for p in model.parameters() if not torch.equal(p, before[id(p)])}
        named = [id(p) for p in pretrained_parameters(model)]
        assert len(named) == len(set(named)) and set(named) == changed


def test_the_lr_multiplier_reaches_the_optimiser_groups() -> None:
    """The pre-trained parameters get their own group at lr x the multiplier, the rest the fine-tuning's lr;
    every parameter is in exactly one group. Without pre-trained parameters: one group, as before."""
    model = tiny_model()
    pre = pretrained_parameters(model)
    tc = TrainConfig(lr=2e-3, pretrain=PretrainConfig(finetune_lr_scale=0.1))
    opt = finetune_optimizer(model, tc, pre)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, pytest.approx(2e-4)]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in pre]
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    plain = finetune_optimizer(model, tc)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 2e-3


def test_a_frozen_epoch_leaves_the_pretrained_parameters_unchanged(small_data: TrainingData) -> None:
    """One fine-tuning epoch with `freeze_epochs` 1 moves the ranking head and not one bit of the item table or
    the encoders; every parameter is trainable again afterwards. Without the freeze the same epoch moves them."""
    for freeze in (1, 0):
        torch.manual_seed(0)
        model = DualSequenceReranker(small_data.vocab.config(dim=16))
        pre = pretrained_parameters(model)
        ids = {id(p) for p in pre}
        before = {id(p): p.detach().clone() for p in model.parameters()}
        tc = TrainConfig(epochs=1, batch_size=16, threads=1, bf16=False, progress=False,
                         pretrain=PretrainConfig(freeze_epochs=freeze))
        fit(model, small_data.train, small_data.val, tc, pre)
        moved = {id(p) for p in model.parameters() if not torch.equal(p, before[id(p)])}
        assert moved - ids  # the fine-tuning's own parameters learnt
        assert (moved & ids) == (set() if freeze else ids)
        assert all(p.requires_grad for p in model.parameters())


def test_train_model_freezes_what_pretraining_fitted(small_data: TrainingData) -> None:
    """Wiring: with pre-training on and every fine-tuning epoch frozen, `train_model` returns the item table
    that pre-training alone leaves (the same seeded model, pre-trained the same way)."""
    pc = PretrainConfig(epochs=1, max_windows=200, freeze_epochs=1)
    tc = TrainConfig(epochs=1, batch_size=16, threads=1, bf16=False, progress=False, pretrain=pc)
    seed_everything(tc.seed)
    alone = DualSequenceReranker(small_data.vocab.config(dim=16))
    pretrain(alone, small_data.stream, small_data.vocab.unknown, pc, seed=tc.seed, progress=False)
    result = train_model(small_data, tc, dim=16)
    assert result.pretrain
    for a, b in zip(pretrained_parameters(alone), pretrained_parameters(result.model), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(alone.head_out.weight, result.model.head_out.weight)
