"""Benchmark of serving under everything at once: ingest, feature reads, ranking, snapshots and analytics.

One `insession serve` holds a large shop (full size: 1,000,000 shoppers x 20 events over 50,000 items,
loaded through the embedded API, with a seeded random ReRanker artefact). For the measured minutes a
client in a second process sends, open loop (each request leaves when it is due and its latency counts
from then): ingest batches of 50 events (5,000 events/s, event time moving with the wall clock, random
shoppers), `GET /v1/features/user/{id}` (500/s) and `/v1/rank` (100/s). In the second half two threads of
this process keep two heavy analytics scans running. The snapshot interval is lowered so several
snapshots fall inside; their instants are taken from the state directory's CURRENT file. The snapshots
are written by a snapshot standby process (`[features] snapshot_writer = "standby"`: the snapshot work off
the server's GIL, for a second copy of the state). The load runs twice, each time on a fresh copy of the
same data, both with a feature reader (`[server] reader_port`: a process with a third copy of the state,
following the log, that serves feature reads and rankings): first with the feature reads sent to the reader
and ingest and ranking to the server (the baseline: the best setup measured until then), then with the
rankings sent to the reader and ingest and feature reads to the server (the targets are checked on it). The
memory and CPU of the server, of its standby, of its reader and of the analytics workers (private memory)
are sampled every second. Before that load, a server started on the same data answers `GET
/v1/features/user/{id}` alone at 1,000/s for a minute (no ingest, no ranking: the issue's "stall episodes
every 18-22 s" case), and the seconds holding a read over 20 ms are listed; it is stopped and the measured
server started afresh, so the load's snapshots fall where they fell before this phase existed.

The loaded data directory is kept in $INSESSION_BENCH_CACHE (default: the temp dir) and copied for each
run, so a rerun skips the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from bench.bench_features import N_CATEGORIES, N_ITEMS, synthetic_events
from bench.bench_query import ANALYTICS_SQL, _Analytics
from bench.common import Sample, http_request, open_loop, percentiles_ms, table
from insession.embedded import Insession
from insession.features.declare import FeatureRegistry, pinned_hash
from insession.features.engine import REGISTRY_FILE
from insession.model import DualSequenceReranker, Vocab
from insession.model.artefact import load_artefact, new_version, save_artefact
from insession.rank.onnx import ONNX_FILE, export
from insession.serve.process import ServerProcess, free_port

INGEST_RATE, BATCH = 100, 50  # requests/s and events per request: 5,000 events/s
FEATURE_RATE, RANK_RATE = 500, 100
# The measured setups, each on a fresh copy of the data: name -> (feature reads on the reader, rankings on the
# reader). The snapshots are the standby's in both (the best of the server / standby pair until 2026-11-30).
SETUPS = {"reads on the reader": (True, False), "ranking on the reader": (False, True)}
MEASURED = "ranking on the reader"  # the targets are checked on this one; the other is the same run's baseline
READS_ONLY_RATE, STALL_MS = 1_000, 20.0  # the reads-only minute before the mixed load; a read over it is a stall
TARGETS = {  # (kind, percentile): the target in ms
    ("features", "p99"): 5.0, ("features", "p99.9"): 25.0, ("features", "max"): 100.0,
    ("rank", "p99"): 10.0, ("rank", "p99.9"): 50.0, ("ingest", "p99"): 25.0,
}
IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


def _cache(n_users: int, per_user: int) -> Path:
    root = Path(os.environ.get("INSESSION_BENCH_CACHE", tempfile.gettempdir()))
    return root / f"insession-bench-mixed-{n_users}x{per_user}"


def cached_shop(n_users: int, per_user: int) -> Path:
    """The loaded data directory of this size, loaded now when the cache has none."""
    cache = _cache(n_users, per_user)
    registry = cache / "features" / REGISTRY_FILE
    if (cache / "READY").exists() and pinned_hash(FeatureRegistry.load(registry)) is None:
        print(f"bench_mixed: the cached shop {cache} was loaded with fewer features than the model reads; "
              "loading it again")
        (cache / "READY").unlink()
    if not (cache / "READY").exists():
        print(f"bench_mixed: loading {n_users:,} shoppers x {per_user} events into {cache}")
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        _load(cache, n_users, per_user)
        (cache / "READY").write_text(f"loaded in {time.perf_counter() - t:.0f} s\n")
    try:
        load_artefact(cache / "models")
    except (ValueError, OSError) as e:  # a cache older than the network: the server would rank without it
        print(f"bench_mixed: the cached shop's model cannot be loaded ({str(e)[:120]}...); writing a new one")
        shutil.rmtree(cache / "models", ignore_errors=True)
        with Insession(cache, maintenance_interval_s=None) as db:
            _write_model(db, cache)
    return cache


def _write_model(db: Insession, data_dir: Path) -> None:
    """A seeded random ReRanker artefact over the shop's catalogue, with its ONNX graph."""
    cat = db.catalog.to_arrow()
    vocab = Vocab.build(cat["item_id"], cat["category"], cat["subcategory"])
    torch.manual_seed(0)
    model = DualSequenceReranker(vocab.config()).eval()
    version = save_artefact(new_version(data_dir / "models"), model, vocab, db.features.registry.hash(), {})
    export(model, version / ONNX_FILE)  # what the server would do in the background at its first load


def _load(data_dir: Path, n_users: int, per_user: int) -> None:
    """Catalogue, events (log, features, Parquet history, a snapshot at close) and a random model."""
    with Insession(data_dir, maintenance_interval_s=None) as db:
        items = [{"item_id": f"i{i}", "category": f"c{i % N_CATEGORIES}", "subcategory": f"s{i % 1000}"}
                 for i in range(N_ITEMS)]
        for start in range(0, len(items), 10_000):
            db.insert("items", items[start : start + 10_000])
        with tqdm(total=n_users * per_user, desc="load events", unit="ev") as bar:
            for chunk in synthetic_events(n_users, per_user):
                db.insert_events(chunk)
                bar.update(len(chunk))
        db.export()
        _write_model(db, data_dir)
        db.features.snapshot()


def _client(port: int, read_port: int, rank_port: int, n_users: int, start_ts: int, seconds: float,
            out: Connection, reads_only: bool = False) -> None:
    """Second process: the three open-loop streams at once, feature reads to `read_port` and rankings to
    `rank_port` (or, `reads_only`, feature reads alone at `READS_ONLY_RATE`); sends back their samples. The
    client's garbage collector is off while it measures (its collections over the growing lists of samples
    made sends late, counted as the server's latency: sends more than 1 ms late fell from 164 / 2,769 / 168
    to 12 / 1,818 / 12 for ingest / features / rank, and the worst feature read from 1,424 to 614 ms)."""
    gc.disable()
    rng = np.random.default_rng(3)
    users = rng.integers(0, n_users, int(seconds * (FEATURE_RATE + RANK_RATE + INGEST_RATE * BATCH)) + 1)
    items = np.minimum(rng.zipf(1.3, len(users)), N_ITEMS) - 1

    def ingest(i: int) -> bytes:
        ts = start_ts + int(i * 1000 / INGEST_RATE)  # event time moves with the wall clock
        base = i * BATCH
        body = json.dumps([{"user_id": f"u{users[base + k]}", "item_id": f"i{items[base + k]}", "action": "view",
                            "ts": ts + k} for k in range(BATCH)]).encode()
        return http_request("POST", "/v1/events", body)

    def feature(i: int) -> bytes:
        return http_request("GET", f"/v1/features/user/u{users[-1 - i]}")

    def rank(i: int) -> bytes:
        body = json.dumps({"user_id": f"u{users[len(users) // 2 + i]}", "k": 20}).encode()
        return http_request("POST", "/v1/rank", body)

    if reads_only:
        out.send({"reads only": asyncio.run(open_loop(port, feature, READS_ONLY_RATE, seconds, "reads only"))})
        out.close()
        return

    async def together() -> list[tuple[list[Sample], int]]:
        return list(await asyncio.gather(
            open_loop(port, ingest, INGEST_RATE, seconds, "ingest"),
            open_loop(read_port, feature, FEATURE_RATE, seconds, "features"),
            open_loop(rank_port, rank, RANK_RATE, seconds, "rank"),
        ))

    out.send(dict(zip(("ingest", "features", "rank"), asyncio.run(together()), strict=True)))
    out.close()


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _private_mb(pid: int) -> float:
    """Memory only this process holds (RSS less the pages it shares)."""
    try:
        fields = (line.split() for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines())
        return sum(int(f[1]) for f in fields if f[0] in ("Private_Clean:", "Private_Dirty:")) / 1024
    except OSError:
        return 0.0


def _children(pid: int) -> list[int]:
    """Child processes started by any thread of `pid`."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _is_child(pid: int, module: str) -> bool:
    """Whether `pid` runs `python -m module` (the standby: insession.features.standby; the reader:
    insession.serve.reader)."""
    try:
        return module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class _Watch(threading.Thread):
    """Samples every second the memory and CPU (share of one core; a GIL lets Python use about one) of the
    server, of its snapshot standby, of its feature reader (if any) and of its other children (the analytics
    and export workers, private memory), and notes each new snapshot (the CURRENT file changing) and each
    export (the history's manifest rewritten), in seconds after `t0`."""

    def __init__(self, pid: int, data_dir: Path, t0: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0 = pid, t0
        self.current, self.manifest = data_dir / "features" / "CURRENT", data_dir / "history" / "_manifest.json"
        self.stop = threading.Event()
        self.snapshots: list[float] = []
        self.exports: list[float] = []
        self.rss: list[tuple[float, float, float, float, float]] = []  # (t, server, standby, workers, reader MB)
        self.cpu: list[tuple[float, float, float, float, float]] = []  # the same in cores, over the last second

    def run(self) -> None:
        seen = self.current.read_text() if self.current.exists() else ""
        exported = _mtime_ns(self.manifest)
        last_mem, last_cpu = 0.0, _cpu_s(self.pid)
        last_children: dict[int, float] = {c: _cpu_s(c) for c in _children(self.pid)}
        while not self.stop.wait(0.05):
            now = time.perf_counter() - self.t0
            text = self.current.read_text() if self.current.exists() else ""
            if text and text != seen:
                seen = text
                self.snapshots.append(now)
            if (m := _mtime_ns(self.manifest)) != exported:
                exported = m
                self.exports.append(now)
            if now - last_mem >= 1.0:
                last_mem = now
                children = _children(self.pid)
                standby = [c for c in children if _is_child(c, "insession.features.standby")]
                reader = [c for c in children if _is_child(c, "insession.serve.reader")]
                workers = [c for c in children if c not in standby and c not in reader]
                self.rss.append((now, _rss_mb(self.pid), sum(map(_rss_mb, standby)),
                                 sum(map(_private_mb, workers)), sum(map(_rss_mb, reader))))
                cpu, child_cpu = _cpu_s(self.pid), {c: _cpu_s(c) for c in children}
                used = {c: t - last_children.get(c, 0.0) for c, t in child_cpu.items()}
                self.cpu.append((now, cpu - last_cpu, sum(used[c] for c in standby), sum(used[c] for c in workers),
                                 sum(used[c] for c in reader)))
                last_cpu, last_children = cpu, child_cpu


class _Phase(NamedTuple):
    """One measured server: its samples by kind (and sends made late), its watch, its scans, its start time."""

    results: dict[str, tuple[list[Sample], int]]
    watch: _Watch
    scans: list[_Analytics]
    ready_s: float
    paused: tuple[float, int]  # seconds the analytics queries were held paused for serving, and how many pauses


def _stats(samples: list[Sample]) -> dict[str, float]:
    lat = [s.latency for s in samples]
    p = percentiles_ms(lat)
    return {**p, "max": max(lat) * 1000.0, "failed": sum(s.status != 200 for s in samples)}


def _plot(results: dict[str, list[Sample]], watch: _Watch, half: float, seconds: float, setup: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cpu, mem) = plt.subplots(3, 1, figsize=(11, 8), sharex=True, height_ratios=[3, 1, 1])
    for kind, marker in (("ingest", "^"), ("rank", "s"), ("features", ".")):
        due = [s.due for s in results[kind]]
        ax.scatter(due, [s.latency * 1000 for s in results[kind]], s=3, marker=marker, alpha=0.35, label=kind)
    for n, t in enumerate(watch.snapshots):
        ax.axvline(t, color="crimson", linewidth=1, linestyle="--", label="snapshot written" if n == 0 else None)
    for n, t in enumerate(watch.exports):
        ax.axvline(t, color="seagreen", linewidth=0.6, linestyle=":", label="export written" if n == 0 else None)
    ax.axvspan(half, seconds, color="grey", alpha=0.12, label="two analytics scans running")
    ax.set_yscale("log")
    ax.set_ylabel("latency from due time, ms")
    ax.legend(loc="upper left", fontsize=8, markerscale=4, ncol=3)
    ax.set_title(f"Latency of every request over the run (open loop), {setup}")
    t = [x[0] for x in watch.cpu]
    cpu.plot(t, [x[1] for x in watch.cpu], label="server process")
    cpu.plot(t, [x[2] for x in watch.cpu], label="snapshot standby")
    cpu.plot(t, [x[4] for x in watch.cpu], label="feature reader")
    cpu.plot(t, [x[3] for x in watch.cpu], label="its workers (analytics, export)")
    for x in watch.snapshots:
        cpu.axvline(x, color="crimson", linewidth=1, linestyle="--")
    cpu.set_ylabel("CPU, cores")
    cpu.legend(fontsize=8)
    t = [x[0] for x in watch.rss]
    mem.plot(t, [x[1] / 1024 for x in watch.rss], label="server")
    mem.plot(t, [x[2] / 1024 for x in watch.rss], label="snapshot standby")
    mem.plot(t, [x[4] / 1024 for x in watch.rss], label="feature reader")
    mem.plot(t, [x[3] / 1024 for x in watch.rss], label="analytics workers, private")
    mem.set_ylabel("RSS, GiB")
    mem.set_xlabel("seconds since the load started")
    mem.legend(fontsize=8)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    name = f"bench_mixed_timeline_{setup.replace(' ', '_')}.png"
    fig.savefig(IMG / name, dpi=110)
    plt.close(fig)
    return f"![latency over time, {setup}, snapshots and analytics marked](img/{name})"


def _measure(port: int, read_port: int, rank_port: int, n_users: int, start_ts: int, seconds: float,
             reads_only: bool = False) -> tuple[mp.process.BaseProcess, Connection]:
    """Start the load client in a process of its own; its samples arrive on the returned connection."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client, args=(port, read_port, rank_port, n_users, start_ts, seconds, send,
                                             reads_only))
    proc.start()
    send.close()
    return proc, recv


def run(quick: bool) -> str:
    n_users, per_user, seconds, snapshot_s = (20_000, 20, 40.0, 8.0) if quick else (1_000_000, 20, 300.0, 60.0)
    reads_only_s = 10.0 if quick else 60.0
    cache = cached_shop(n_users, per_user)
    phases: dict[str, _Phase] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        shutil.copytree(cache, data_dir)
        with ServerProcess(data_dir, ready_timeout_s=1800) as server:  # its own start: the load's snapshot
            for _ in range(50):  # clock starts anew with the measured server
                _get(server.port, f"/v1/features/user/u{_}")
            proc, recv = _measure(server.port, server.port, server.port, n_users, 0, reads_only_s, reads_only=True)
            reads_only: list[Sample] = recv.recv()["reads only"][0]
            proc.join()
        for setup, (reads, ranks) in SETUPS.items():
            shutil.rmtree(data_dir)
            shutil.copytree(cache, data_dir)  # each setup from the same state and log
            config = Path(tmp) / "server.toml"
            reader_port = free_port()
            config.write_text(f'[features]\nsnapshot_interval_s = {snapshot_s}\nsnapshot_writer = "standby"\n'
                              + f"[server]\nreader_port = {reader_port}\n")
            print(f"bench_mixed: the measured load, {setup}", flush=True)
            phases[setup] = _measured(data_dir, config, n_users, seconds, reader_port, reads, ranks)
    return _report(phases, reads_only, seconds, n_users, per_user, snapshot_s)


def _measured(data_dir: Path, config: Path, n_users: int, seconds: float, reader_port: int, reads: bool,
              ranks: bool) -> _Phase:
    """Start a server on `data_dir` with `config`, run the mixed load on it for `seconds` (feature reads and
    rankings on `reader_port` as `reads` and `ranks` say, once the reader answers /readyz), stop it."""
    t_start = time.perf_counter()
    server = ServerProcess(data_dir, ready_timeout_s=1800, extra_args=["--config", str(config)]).start()
    assert server.proc is not None
    try:
        _reader_ready(reader_port, 1800)
        read_port = reader_port if reads else server.port
        rank_port = reader_port if ranks else server.port
        ready_s = time.perf_counter() - t_start
        ready = json.loads(_get(server.port, "/readyz"))
        start_ts = int(ready["watermark"]) + 60_000
        for _ in range(50):  # warm-up: connections, model threads, popular lists
            _get(read_port, f"/v1/features/user/u{_}")
        _ranks_with_model(rank_port)
        t0 = time.perf_counter()
        watch = _Watch(server.proc.pid, data_dir, t0)
        watch.start()
        proc, recv = _measure(server.port, read_port, rank_port, n_users, start_ts, seconds)
        time.sleep(seconds / 2)
        scans = [_Analytics(server.port, sql) for sql in ANALYTICS_SQL]
        for s in scans:
            s.start()
        results: dict[str, tuple[list[Sample], int]] = recv.recv()
        proc.join()
        paused = _paused(_get(server.port, "/metrics").decode())
        for s in scans:
            s.stop.set()
        for s in scans:
            s.join(600)
        watch.stop.set()
        watch.join()
    finally:
        server.stop()
    return _Phase(results, watch, scans, ready_s, paused)


def _ranks_with_model(port: int, timeout_s: float = 120.0) -> None:
    """Wait until a ranking is the model's, not a fallback list: the rank figures would be of a fallback. A
    deadline missed while the processes beside the server still load their copies of the state is waited
    out; any other fallback (no model) is raised at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        ranked = json.loads(_post(port, "/v1/rank", {"user_id": "u1", "k": 20}))
        reason = ranked.get("fallback_reason")
        if ranked.get("fallback") is None:
            return
        if reason != "timeout" or time.monotonic() > deadline:
            raise RuntimeError(f"the server ranks without its model ({reason}); see the server's log above")
        time.sleep(1.0)


def _reader_ready(port: int, timeout_s: float) -> int:
    """Wait until the feature reader on `port` answers /readyz (it loads the snapshot first); its port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if json.loads(_get(port, "/readyz")).get("ready"):
                return port
        time.sleep(0.5)
    raise RuntimeError(f"the feature reader on port {port} was not ready within {timeout_s:.0f} s")


def _paused(metrics: str) -> tuple[float, int]:
    """(seconds paused, pauses) of the analytics lane's serving-first rule, from a /metrics text."""
    values = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in ("insession_analytics_paused_seconds_total", "insession_analytics_pauses_total"):
            values[name] = float(value)
    return (values.get("insession_analytics_paused_seconds_total", 0.0),
            int(values.get("insession_analytics_pauses_total", 0)))


def _post(port: int, path: str, body: dict[str, object]) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    body_out = conn.getresponse().read()
    conn.close()
    return body_out


def _get(port: int, path: str) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return body


def _rows(samples: dict[str, list[Sample]], half: float, setup: str) -> list[list[object]]:
    rows: list[list[object]] = []
    for kind in ("features", "rank", "ingest"):
        for label, part in (("whole run", samples[kind]),
                            ("1st half (no analytics)", [s for s in samples[kind] if s.due < half]),
                            ("2nd half (analytics)", [s for s in samples[kind] if s.due >= half])):
            st = _stats(part)
            rows.append([setup, kind, label, st["n"], st["p50"], st["p99"], st["p99.9"], st["max"], st["failed"]])
    return rows


def _phase_text(setup: str, phase: _Phase, half: float) -> str:
    watch, scans = phase.watch, phase.scans

    def mean(i: int, first: bool) -> float:
        return float(np.mean([x[i] for x in watch.cpu if (x[0] < half) == first] or [0.0]))

    def peak(i: int) -> float:
        return max((x[i] for x in watch.rss), default=0.0) / 1024

    late = {kind: n for kind, (_, n) in phase.results.items()}
    return (
        f"**{setup.capitalize()}.** {len(watch.snapshots)} snapshots written during the run (at "
        + ", ".join(f"{t:.0f} s" for t in watch.snapshots)
        + f"). Ready {phase.ready_s:.0f} s after start (snapshot load, the reader's included). Peak RSS: server "
        f"{peak(1):.2f} GiB; snapshot standby {peak(2):.2f} GiB (its own copy of the state); feature reader "
        f"{peak(4):.2f} GiB (a third copy); analytics workers' "
        f"private memory {peak(3):.2f} GiB. Analytics scans completed in the second half: "
        f"{sum(len(s.done) for s in scans)} ({sum(s.refused for s in scans)} answered 429, "
        f"{sum(s.failed for s in scans)} failed); held paused for serving (`[query] yield_lag_ms`) "
        f"{phase.paused[0]:.0f} s in {phase.paused[1]} pauses. Sends the client could not make on time (> 1 ms late): "
        + ", ".join(f"{k} {v}" for k, v in late.items()) + ". "
        f"CPU, mean over each half, in cores: the server's {mean(1, True):.2f} / {mean(1, False):.2f} (its Python "
        f"work is bound to about one by the GIL); the standby's {mean(2, True):.2f} / {mean(2, False):.2f}"
        f"; the reader's: {mean(4, True):.2f} / {mean(4, False):.2f}; its workers' (export, analytics): "
        f"{mean(3, True):.2f} / {mean(3, False):.2f}. Exports written: {len(watch.exports)}."
    )


def _report(phases: dict[str, _Phase], reads_only: list[Sample], seconds: float, n_users: int, per_user: int,
            snapshot_s: float) -> str:
    half = seconds / 2
    rows: list[list[object]] = []
    for setup, phase in phases.items():
        rows += _rows({kind: s for kind, (s, _) in phase.results.items()}, half, setup)
    st = _stats(reads_only)
    rows.append(["(none)", "features", f"reads only, {READS_ONLY_RATE:,}/s, before the load", st["n"], st["p50"],
                 st["p99"], st["p99.9"], st["max"], st["failed"]])
    stalls = sorted({int(s.due) for s in reads_only if s.latency * 1000.0 > STALL_MS})
    samples = {kind: s for kind, (s, _) in phases[MEASURED].results.items()}
    checks: list[list[object]] = []
    for (kind, q), target in TARGETS.items():
        st = _stats(samples[kind])
        checks.append([f"{kind} {q}", f"< {target:g} ms", st[q], "met" if st[q] < target else "NOT met"])
    first = _stats([s for s in samples["features"] if s.due < half])
    second = _stats([s for s in samples["features"] if s.due >= half])
    ratio = second["p99"] / first["p99"]
    checks.append(["feature reads p99, analytics / none", "< 1.5x", ratio, "met" if ratio < 1.5 else "NOT met"])
    failed = sum(_stats(part)["failed"] for part in samples.values())
    checks.append(["failed requests", "0", failed, "met" if failed == 0 else "NOT met"])
    return "\n\n".join([
        f"### Mixed load: {n_users:,} shoppers x {per_user} events, {seconds:.0f} s of ingest + reads + ranking, "
        "analytics in the second half",
        __doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else "",
        f"Snapshot interval {snapshot_s:g} s. Reads alone before the load ({len(reads_only):,} reads, "
        f"{READS_ONLY_RATE:,}/s, no ingest or ranking): the seconds holding a read over {STALL_MS:g} ms, counted "
        "from the phase's start: " + (", ".join(f"second {t}" for t in stalls) if stalls else "none") + ".",
        *(_phase_text(setup, phase, half) for setup, phase in phases.items()),
        table(["setup", "requests", "part", "n", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "failed"], rows),
        table([f"target (issue: serving that never stops), {MEASURED}", "wanted", "measured", ""],
              checks),
        *(_plot({kind: s for kind, (s, _) in phase.results.items()}, phase.watch, half, seconds, setup)
          for setup, phase in phases.items()),
    ])


