"""`insession nats-cluster`: three servers up with a leader, URLs printed, `insession serve --log URLS`
stores on them (default monitoring ports: client port + 4000, checked for fsync), and Ctrl-C stops every
server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import make_event

from insession.log import LogConfig
from insession.log.jetstream import JetStreamLog
from insession.serve.process import ServerProcess


def _ports_with_neighbours(n: int) -> list[int]:
    """n client ports whose route (+2000) and monitoring (+4000) ports are free too."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 4000 > 65535 or port in out:
            continue
        try:
            for p in (port, port + 2000, port + 4000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        out.append(port)
    return out


def test_nats_cluster_command_serves_until_interrupted(tmp_path: Path) -> None:
    ports = _ports_with_neighbours(3)
    proc = subprocess.Popen([sys.executable, "-m", "insession.cli", "nats-cluster", "--dir", str(tmp_path),
                             "--ports", ",".join(map(str, ports))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own group: a failure kills its servers too
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("JetStream cluster up"), lines
        urls = lines[2].strip().removeprefix("serve on it: insession serve --log ")
        assert urls == ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        event = {"user_id": "u1", "item_id": "sku1", "action": "view", "ts": "2026-11-22T10:00:00Z"}
        with ServerProcess(tmp_path / "data", extra_args=["--log", urls]) as srv:
            r = httpx.post(srv.url + "/v1/events", json=[{**event, "event_id": f"h{i}"} for i in range(3)])
            assert (r.status_code, r.json()["offsets"]) == (200, [0, 1, 2])
        with JetStreamLog(LogConfig(url=urls), tmp_path / "node") as log:  # the server's events are in the stream
            assert [e.event_id for e in log.read()] == ["h0", "h1", "h2"]
            assert [r.offset for r in log.append([make_event(i, f"e{i}") for i in range(3)])] == [3, 4, 5]
        assert all((tmp_path / f"n{i}" / "nats.conf").read_text().count("sync_interval: always") for i in range(3))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert out.strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for port in ports:  # every server is gone: its client port can be listened on again
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of closed connections is fine
            s.bind(("127.0.0.1", port))
            s.listen()
