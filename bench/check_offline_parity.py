"""A documented check: the full training-data build (with the candidate stage's proposals) on a real dataset
gives identical examples from the DuckDB and the Spark engines, array for array.

    python -m bench.check_offline_parity ../shared/data/taobao_userbehavior_flink_2h.parquet [--master local[2]]

Prints each engine's seconds and, per array of `Examples`, whether the two are equal; exits 1 on any
difference. (tests/train/test_train_build_spark.py checks the same on a small synthetic shop in the suite.)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from insession.evaluate.data import load_real
from insession.offline import open_engine
from insession.train.build import BuildConfig, TrainingData, build
from insession.train.examples import Examples
from insession.train.replay import stage_proposer


def _build(events, engine_name: str, master: str | None) -> tuple[TrainingData, float]:  # noqa: ANN001
    engine = open_engine(engine_name, master=master)
    print(f"[check] {engine.describe()}", flush=True)
    t0 = time.perf_counter()
    try:
        data = build(events, BuildConfig(), progress=True, proposer=stage_proposer(events, engine=engine),
                     engine=engine)  # fmt: skip
    finally:
        engine.close()
    return data, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dataset", type=Path, help="a normalised dataset Parquet (e.g. ../shared/data/*.parquet)")
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args()
    events = load_real(args.dataset).events
    print(f"[check] {args.dataset.name}: {events.num_rows:,} events", flush=True)
    want, t_duck = _build(events, "duckdb", None)
    got, t_spark = _build(events, "spark", args.master)
    same = want.split_ts == got.split_ts and got.train_requests.equals(want.train_requests)
    for part in ("train", "val"):
        for f in fields(Examples):
            a, b = getattr(getattr(want, part), f.name), getattr(getattr(got, part), f.name)
            equal = a.shape == b.shape and np.array_equal(a, b)
            same &= equal
            print(f"[check] {part}.{f.name}: {a.shape} {'equal' if equal else 'DIFFERENT'}")
    groups = len(want.train) + len(want.val)
    print(f"[check] {groups:,} groups; duckdb {t_duck:.0f} s, spark {t_spark:.0f} s; "
          f"{'IDENTICAL' if same else 'DIFFERENT'} examples")  # fmt: skip
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
