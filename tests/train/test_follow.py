"""Continuous model updates (`insession.train.follow`): the promotion gate, what a refusal leaves alone, what
a promotion keeps, the cold-start rows of new items, the status counters, the loop and the CLI.

One small shop in two periods: a model is trained on the first 60% of its events by `insession train`'s own
pipeline, then updates read all of them. In the second period four items of subcategory s0 are renamed
(`new0`..`new3`), so they are items the serving model has never seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import typer
import uvicorn
from fastapi import FastAPI
from train_shop import make_shop
from typer.testing import CliRunner

from insession.client import API_KEY_HEADER
from insession.embedded import Insession
from insession.log import LogConfig
from insession.log.cluster import LocalCluster
from insession.log.export import events_from_arrow
from insession.log.jetstream import JetStreamLog
from insession.model.artefact import WEIGHTS, latest_version, load_artefact, versions
from insession.model.reranker import DualSequenceReranker
from insession.model.vocab import Vocab
from insession.rank import RankConfig, Ranker
from insession.serve.auth import Auth, KeySpec
from insession.serve.metrics import FOLLOW_STATUS, Metrics
from insession.serve.rank_routes import router
from insession.train import TrainConfig, train_on_events
from insession.train.cli import train
from insession.train.follow import (
    API_KEY_ENV,
    LOCK,
    REFUSED,
    RETIRED,
    STATUS,
    FollowConfig,
    _new_requests,
    data_mark,
    extend_vocab,
    follow,
    index_map,
    parse_every,
    read_status,
    rollback,
    update_once,
)

TINY = {"dim": 16, "n_heads": 2, "dropout": 0.0}
NEW = {f"i{k}": f"new{k}" for k in range(4)}  # items of subcategory s0 renamed in the second period


def config(**overrides: object) -> FollowConfig:
    return FollowConfig(**{"epochs": 2, "progress": False, "threads": 1, "served_negatives": False, **overrides})


@pytest.fixture(scope="module")
def shop() -> tuple[pa.Table, int]:
    """All events (the second period with the renamed items) and the instant the first period ends."""
    events, _ = make_shop(n_users=40, sessions_per_user=8, seed=1)
    ts = events["ts"].to_numpy()
    cut = int(np.quantile(ts, 0.6))
    later = ts >= cut
    items = [NEW.get(i, i) if late else i for i, late in zip(events["item_id"].to_pylist(), later, strict=True)]
    events = events.set_column(events.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.string()))
    return events, cut


@pytest.fixture(scope="module")
def trained(shop: tuple[pa.Table, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding one version trained on the first period."""
    events, cut = shop
    out = tmp_path_factory.mktemp("trained")
    tc = TrainConfig(epochs=3, batch_size=32, patience=3, progress=False, threads=1)
    train_on_events(events.filter(pc.less(events["ts"], cut)), out, train_config=tc, item2vec_epochs=1, **TINY)
    return out


@pytest.fixture
def models(trained: Path, tmp_path: Path) -> Path:
    """A fresh copy of the trained model directory (its weights backdated an hour: the model's age)."""
    out = tmp_path / "models"
    shutil.copytree(trained, out)
    hour_ago = time.time() - 3600
    os.utime(latest_version(out) / WEIGHTS, (hour_ago, hour_ago))
    return out


def files(models: Path) -> dict[str, str]:
    """Every file of every version under `models` (what a reload can read): relative path -> sha256."""
    return {
        str(f.relative_to(models)): hashlib.sha256(f.read_bytes()).hexdigest()
        for v in versions(models)
        for f in sorted(v.rglob("*"))
        if f.is_file()
    }


def randomise(model: DualSequenceReranker) -> None:
    """The sabotage: the fine-tuned candidate's weights replaced by a fresh random initialisation."""
    torch.manual_seed(1234)
    model.load_state_dict(DualSequenceReranker(model.cfg).state_dict())
    model.eval()


def test_a_candidate_that_validates_worse_is_refused_and_the_serving_model_untouched(
    shop: tuple[pa.Table, int], models: Path
) -> None:
    events, _ = shop
    serving, before = latest_version(models), files(models)
    result = update_once(events, models, config(), tamper=randomise)
    assert result.outcome == "refused"
    assert result.candidate_ndcg10 < result.serving_ndcg10 - 0.05, result
    assert result.serving == result.base == serving.name and result.previous is None
    assert latest_version(models) == serving  # the version a reload serves
    assert files(models) == before  # no version gained, lost or changed a byte
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == sorted([serving.name, REFUSED])
    refused = models / REFUSED / result.candidate
    assert json.loads((refused / "metrics.json").read_text())["val_ndcg10"] == pytest.approx(result.candidate_ndcg10)
    # the refused window is trained on again next time: the data mark did not move
    assert update_once(events, models, config(), tamper=randomise).since_ts == result.since_ts


def test_an_accepted_update_promotes_keeps_the_previous_version_and_starts_new_items_on_the_cold_start_chain(
    shop: tuple[pa.Table, int], models: Path
) -> None:
    """With no fine-tuning step the candidate is the warm start itself: it ranks exactly as the serving model
    (so it is promoted), and each new item's row is the vector the serving model gave that unknown item."""
    events, _ = shop
    old = latest_version(models)
    before = files(models)
    result = update_once(events, models, config(epochs=0))
    assert result.outcome == "promoted", result
    assert result.candidate_ndcg10 == pytest.approx(result.serving_ndcg10, abs=1e-6)
    assert latest_version(models).name == result.candidate == result.serving
    assert result.previous == old.name and {k: v for k, v in files(models).items() if k in before} == before

    serving, candidate = load_artefact(old), load_artefact(models / result.candidate)
    new = [i for i in NEW.values() if i in candidate.vocab.items]
    assert new and result.new_items == len(new) and not set(new) & set(serving.vocab.items)
    assert candidate.vocab.items[: len(serving.vocab.items)] == serving.vocab.items  # known items keep their rows
    rows = candidate.model.item_embed.weight.weight
    idx = torch.from_numpy(candidate.vocab.lookup(pa.array(new)))
    chain = serving.vocab.lookup(pa.array(new), pa.array(["c0"] * len(new)), pa.array(["s0"] * len(new)))
    assert (chain >= serving.vocab.n_items).all()  # unknown to the serving model: its subcategory's row
    torch.testing.assert_close(rows[idx], serving.model.item_embed(torch.from_numpy(chain)))
    assert candidate.metrics["warm_start"] == old.name
    assert candidate.metrics["trained_until"] == result.trained_until > result.since_ts


def test_a_fine_tuned_update_is_promoted_exactly_when_it_validates_no_worse(
    shop: tuple[pa.Table, int], models: Path
) -> None:
    events, _ = shop
    old = latest_version(models)
    result = update_once(events, models, config(epochs=2, served_negatives=True))  # the served lists validate
    assert result.train_groups > 0 and result.val_groups > 0 and result.new_items > 0
    if result.candidate_ndcg10 >= result.serving_ndcg10:
        assert result.outcome == "promoted" and latest_version(models).name == result.candidate
    else:
        assert result.outcome == "refused" and latest_version(models) == old
    # the next update starts from what serves and from its data mark
    again = update_once(events, models, config(epochs=1))
    assert again.base == result.serving
    assert again.since_ts == (result.trained_until if result.outcome == "promoted" else result.since_ts)


def test_the_status_counts_updates_promotions_refusals_skips_and_the_model_age(
    shop: tuple[pa.Table, int], models: Path
) -> None:
    events, _ = shop
    skipped = update_once(events, models, config(min_new=100_000))
    assert skipped.outcome == "skipped" and "new add-to-carts" in skipped.reason
    assert update_once(events, models, config(), tamper=randomise).outcome == "refused"
    status = read_status(models)
    assert (status["updates"], status["promotions"], status["refusals"], status["skips"]) == (1, 0, 1, 1)
    assert status["model_age_s"] >= 3600  # a refusal does not make the serving model younger
    promoted = update_once(events, models, config(epochs=0))
    assert promoted.outcome == "promoted"
    status = read_status(models)
    assert (status["updates"], status["promotions"], status["refusals"], status["skips"]) == (2, 1, 1, 1)
    assert status["model_age_s"] < 600 and status["serving"] == promoted.candidate
    assert status["last"]["outcome"] == "promoted" and len(status["history"]) == 3
    assert read_status(models, now=time.time() + 100)["model_age_s"] >= 100  # the age is live
    json.loads((models / STATUS).read_text())  # strict JSON on disk

    assert rollback(models) == promoted.base
    assert latest_version(models).name == promoted.base and (models / RETIRED / promoted.candidate).is_dir()
    assert read_status(models)["rollbacks"] == 1 and read_status(models)["serving"] == promoted.base


def test_one_follower_per_model_directory(shop: tuple[pa.Table, int], models: Path) -> None:
    with (models / LOCK).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another follower's update in progress
        with pytest.raises(RuntimeError, match="one follower per model directory"):
            update_once(shop[0], models, config())
    with pytest.raises(FileNotFoundError):
        update_once(shop[0], models.parent / "nothing", config())


def test_the_loop_reports_each_update_and_survives_a_failing_one(
    shop: tuple[pa.Table, int], models: Path, tmp_path: Path
) -> None:
    events, _ = shop
    data = tmp_path / "events.parquet"
    lines: list[str] = []
    naps: list[float] = []
    done = follow(data, models, 600, config(), updates=2, echo=lines.append, sleep=naps.append)
    assert done == [] and read_status(models)["errors"] == 2  # no events file yet: each update failed, counted
    pq.write_table(events, data)
    done = follow(data, models, 600, config(min_new=100_000), updates=2, echo=lines.append, sleep=naps.append)
    assert [r.outcome for r in done] == ["skipped", "skipped"]
    assert sum("failed" in line for line in lines) == 2 and sum("skipped" in line for line in lines) == 2
    assert len(naps) == 2 and all(0 < s <= 600 for s in naps)


def test_cli_follow_runs_updates_into_the_model_directory(shop: tuple[pa.Table, int], models: Path) -> None:
    events, _ = shop
    data = models.parent / "events.parquet"
    pq.write_table(events, data)
    app = typer.Typer()
    app.command()(train)
    app.command("noop")(lambda: None)
    args = ["train", str(data), "--out", str(models), "--follow", "--updates", "1", "--update-epochs", "0"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--no-served-negatives"])
    assert result.exit_code == 0, result.output
    assert "update 1 promoted" in result.output and read_status(models)["promotions"] == 1
    bad = CliRunner().invoke(app, [*args, "--every", "soon"])
    assert bad.exit_code != 0 and "--every" in bad.output
    back = CliRunner().invoke(app, ["train", str(data), "--out", str(models), "--rollback"])
    assert back.exit_code == 0 and latest_version(models).name == read_status(models)["serving"] in back.output
    empty = CliRunner().invoke(app, [*args[:2], "--out", str(models.parent / "none"), "--follow"])
    assert empty.exit_code == 1 and "insession train" in empty.output


def test_cli_follow_passes_the_update_settings(
    shop: tuple[pa.Table, int], models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import insession.train.follow as following

    got: list[FollowConfig] = []
    monkeypatch.setattr(following, "follow", lambda data, out, period, cfg, **_: got.append(cfg))
    app = typer.Typer()
    app.command()(train)
    app.command("noop")(lambda: None)
    base = ["train", str(models.parent), "--out", str(models), "--follow"]
    extra = ["--update-lr", "1e-3", "--update-validate-fraction", "0.5", "--update-epochs", "3"]
    for args in (base, [*base, *extra]):
        assert CliRunner().invoke(app, args).exit_code == 0
    assert [(c.lr, c.validate_fraction, c.epochs) for c in got] == [(2e-3, 0.2, 2), (1e-3, 0.5, 3)]


def test_cli_follow_reads_a_replicated_logs_history_and_stream(shop: tuple[pa.Table, int], models: Path,
                                                                tmp_path: Path) -> None:
    """`--follow --log`: each update reads the node's exported history plus the stream after its mark (three
    real NATS servers on loopback), as `insession train --log` does."""
    events, _ = shop
    expected = _new_requests(events, data_mark(load_artefact(latest_version(models))))[0]
    nats = LocalCluster.on_free_ports(tmp_path / "nats")
    nats.start()
    try:
        cfg = LogConfig(url=",".join(nats.urls), monitor=",".join(nats.monitor_urls), stream="FOLLOW")
        node = tmp_path / "node"
        stored = events_from_arrow(events)
        with JetStreamLog(cfg, node, partitions=4) as log:
            for i in range(0, len(stored), 1000):
                log.append(stored[i : i + 1000])
            log.export(node / "history", upto_offset=len(stored) // 2)  # the rest is in the stream only
        app = typer.Typer()
        app.command()(train)
        app.command("noop")(lambda: None)
        result = CliRunner().invoke(app, ["train", str(node), "--out", str(models), "--follow", "--updates", "1",
                                          "--update-epochs", "0", "--threads", "1", "--no-served-negatives",
                                          "--log", cfg.url, "--stream", cfg.stream])
    finally:
        nats.stop()
    assert result.exit_code == 0, result.output
    assert "update 1 promoted" in result.output
    new = read_status(models)["history"][-1]["new_requests"]
    assert new == expected > 0  # the new add-to-carts lie in the later half, which only the stream holds


def test_the_update_defaults_are_the_measured_setting_in_both_commands() -> None:
    """lr 2e-3 and a 20% validation window (FollowConfig's docstring: the measured decision), the defaults of
    `insession train --follow` and of `insession prequential`'s continuous arm alike."""
    import inspect

    from insession.evaluate.prequential import PrequentialConfig, prequential
    from insession.train.cli import train

    d = FollowConfig()
    assert (d.lr, d.validate_fraction, d.epochs) == (2e-3, 0.2, 2)
    follow_cli, replay_cli = inspect.signature(train).parameters, inspect.signature(prequential).parameters
    assert (follow_cli["update_lr"].default, follow_cli["update_validate_fraction"].default) == (
        d.lr,
        d.validate_fraction,
    )
    assert follow_cli["update_epochs"].default == d.epochs
    assert (replay_cli["update_lr"].default, replay_cli["validate_fraction"].default) == (d.lr, d.validate_fraction)
    assert replay_cli["update_epochs"].default == d.epochs
    replay = PrequentialConfig().update
    assert (replay.lr, replay.validate_fraction, replay.epochs) == (d.lr, d.validate_fraction, d.epochs)


def test_parse_every() -> None:
    assert [parse_every(t) for t in ("90s", "10m", "1h", "600", "1.5m")] == [90, 600, 3600, 600, 90]
    for bad in ("", "0m", "ten", "5w"):
        with pytest.raises(ValueError):
            parse_every(bad)


def test_extended_vocabulary_keeps_every_index_and_maps_through_the_chain() -> None:
    base = Vocab.build(pa.array(["a", "b"]), pa.array(["c1", "c1"]), pa.array(["s1", "s2"]))
    seen = Vocab.build(pa.array(["b", "x", "y"]), pa.array(["c1", "c2", "c1"]), pa.array(["s2", "s9", "s1"]))
    ext = extend_vocab(base, seen)
    assert ext.items == ["a", "b", "x", "y"] and ext.subcats[: len(base.subcats)] == base.subcats
    assert ext.cats[: len(base.cats)] == base.cats
    m = index_map(base, ext)
    assert (m[: base.n_items] == np.arange(base.n_items)).all()  # padding and items: the same indices
    back = index_map(ext, base)
    x, y = ext.items.index("x") + 1, ext.items.index("y") + 1
    assert back[y] == base.lookup(pa.array(["?"]), pa.array(["c1"]), pa.array(["s1"]))[0]  # s1's row
    assert back[x] == base.unknown  # neither its subcategory nor its category is known: the global row


@pytest.fixture
def server(shop: tuple[pa.Table, int], models: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Insession]]:
    """A real ranking server (the embedded handle, the ranker on `models`, the admin routes, one admin key
    "k") on a loopback port, its data dir holding the shop's events: (URL, data dir, handle)."""
    events, _ = shop
    db = Insession(tmp_path / "data", maintenance_interval_s=None)
    catalogue = events.group_by("item_id").aggregate([("category", "min"), ("subcategory", "min")])
    db.insert(
        "items",
        [
            {"item_id": i, "category": c, "subcategory": s}
            for i, c, s in zip(
                *(catalogue[n].to_pylist() for n in ("item_id", "category_min", "subcategory_min")), strict=True
            )
        ],
    )
    cols = ("user_id", "item_id", "action", "ts", "session_id")
    rows = [dict(zip(cols, row, strict=True)) for row in zip(*(events[c].to_pylist() for c in cols), strict=True)]
    db.insert("events", rows[: len(rows) // 2])
    db.export()  # half in the Parquet history, half only in the log: an update reads both
    db.insert("events", rows[len(rows) // 2 :])
    db.ranker = Ranker(db.features, db.catalog, models, RankConfig(budget_ms=5_000, backend="torch"))  # type: ignore[attr-defined]
    app = FastAPI()
    app.include_router(router)
    app.state.insession = db
    app.state.auth = Auth([KeySpec(name="follower", roles=["admin"], key="k")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    httpd = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    while not httpd.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", tmp_path / "data", db
    httpd.should_exit = True
    thread.join(10)
    db.ranker.close()  # type: ignore[attr-defined]
    db.close()


def test_promotion_hot_reloads_a_running_server_and_a_refusal_leaves_it_serving(
    shop: tuple[pa.Table, int], server: tuple[str, Path, Insession], models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a real server, reading the events from its data dir (the log's tail beside the running
    server): a refused update leaves the served version; a promoted one is hot-reloaded with the key from
    $INSESSION_API_KEY, and without the key it is promoted on disk and the failed reload is reported. The
    server's Prometheus metrics show the serving model's age and the follower's counters."""
    url, data, db = server
    metrics = Metrics()
    metrics.bind(db)
    assert float(scraped(metrics, "insession_model_age_seconds")) >= 3600
    served = latest_version(models).name

    def serving() -> str:
        return str(httpx.get(url + "/v1/admin/model", headers={API_KEY_HEADER: "k"}).json()["version"])

    monkeypatch.setenv(API_KEY_ENV, "k")
    refused = update_once(data, models, config(), server=url, tamper=randomise)
    assert refused.outcome == "refused" and refused.reload is None and serving() == served
    events, _ = shop  # every event was read, the exported ones and the log's tail
    carts = events.filter(pc.equal(events["action"], "add_to_cart"))["ts"]
    assert refused.new_requests == pc.sum(pc.greater_equal(carts, refused.since_ts)).as_py()
    promoted = update_once(data, models, config(epochs=0), server=url)
    assert promoted.outcome == "promoted" and promoted.reload_error is None, promoted
    assert promoted.reload is not None and promoted.reload["version"] == promoted.candidate == serving()

    monkeypatch.delenv(API_KEY_ENV)
    unkeyed = update_once(data, models, config(epochs=0), server=url)
    assert unkeyed.outcome == "promoted" and "401" in str(unkeyed.reload_error)
    assert serving() == promoted.candidate and latest_version(models).name == unkeyed.candidate
    assert float(scraped(metrics, "insession_model_age_seconds")) < 600
    counted = {k: scraped(metrics, f"insession_model_{k}_total") for k in ("updates", "promotions", "refusals")}
    assert counted == {"updates": "3.0", "promotions": "2.0", "refusals": "1.0"}
    assert FOLLOW_STATUS == STATUS


def scraped(metrics: Metrics, name: str) -> str:
    """The value of an unlabelled sample in the Prometheus text."""
    found = [line.split()[-1] for line in metrics.render().decode().splitlines() if line.startswith(name + " ")]
    assert len(found) == 1, name
    return found[0]
