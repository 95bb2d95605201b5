"""A/B of two server settings under bench_mixed's load, on its cached 1M-shopper shop, without analytics.

The standby writes the snapshots, and the same load as bench_mixed's (5,000 events/s in batches of 50, 500
feature reads/s, 100 ranks/s, open loop) runs for SECONDS on a fresh copy of the data, four times,
alternating A and B (TOML lines added to the base config; runs alternate because how fast this shared host
runs drifts within minutes). Prints one line per run: the server's CPU and p50/p99/p99.9/max per kind.

    python -m bench.config_ab 90 '[query]\nyield_lag_ms = 0' '[query]\nyield_lag_ms = 5'

Measured:
- The analytics lane's serving-first watch (`insession.query.yielding`), `yield_lag_ms` 0 against 5, when it
  ticked every 10 ms all the time (2026-11-30 14:33 UTC, 90 s runs): ingest ack p99 201 / 383 ms off
  against 753 / 908 ms on; so the watch now ticks only while a query runs.
- `[server] gil_switch_ms` 5 (Python's own) against 1 (2026-11-30 17:34-17:42 UTC, 90 s runs, the machine
  otherwise idle, a host slower than at 14:33): at 5 ms the server used 0.98-0.99 cores and was saturated
  (feature reads p50 5.7-7.9 s, ingest acks p50 45-54 s); at 1 ms 1.05-1.07 cores and feature reads p50
  28-37 s. More hand-overs cost a saturated server throughput, so the default stays 5 ms.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_mixed import _get, _measure, _post, _stats, cached_shop
from insession.serve.process import ServerProcess

N_USERS, PER_USER = 1_000_000, 20


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (from /proc, clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def one_run(cache: Path, setting: str, seconds: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(cache, data)
        cfg = Path(tmp) / "server.toml"
        cfg.write_text('[features]\nsnapshot_interval_s = 60\nsnapshot_writer = "standby"\n' + setting + "\n")
        server = ServerProcess(data, ready_timeout_s=1800, extra_args=["--config", str(cfg)]).start()
        assert server.proc is not None
        try:
            start_ts = int(json.loads(_get(server.port, "/readyz"))["watermark"]) + 60_000
            for i in range(50):
                _get(server.port, f"/v1/features/user/u{i}")
            _post(server.port, "/v1/rank", {"user_id": "u1", "k": 20})
            c0, t0 = _cpu_s(server.proc.pid), time.monotonic()
            proc, recv = _measure(server.port, N_USERS, start_ts, seconds)
            results = recv.recv()
            proc.join()
            share = (_cpu_s(server.proc.pid) - c0) / (time.monotonic() - t0)
        finally:
            server.stop()
    kinds = " | ".join(
        f"{kind} p50 {st['p50']:.1f} p99 {st['p99']:.1f} p99.9 {st['p99.9']:.1f} max {st['max']:.0f}"
        for kind in ("features", "rank", "ingest")
        for st in [_stats(results[kind][0])]
    )
    return f"{setting!r}: server CPU {share:.2f} cores | {kinds}"


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python -m bench.config_ab SECONDS 'A: TOML lines' 'B: TOML lines' (\\n between lines)")
    seconds = float(sys.argv[1])
    a, b = (arg.replace("\\n", "\n") for arg in sys.argv[2:])
    cache = cached_shop(N_USERS, PER_USER)
    for rep, setting in enumerate((a, b, a, b)):
        print(f"run {rep}: {one_run(cache, setting, seconds)}", flush=True)


if __name__ == "__main__":
    main()
