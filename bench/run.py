"""Run every benchmark (or some) and write docs/benchmarks.md with the machine and the date.

Each benchmark's section is kept in docs/bench/<name>.md (stamped with its own machine, date and
command), so `--only` reruns one without losing the others; docs/benchmarks.md joins them all.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from bench.common import machine, stamp

MODULES = ("bench_ingest", "bench_features", "bench_freshness", "bench_query", "bench_train", "bench_offline",
           "bench_rank", "bench_mixed", "bench_cluster", "bench_zero_code")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes and short durations (smoke run)")
    ap.add_argument("--only", nargs="*", choices=MODULES, help="run only these benchmarks")
    ap.add_argument("--join", action="store_true", help="only rebuild docs/benchmarks.md from docs/bench/")
    args = ap.parse_args()
    if args.join:
        return join()
    names = args.only or list(MODULES)
    (DOCS / "bench").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}{' (quick)' if args.quick else ''} ...", flush=True)
        t0 = time.perf_counter()
        section = importlib.import_module(f"bench.{name}").run(args.quick)
        print(section, flush=True)
        mode = "QUICK smoke sizes, not reference numbers" if args.quick else "full size"
        took = time.perf_counter() - t0
        loadavg = Path("/proc/loadavg")
        load = " / ".join(loadavg.read_text().split()[:3]) if loadavg.exists() else "n/a"
        footer = (f"\n\n_Measured {stamp()} on {machine()}; `python -m bench.run"
                  f"{' --quick' if args.quick else ''} --only {name}` ({mode}); took {took:.0f} s; load average "
                  f"(1 / 5 / 15 min) at the end: {load} (the benchmark itself counts: above ~1-2, other work "
                  "shared the 2 cores)._\n")
        (DOCS / "bench" / f"{name}.md").write_text(section.rstrip() + footer)
    join()


def join() -> None:
    """docs/benchmarks.md from every section in docs/bench/ (also `python -m bench.run --join`)."""
    parts = [(DOCS / "bench" / f"{n}.md") for n in MODULES]
    body = "\n\n".join(p.read_text().rstrip() for p in parts if p.exists())
    header = ("# Benchmarks\n\nWritten by `python -m bench.run` (each section says when, where and how it was "
              "measured). Latencies in milliseconds; every ratio compares two figures measured in the same run.\n\n")
    (DOCS / "benchmarks.md").write_text(header + body + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
