"""Child process of the shutdown test: one life of the embedded handle, ended by the interpreter's exit.

Usage: shutdown_child.py DATA_DIR MODE. Opens the handle (its newest model scores with ONNX Runtime),
ingests a catalogue and events, ranks with the model, runs an analytics query (a DuckDB worker
process), then closes and returns from main. MODE `exporting` also starts the ONNX export of a newer
version (`reload`) right before the close, so the close meets an export in progress. Asserts that
the close left no thread but the main one, prints `closed SECONDS` (how long close() took); whatever
the exit itself does shows in the exit status and on stderr.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import insession

T0 = 1_763_800_000_000


def main() -> None:
    data, mode = Path(sys.argv[1]), sys.argv[2]
    db = insession.open(data, maintenance_interval_s=0.05, snapshot_interval_s=0.0)  # background jobs running
    db.insert("items", [{"item_id": f"i{n}", "category": f"c{n % 4}", "subcategory": f"s{n % 8}"} for n in range(32)])
    db.insert("events", [{"user_id": f"u{k % 5}", "item_id": f"i{k % 32}", "action": "view",
                          "ts": T0 + k * 60_000} for k in range(200)])
    ranked = db.rank("u0", k=5, budget_ms=5_000)
    assert ranked.fallback is None and db.ranker.backend_ready() == "onnx", ranked
    assert db.select("SELECT count(*) FROM events").rows == [[db.lag()["log_offset"] + 1]]  # every run's events
    if mode == "exporting":
        newer = data / "models" / "v2"
        shutil.copytree(data / "models" / "v1", newer, ignore=shutil.ignore_patterns("serve.onnx"))
        db.ranker.reload()  # v2 serves eagerly; its export runs in a child process
    started = time.perf_counter()
    db.close()
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    assert not left, f"threads still running after close: {left}"
    print(f"closed {time.perf_counter() - started:.2f}", flush=True)


if __name__ == "__main__":
    main()
