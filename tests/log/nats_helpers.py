"""Real NATS JetStream clusters for the log tests: three nats-server processes on free loopback ports."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import nats

from insession.log import LogConfig
from insession.log.cluster import LocalCluster


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


def start_cluster(directory: Path) -> LocalCluster:
    """A started three-node cluster (client, route and monitoring ports all free ones)."""
    ports = free_ports(9)
    cluster = LocalCluster(directory, ports[:3], cluster_ports=ports[3:6], http_ports=ports[6:])
    cluster.start()
    return cluster


def log_config(cluster: LocalCluster, *, urls: list[str] | None = None, ack_timeout_s: float = 10.0,
               stream: str | None = None) -> LogConfig:
    """A `[log]` section for the cluster: a fresh stream unless `stream` is given."""
    return LogConfig(url=",".join(urls or cluster.urls), monitor=",".join(cluster.monitor_urls),
                     stream=stream or f"T{uuid.uuid4().hex[:12]}", ack_timeout_s=ack_timeout_s)


def stream_leader(cluster: LocalCluster, stream: str) -> str:
    """The name of the server leading `stream` now (asked over NATS, any server of the cluster)."""

    async def ask() -> str:
        nc = await nats.connect(servers=cluster.urls)
        try:
            return (await nc.jetstream().stream_info(stream)).cluster.leader
        finally:
            await nc.close()

    return asyncio.run(ask())
