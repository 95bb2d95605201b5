"""Child process of the truncated-WAL test: writes through the embedded handle, then dies by SIGKILL.

Usage: killed_handle.py DATA_DIR FIRST N WITNESS. Inserts events FIRST..FIRST+N-1 (`rows`) in batches of
BATCH, printing `acked LAST_OFFSET` after each acknowledged one, then lets WITNESS keep a record of them
outside the log's WAL before the kill: `snapshot` (a feature snapshot), `history` (a Parquet export),
`checkpoint` (SQLite copies the WAL into log.sqlite, as its automatic checkpoint does every 1000 pages)
or `none`. Killed, the handle closes nothing: the WAL stays as a crash leaves it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import insession

T0 = 1_763_800_000_000
BATCH = 20


def rows(first: int, n: int) -> list[dict[str, object]]:
    """Event k is user u{k%7} on item i{k%5} at T0 + k s, with event_id e{k} and properties {"k": k}."""
    return [{"user_id": f"u{k % 7}", "item_id": f"i{k % 5}", "action": "view", "ts": T0 + k * 1000,
             "event_id": f"e{k}", "properties": {"k": k}} for k in range(first, first + n)]


def main() -> None:
    data, first, n, witness = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    db = insession.open(data, maintenance_interval_s=None)
    batch = rows(first, n)
    for i in range(0, n, BATCH):
        offsets = db.insert("events", batch[i : i + BATCH]).offsets
        print(f"acked {offsets[-1]}", flush=True)
    if witness == "snapshot":
        db.features.snapshot()
    elif witness == "history":
        db.export()
    elif witness == "checkpoint":
        with sqlite3.connect(data / "log.sqlite") as conn:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert (busy, frames) == (0, copied), "the checkpoint did not copy the whole WAL"
    print("witnessed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
