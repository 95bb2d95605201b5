"""`insession nats-cluster`: three servers up with a leader, URLs printed, a log opens on them with the
default monitoring ports (client port + 4000, checked for fsync), and Ctrl-C stops every server."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import make_event

from insession.log import LogConfig
from insession.log.jetstream import JetStreamLog


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
                            text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("JetStream cluster up"), lines
        urls = lines[2].strip().removeprefix("serve on it: insession serve --log ")
        assert urls == ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        with JetStreamLog(LogConfig(url=urls), tmp_path / "node") as log:  # monitor: port + 4000, all synced
            assert [r.offset for r in log.append([make_event(i, f"e{i}") for i in range(3)])] == [0, 1, 2]
        assert all((tmp_path / f"n{i}" / "nats.conf").read_text().count("sync_interval: always") for i in range(3))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert out.strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for port in ports:  # every server is gone: its client port can be listened on again
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of closed connections is fine
            s.bind(("127.0.0.1", port))
            s.listen()
