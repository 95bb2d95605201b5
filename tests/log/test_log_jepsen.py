"""A Jepsen-style run of the replicated log: clients write continuously through two log handles ("nodes")
while a nemesis SIGKILLs and restarts NATS servers (one down at a time, then a phase with two down).
Afterwards every acknowledged event is in the stream exactly once at its acknowledged offset, no refused
batch is half-visible, the writes of the two-down phase were refused (503), and each node's follower
passed the whole stream to on_commit in order. Bounded to ~30 s of faults; the counts are printed."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from conftest import make_event
from nats_helpers import log_config, start_cluster

from insession.log import LogUnavailable
from insession.log.jetstream import JetStreamLog
from insession.schema import Event

FAULTS = 20  # single-server kills, then one two-server phase
CLIENTS = 4


@pytest.mark.timeout(120)
def test_acknowledged_events_survive_server_kills_exactly_once(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "nats")
    cfg = log_config(cluster, ack_timeout_s=4.0)
    applied: list[list[Event]] = [[], []]
    nodes = [JetStreamLog(cfg, tmp_path / f"node{k}", partitions=4, on_commit=applied[k].extend) for k in (0, 1)]
    acked: dict[str, int] = {}  # event_id -> acknowledged offset
    refused: list[tuple[list[str], bool]] = []  # (the batch's ids, sent during the two-down phase)
    two_down = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def client(c: int) -> None:
        rng = random.Random(c)
        n = 0
        while not stop.is_set():
            ids = [f"c{c}-{n + i}" for i in range(rng.choice((1, 1, 10, 100)))]
            n += len(ids)
            phase = two_down.is_set()  # sent while two servers were down (its refusal may come after they return:
            try:                       # under load the 503 of a write sent late in the phase lands after it)
                res = nodes[c % 2].append([make_event(n + i, eid) for i, eid in enumerate(ids)])
            except LogUnavailable:
                with lock:
                    refused.append((ids, phase))
                continue
            with lock:
                acked.update(zip(ids, (r.offset for r in res), strict=True))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        serving = time.monotonic() + 30  # the faults start once the cluster serves: a first write acknowledged
        while not acked and time.monotonic() < serving:
            time.sleep(0.05)
        nemesis = random.Random(14)
        t0 = time.monotonic()
        for _ in range(FAULTS):  # a killed server is back (answering, maybe still catching up) before the next kill
            i = nemesis.randrange(3)
            cluster.kill(i)
            time.sleep(nemesis.uniform(0.05, 0.3))
            cluster.restart(i, wait_leader=False)
            time.sleep(nemesis.uniform(0.2, 0.5))
        a, b = nemesis.sample(range(3), 2)
        cluster.kill(a)
        cluster.kill(b)
        time.sleep(0.5)  # writes already in flight end either way; those sent from now on are refused
        two_down.set()
        time.sleep(cfg.ack_timeout_s + 1.5)
        two_down.clear()
        cluster.restart(a)
        cluster.restart(b)
        time.sleep(1.0)  # writes resume
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert acked, (f"no write was acknowledged in {time.monotonic() - t0:.0f} s of faults ({len(refused)} batches "
                       "refused): the cluster never had a quorum the clients reached; see the servers' logs under "
                       f"{tmp_path / 'nats'}")
        # quiet now: wait until both followers have applied the same end and it holds still
        deadline = time.monotonic() + 20
        ends = (-2, -2)
        while time.monotonic() < deadline:
            now = (len(applied[0]) - 1, len(applied[1]) - 1)
            if now == ends and now[0] == now[1] and now[0] >= max(acked.values()):
                break
            ends = now
            time.sleep(0.5)
        stored = list(nodes[0].read(upto=ends[0]))
        ids = [e.event_id for e in stored]
        assert len(ids) == len(set(ids)), "an event is stored twice"
        assert [e.offset for e in stored] == list(range(len(stored)))
        at = {e.event_id: e.offset for e in stored}
        lost = [eid for eid in acked if eid not in at]
        assert not lost, f"{len(lost)} acknowledged events are missing, e.g. {lost[:5]}"
        assert all(at[eid] == off for eid, off in acked.items()), "an event moved from its acknowledged offset"
        for batch, _ in refused:
            present = sum(eid in at for eid in batch)
            assert present in (0, len(batch)), f"a refused batch is half-visible: {present} of {len(batch)}"
        refused_two_down = sum(1 for _, phase in refused if phase)
        assert refused_two_down > 0, "no write was attempted, or none refused, while two servers were down"
        # each node's state was fed the whole stream, in order, once; a refused batch the servers stored after
        # the quiet check may follow `stored` (a fresh-clone run saw 11 such events)
        for seen in applied:
            assert [e.offset for e in seen] == list(range(len(seen))) and len(seen) >= len(stored)
            assert [e.event_id for e in seen[: len(stored)]] == ids
        print(f"jepsen: {len(acked)} acknowledged, {len(stored)} present, {sum(len(b) for b, _ in refused)} "
              f"refused in {len(refused)} batches ({refused_two_down} while two servers were down), "
              f"{FAULTS + 2} server kills, {time.monotonic() - t0:.0f} s")
    finally:
        stop.set()
        for node in nodes:
            node.close()
        cluster.stop()
