"""The event log behind one contract (`Log`: the embedded SQLite log, or a replicated JetStream stream),
its Parquet history export, and the item catalogue. `open_log` picks the log from a `LogConfig`."""

from __future__ import annotations

from pathlib import Path

from insession.log.base import AppendResult, Log, LogConfig, LogUnavailable, OnCommit
from insession.log.catalog import Catalog
from insession.log.eventlog import LOG_FILE, EventLog


def open_log(data_dir: str | Path, config: LogConfig | None = None, *, partitions: int = 16,
             on_commit: OnCommit | None = None, follow: bool = True) -> Log:
    """The log a data directory's handle writes to: `DATA/log.sqlite` when `config.url` is empty (the
    default), else the JetStream stream at `config.url` (the export mark kept in `DATA/` for this node's own
    history, or beside the export lease in JetStream for a shared `config.history`).
    `follow=False`: other writers' events reach on_commit only after `Log.follow(offset)`."""
    config = config or LogConfig()
    if not config.url:
        return EventLog(Path(data_dir) / LOG_FILE, partitions=partitions, on_commit=on_commit)
    from insession.log.jetstream import JetStreamLog  # the NATS client is imported only when used

    return JetStreamLog(config, Path(data_dir), partitions=partitions, on_commit=on_commit, follow=follow)


__all__ = ["AppendResult", "Catalog", "EventLog", "Log", "LogConfig", "LogUnavailable", "open_log"]
