"""Child process of the export-lease test: an insession node that takes the export lease, exports, and dies
by SIGKILL between writing history parts and committing the export mark (the worst moment).

Usage: lease_node.py DATA_DIR LOG_CONFIG_JSON. Prints `holding` once it holds the lease, then waits for a
line on stdin; then for each of BATCHES batches of BATCH events (event_id `k<n>`) prints `acked LAST_OFFSET`
and `exported MARK` after exporting it; then acknowledges one more batch, writes it to the history as an
export does but does not commit it, prints `orphaned MARK` and kills itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import msgspec

import insession
from insession.log import LogConfig
from insession.log.export import write_day_partitions

T0 = 1_763_800_000_000
BATCH = 50
BATCHES = 6
PARTITIONS = 4


def rows(first: int) -> list[dict[str, object]]:
    return [{"user_id": f"u{k % 7}", "item_id": f"i{k % 5}", "action": "view", "ts": T0 + k * 60_000,
             "event_id": f"k{k}"} for k in range(first, first + BATCH)]


def main() -> None:
    config = msgspec.json.decode(sys.argv[2], type=LogConfig)
    db = insession.open(Path(sys.argv[1]), log_config=config, maintenance_interval_s=None, partitions=PARTITIONS)
    deadline = time.monotonic() + 60
    while not db.log.exporting():
        assert time.monotonic() < deadline, "the first node never took the export lease"
        time.sleep(0.05)
    print("holding", flush=True)
    sys.stdin.readline()
    for b in range(BATCHES):
        print(f"acked {db.insert('events', rows(b * BATCH)).offsets[-1]}", flush=True)
        print(f"exported {db.export()}", flush=True)
    last = db.insert("events", rows(BATCHES * BATCH)).offsets[-1]
    print(f"acked {last}", flush=True)
    mark = db.log.exported_offset()
    write_day_partitions(list(db.log.read(mark + 1, upto=last)), db.history_dir)
    print(f"orphaned {mark}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
