"""The training-data build on Spark gives the DuckDB build's examples, array for array, with the candidate
stage's proposals as negatives (the path `insession train` takes), and `training-data` writes them."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from train_shop import make_shop

from insession.offline import open_engine
from insession.train.build import BuildConfig, build, write_training_data
from insession.train.examples import Examples
from insession.train.replay import stage_proposer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "features"))
from spark_helpers import shared_spark_engine  # noqa: E402


def test_spark_and_duckdb_build_the_same_examples(tmp_path: Path) -> None:
    spark = shared_spark_engine()
    shop, _ = make_shop(n_users=12, sessions_per_user=4)
    cfg = BuildConfig(eval_candidates=20)
    duck = open_engine("duckdb")
    want = build(shop, cfg, progress=False, proposer=stage_proposer(shop, progress=False, engine=duck), engine=duck)
    got = build(shop, cfg, progress=False, proposer=stage_proposer(shop, progress=False, engine=spark), engine=spark)
    assert len(want.train) > 10 and len(want.val) > 0
    assert got.split_ts == want.split_ts and got.feature_hash == want.feature_hash
    for part in ("train", "val"):
        for f in fields(Examples):
            np.testing.assert_array_equal(
                getattr(getattr(got, part), f.name), getattr(getattr(want, part), f.name), err_msg=f"{part}.{f.name}"
            )
    assert got.train_requests.equals(want.train_requests)

    paths = write_training_data(got, tmp_path)
    train = pq.read_table(tmp_path / "train.parquet")
    assert train.num_rows == len(got.train)
    assert train["cand_items"].to_pylist()[0] == got.train.cand_items[: got.train.cand_offsets[1]].tolist()
    first = np.asarray(train["cand_counters"].to_pylist()[0])
    np.testing.assert_array_equal(first, got.train.cand_counters[: got.train.cand_offsets[1]])
    assert json.loads((tmp_path / "meta.json").read_text())["train_groups"] == len(got.train)
    assert {p.name for p in paths} >= {"train.parquet", "val.parquet", "meta.json"}


def test_the_training_data_command_writes_the_examples_and_refuses_an_unknown_engine(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from insession.cli import app

    shop, _ = make_shop(n_users=8, sessions_per_user=3)
    pq.write_table(shop, tmp_path / "events.parquet")
    runner = CliRunner()
    done = runner.invoke(
        app, ["training-data", str(tmp_path / "events.parquet"), "--out", str(tmp_path / "ex"), "--engine", "duckdb"]
    )
    assert done.exit_code == 0, done.output
    assert "offline engine: duckdb" in done.output
    meta = json.loads((tmp_path / "ex" / "meta.json").read_text())
    assert pq.read_table(tmp_path / "ex" / "train.parquet").num_rows == meta["train_groups"] > 0
    bad = runner.invoke(app, ["training-data", str(tmp_path / "events.parquet"), "--out", str(tmp_path / "x"),
                              "--engine", "flink"])  # fmt: skip
    assert bad.exit_code != 0
    assert "unknown engine 'flink'; choose one of duckdb, spark" in " ".join(bad.output.replace("│", " ").split())
