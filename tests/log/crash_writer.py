"""Writer process for the crash test: appends continuously from several threads until it is killed.

Usage: crash_writer.py DB HISTORY_DIR RUN RETRY_JSON. Prints `try KEY N` before and `ack KEY OFFSETS`
after each append (only once append() has returned), one flushed line each. A batch KEY of size N is
always the same events, so the test can ask the next run to retry batches whose ack it never saw.
Keys starting with `n` carry no event_id (found by properties instead); they are never retried.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import zlib
from pathlib import Path

from insession.log.eventlog import EventLog
from insession.schema import Event

T0 = 1_763_800_000_000
DAY_MS = 86_400_000
_out = threading.Lock()


def batch(key: str, n: int) -> list[Event]:
    day = zlib.crc32(key.encode()) % 3
    with_ids = not key.startswith("n")
    return [
        Event(f"u{j % 7}", f"i{j}", "view", T0 + day * DAY_MS + j,
              event_id=f"{key}.{j}" if with_ids else None, properties={"key": key, "j": j})
        for j in range(n)
    ]


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def append(log: EventLog, key: str, n: int) -> None:
    say(f"try {key} {n}")
    results = log.append(batch(key, n))
    say(f"ack {key} {','.join(str(r.offset) for r in results)}")


def writer(log: EventLog, run: int, thread: int, retries: list[tuple[str, int]]) -> None:
    rng = random.Random(run * 100 + thread)
    for key, n in retries:
        append(log, key, n)
    b = 0
    while True:
        prefix = "n" if rng.random() < 0.2 else "k"
        append(log, f"{prefix}{run}t{thread}b{b}", rng.randint(1, 60))
        b += 1


def exporter(log: EventLog, history: Path) -> None:
    while True:
        log.export(history)
        time.sleep(0.05)


def main() -> None:
    db, history, run, retry_json = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    retries = [tuple(r) for r in json.loads(retry_json)]
    log = EventLog(db)
    threads = [threading.Thread(target=writer, args=(log, run, t, retries[t::3]), daemon=True)
               for t in range(3)]
    threads.append(threading.Thread(target=exporter, args=(log, history), daemon=True))
    for t in threads:
        t.start()
    threads[0].join()


if __name__ == "__main__":
    main()
