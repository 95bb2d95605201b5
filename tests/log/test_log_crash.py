"""THE crash test: a writer process is kill -9'ed at random moments; every acknowledged event survives
exactly once, no batch is ever partly visible, retries after the crash are de-duplicated, and the
Parquet history (exported concurrently) holds every exported event exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.dataset as ds

from insession.log.eventlog import EventLog

KILLS = 24
WRITER = Path(__file__).with_name("crash_writer.py")


def _run_and_kill(db: Path, history: Path, run: int, retries: list[tuple[str, int]],
                  rng: random.Random) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, str(WRITER), str(db), str(history), str(run), json.dumps(retries)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    first_ack = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ack"):
                first_ack.set()

    reader = threading.Thread(target=pump)
    reader.start()
    assert first_ack.wait(30), "the writer never acknowledged a batch"
    time.sleep(rng.uniform(0.0, 0.25))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL
    return [ln for ln in lines if ln.endswith("\n")]  # a torn last line is an ack never delivered


def test_kill_9_loses_nothing_acknowledged_and_shows_no_half_batch(tmp_path: Path) -> None:
    db, history = tmp_path / "log.sqlite", tmp_path / "history"
    rng = random.Random(2026)
    sizes: dict[str, int] = {}
    acked: dict[str, list[int]] = {}
    retries: list[tuple[str, int]] = []
    lost_acks = 0  # batches committed whose ack the kill swallowed: their retry must be de-duplicated
    for run in range(KILLS):
        tried_now: dict[str, int] = {}
        for line in _run_and_kill(db, history, run, retries, rng):
            kind, key, rest = line.split()
            if kind == "try":
                sizes[key] = tried_now[key] = int(rest)
            else:
                acked[key] = [int(x) for x in rest.split(",")]

        with EventLog(db) as log:  # recovery
            stored = list(log.read())
            assert [e.offset for e in stored] == list(range(log.count()))
            by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for e in stored:
                assert e.properties is not None
                by_key[e.properties["key"]].append((e.properties["j"], e.offset))
            for key, rows in by_key.items():  # all-or-nothing, exactly once
                assert sorted(j for j, _ in rows) == list(range(sizes[key])), key
            for key, offsets in acked.items():  # everything acknowledged is there, where it was acked
                assert key in by_key, f"acknowledged batch {key} lost"
                assert [off for _, off in sorted(by_key[key])] == offsets
            # the concurrently exported history: exactly the exported prefix, once, after cleaning
            mark = log.export(history)
            assert mark == log.last_offset()
            exported = ds.dataset(history, format="parquet").to_table(columns=["offset"]).column("offset")
            assert sorted(exported.to_pylist()) == list(range(mark + 1))
        # the next run retries what this one tried without seeing the ack (with ids only)
        retries = [(k, n) for k, n in tried_now.items() if k not in acked and k.startswith("k")]
        lost_acks += sum(k in by_key for k, _ in retries)
    assert len(acked) > KILLS  # the writer made progress between kills
    assert lost_acks > 0  # kills did land between commit and ack, and those retries were stored once

