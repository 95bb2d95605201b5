"""Benchmark of the offline engines: the training-data build (what `insession training-data` runs, with the
candidate stage's proposals as negatives) on DuckDB and on Spark (1 and 2 local cores), side by side.

Each engine runs in its own process on the same synthetic history (a Parquet file written once), so peak
memory is that build's alone: the Python driver's peak RSS and, for Spark, the JVM's (VmHWM read before it
stops). CPU seconds (the driver's user + system time, plus the JVM's for Spark) are reported beside wall
seconds: on a machine shared with other work the wall time stretches with the load, the CPU time much less,
so the CPU column is the one to compare between runs made at different loads. Run
`python -m bench.bench_offline [--events N ...]` under `flock /tmp/insession-bench.lock` so that it never
overlaps another benchmark; it writes docs/bench/bench_offline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import machine, stamp, table

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONFIGS = (("duckdb", None), ("spark", "local[1]"), ("spark", "local[2]"))


def _vm_hwm_gib(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_KEEP_STAGES = {"spark.ui.retainedJobs": "100000", "spark.ui.retainedStages": "100000"}


def _spark_totals(sc) -> dict[str, float]:  # noqa: ANN001
    """Jobs, and the shuffle written and spilled to disk summed over every stage, from Spark's status store
    (kept with the UI off; `_KEEP_STAGES` keeps every stage of a build)."""
    gw = sc._gateway  # noqa: SLF001
    store = sc._jsc.sc().statusStore()  # noqa: SLF001
    # AppStatusStore.stageList(statuses, details, withSummaries, unsortedQuantiles, taskStatus): every stage
    stages = store.stageList(None, False, False, gw.new_array(gw.jvm.double, 0), gw.jvm.java.util.ArrayList())
    shuffle = spilled = 0
    for i in range(stages.size()):
        st = stages.apply(i)
        shuffle += st.shuffleWriteBytes()
        spilled += st.diskBytesSpilled()
    return {"jobs": len(sc.statusTracker().getJobIdsForGroup()), "shuffle_gib": shuffle / 2**30,
            "spill_gib": spilled / 2**30}  # fmt: skip


def child(history: Path, engine_name: str, master: str | None) -> None:
    """One build; prints a JSON line with its seconds, steps, groups and peak memory."""
    from insession.offline import open_engine
    from insession.train.build import BuildConfig, build
    from insession.train.replay import stage_proposer

    events = pq.read_table(history)
    t0 = time.perf_counter()
    if engine_name == "spark":  # the UI off; every stage kept in the status store, for the totals below
        from insession.offline.spark_engine import SparkEngine

        engine = SparkEngine(master or "local[*]", conf={"spark.ui.enabled": "false", **_KEEP_STAGES})
    else:
        engine = open_engine(engine_name, master=master)
    started = time.perf_counter() - t0
    print(f"[bench_offline] {engine.describe()}", file=sys.stderr, flush=True)
    data = build(
        events, BuildConfig(), progress=True, proposer=stage_proposer(events, progress=False, engine=engine),
        engine=engine,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    jvm, cpu, totals = float("nan"), _cpu_s(os.getpid()), {}
    if engine_name == "spark":
        jvm_pid = engine.spark.sparkContext._gateway.proc.pid  # noqa: SLF001
        jvm, cpu = _vm_hwm_gib(jvm_pid), cpu + _cpu_s(jvm_pid)
        try:  # the build's own numbers stand even if Spark's status store cannot be read
            totals = _spark_totals(engine.spark.sparkContext)
        except Exception as e:  # noqa: BLE001
            print(f"[bench_offline] no stage totals: {e!r:.300}", file=sys.stderr, flush=True)
    engine.close()
    out = {
        "seconds": seconds,
        "cpu_s": cpu,
        "start_s": started,
        "steps": data.seconds,
        "groups": len(data.train) + len(data.val),
        "driver_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "jvm_gib": jvm,
        **totals,
    }
    print(json.dumps(out), flush=True)


def _run_child(cmd: list[str], timeout_s: float | None) -> dict | str:
    """One child build: its JSON line, or a line saying how it failed (its last stderr line, in which step)
    or that it ran past `timeout_s` (its process group, the JVM included, is killed)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        step = [ln for ln in err.splitlines() if ln.strip() and "WARN" not in ln][-1:] or [""]
        return f"stopped after {timeout_s:.0f} s, in: {step[0][:160]}"
    if proc.returncode:
        kept = _failure_lines(err)
        print("\n".join(kept), file=sys.stderr, flush=True)
        causes = [i for i, ln in enumerate(kept) if _is_cause(ln)]
        if not causes:
            return f"failed: {kept[-1].strip()[:200] if kept else proc.returncode}"
        at = causes[-1]  # the deepest cause and the first frame under it (which operator asked)
        frame = next((ln.strip() for ln in kept[at + 1 : at + 2] if ln.lstrip().startswith("at ")), "")
        return f"failed: {kept[at].strip()[:200]}{f' ({frame[:160]})' if frame else ''}"
    return json.loads(out.strip().splitlines()[-1])


def _is_cause(line: str) -> bool:
    return "Caused by" in line or "Error:" in line or "Exception:" in line


def _failure_lines(err: str, frames: int = 12) -> list[str]:
    """A failed child's stderr without Spark's WARN lines, each exception or cause keeping its first `frames`
    stack frames (the operator that failed; its deeper frames are Spark's task plumbing). The 5M build's
    failures lost them: the bench kept the last 4,000 characters (all frames), then no frames at all."""
    kept: list[str] = []
    under = frames  # frames still to keep under the last exception line
    for ln in err.splitlines():
        if not ln.strip() or " WARN " in ln:
            continue
        if ln.lstrip().startswith(("at ", "... ")):
            if under < frames:
                kept.append(ln)
            under += 1
            continue
        under = 0 if _is_cause(ln) else frames
        kept.append(ln)
    return kept[-200:]


def run(
    quick: bool, sizes: list[int] | None = None, configs: list[str] | None = None, timeout_s: float | None = None
) -> str:
    """The section's table; `configs` picks among "duckdb", "local[1]", "local[2]" (default: all three); a
    build past `timeout_s` is stopped and its row says so."""
    from bench.bench_train import synthetic_history

    sizes = sizes or ([20_000] if quick else [100_000])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            events, _ = synthetic_history(n)
            path = Path(tmp) / f"history_{n}.parquet"
            pq.write_table(events, path)
            for engine_name, master in CONFIGS:
                if configs and (master or engine_name) not in configs:
                    continue
                label = engine_name if master is None else f"spark {master}"
                print(f"[bench_offline] {events.num_rows:,} events on {label} ...", flush=True)
                cmd = [sys.executable, "-m", "bench.bench_offline", "--child", str(path), engine_name]
                if master:
                    cmd.append(master)
                failed = _run_child(cmd, timeout_s)
                if isinstance(failed, str):  # a failure or a timeout is a result too: a row that says so
                    print(f"[bench_offline]   {failed}", flush=True)
                    rows.append([f"{events.num_rows:,}", label, *[float("nan")] * 9, "", failed])
                    continue
                r = failed
                steps = ", ".join(f"{k} {v:.0f}" for k, v in r["steps"].items())
                rows.append([
                    f"{events.num_rows:,}", label, r["seconds"], r["cpu_s"], r["start_s"],
                    1e6 * r["seconds"] / events.num_rows, r["driver_gib"], r["jvm_gib"], r.get("jobs", float("nan")),
                    r.get("shuffle_gib", float("nan")), r.get("spill_gib", float("nan")), r["groups"], steps,
                ])  # fmt: skip
                print(f"[bench_offline]   {r['seconds']:.0f} s; {steps}", flush=True)
    headers = [
        "events", "engine", "build s", "CPU s", "engine start s", "µs per event", "driver peak GiB", "JVM peak GiB",
        "Spark jobs", "shuffle written GiB", "spilled GiB", "groups", "steps (s)",
    ]  # fmt: skip
    return (
        "## Offline engines: the training-data build on DuckDB and on Spark (bench_offline)\n\n"
        "`build` with the candidate stage's proposals (what `insession training-data` and `insession train` "
        "run), each engine in its own process on the same synthetic history; Spark local, its UI off. "
        "CPU s: the process's user + system time (for Spark the Python driver's plus the JVM's, including the "
        "history's read in the driver). Peak memory: the Python driver's max RSS and the JVM's "
        "VmHWM. Spark jobs, shuffle written and spilled to disk: summed over the build's stages from Spark's "
        "status store.\n\n" + table(headers, rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, nargs="*", help="synthetic history sizes (default 100,000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", nargs="*", choices=["duckdb", "local[1]", "local[2]"], help="default: all")
    ap.add_argument("--timeout", type=float, help="stop a build after this many seconds (its row says so)")
    ap.add_argument("--append", action="store_true", help="add the run below the doc's tables, not replace them")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        history, engine_name, *master = args.child
        return child(Path(history), engine_name, master[0] if master else None)
    t0 = time.perf_counter()
    load0 = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    section = run(args.quick, args.events, args.configs, args.timeout)
    load = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    footer = (
        f"\n\n_Measured {stamp()} on {machine()}; `python -m bench.bench_offline"
        f"{' --quick' if args.quick else ''}{' --events ' + ' '.join(map(str, args.events)) if args.events else ''}"
        f"{' --configs ' + ' '.join(args.configs) if args.configs else ''}"
        f"{f' --timeout {args.timeout:.0f}' if args.timeout else ''}{' --append' if args.append else ''}`"
        f"; took {time.perf_counter() - t0:.0f} s; load average (1 / 5 / 15 min) at the start: {load0}, at the end: "
        f"{load} (above ~1-2, "
        "other work shared the 2 cores)._\n"
    )
    print(section + footer)
    doc = DOCS / "bench" / "bench_offline.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    if args.append and doc.exists():  # the new table (without the section's heading) below what is there
        table_only = section.split("\n\n", 2)[2]
        doc.write_text(doc.read_text().rstrip() + "\n\n" + table_only.rstrip() + footer)
    else:
        doc.write_text(section.rstrip() + footer)


if __name__ == "__main__":
    main()
