"""Real NATS JetStream clusters for the log tests: three nats-server processes on free loopback ports."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from insession.log import LogConfig
from insession.log.cluster import LocalCluster


def start_cluster(directory: Path) -> LocalCluster:
    """A started three-node cluster (client, route and monitoring ports all free ones)."""
    cluster = LocalCluster.on_free_ports(directory)
    cluster.start()
    return cluster


def log_config(cluster: LocalCluster, *, urls: list[str] | None = None, ack_timeout_s: float = 10.0,
               stream: str | None = None) -> LogConfig:
    """A `[log]` section for the cluster: a fresh stream unless `stream` is given."""
    return LogConfig(url=",".join(urls or cluster.urls), monitor=",".join(cluster.monitor_urls),
                     stream=stream or f"T{uuid.uuid4().hex[:12]}", ack_timeout_s=ack_timeout_s)



def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 45.0, every_s: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not seen within {timeout_s:.0f} s; last: {value!r}"
        time.sleep(every_s)
    return value
