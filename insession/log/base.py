"""The event log's contract (`Log`), its configuration (`LogConfig`) and the errors every log raises.

Two implementations: `EventLog` (SQLite, one machine, the default) and `JetStreamLog` (a stream
replicated over a quorum of NATS JetStream servers). `insession.log.open_log` picks one from a
`LogConfig`; nothing outside `insession.log` knows which runs. The contract, checked for both by
tests/log/test_log_contract.py:

- `append(events)` stores a validated, enriched batch all-or-nothing and returns once it is durable
  (fsynced; on JetStream: on a quorum of servers that each fsynced it). Each event gets `ev.offset`.
  Offsets are dense, ascending from 0, in the order `read` returns them. A retried `event_id`
  is not stored again: its result is the original offset with `duplicate=True` (also inside one
  batch). The log calls `on_commit` with the newly stored events in offset order, after they are
  durable and before `append` returns: read-your-writes for whoever applies them.
- `read(from_offset, limit, upto=, partition=)` yields stored events in offset order; `partition`
  keeps those with `crc32(user_id) % partitions == partition`.
- `last_offset()` is the newest offset this handle knows to be acknowledged (-1: empty); it never waits
  on the network (health checks and metrics call it).
- `export(history_dir)` / `exported_offset()` / `tail_arrow(from_offset)`: the Parquet history and the
  tail not yet in it, exactly as `insession.log.export` lays them out. A replicated log with a shared
  `[log] history` exports only on the one node that holds the export lease (`insession.log.lease`);
  `export` elsewhere writes nothing and returns the shared mark. `write` (`export.ChunkWriter`: the
  background export of a serving process passes an analytics worker's) writes each chunk elsewhere; the
  log then only moves its mark.

- `keep_catalog(catalog)` / `upsert_items(items)`: catalogue upserts go through the log. The embedded log
  writes them to the catalogue; a replicated log stores each upsert (all-or-nothing) in the stream's
  items stream, and every node applies every node's upserts to its own catalogue in that stream's order,
  so all nodes enrich an event alike whichever node took the upsert; `upsert_items` returns once this
  node's catalogue holds it.

A replicated log also answers `cluster_state()` (`ClusterState`: its servers, the stream's leader, whether
a quorum can acknowledge writes, the newest offset of each partition), from a check it repeats in the
background, so that it never waits on the network either; `cluster_state(log)` is None for a log on one
machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import msgspec
import pyarrow as pa

from insession.schema import BatchRejected, Event, FieldError, Item

if TYPE_CHECKING:
    from insession.log.catalog import Catalog
    from insession.log.export import ChunkWriter

OnCommit = Callable[[list[Event]], None]


class AppendResult(msgspec.Struct):
    """Where one appended event is: its offset, and whether it was a retry of an already stored event."""

    offset: int
    duplicate: bool


class LogUnavailable(BatchRejected):
    """The log could not acknowledge the batch in time (on JetStream: no quorum of servers answered).

    Served as 503 by the ingest route (it is a `BatchRejected`); 507 when the log's disk is full (then
    nothing of the batch was stored). Unlike a validation error the outcome of a 503 is unknown: a batch
    sent to a stream leader that lost its quorum is stored, all of it, if that leader regains it.
    Retrying with the same `event_id`s stores each event once either way.
    """

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__([FieldError(-1, "", message)], status)

    def __str__(self) -> str:  # no record or field is at fault: the message alone
        return self.errors[0].message


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[log]`: which event log holds the events. Empty `url`: the embedded SQLite log (`DATA/log.sqlite`)."""

    url: Annotated[
        str,
        msgspec.Meta(description="NATS servers of a JetStream cluster, comma-separated "
                     "(`nats://h1:4222,nats://h2:4222,nats://h3:4222`; `--log` overrides); empty: the embedded log"),
    ] = ""
    monitor: Annotated[
        str,
        msgspec.Meta(description="each server's monitoring endpoint, comma-separated, checked for "
                     "`sync_interval: always` (`/varz`); empty: the url's hosts with port + 4000 (4222 -> 8222)"),
    ] = ""
    allow_unsynced: Annotated[
        bool,
        msgspec.Meta(description="accept servers that do not fsync every write (acknowledged events can be lost "
                     "on a power loss); refused otherwise"),
    ] = False
    stream: Annotated[str, msgspec.Meta(description="JetStream stream name", pattern=r"^[A-Za-z0-9_-]+$")] = (
        "INSESSION")
    replicas: Annotated[int, msgspec.Meta(description="replicas of a stream this server creates", ge=1, le=5)] = 3
    history: Annotated[
        str,
        msgspec.Meta(description="the Parquet history's directory, or an object-store URI (`s3://bucket/prefix"
                     "?region=...`, any pyarrow.fs URI; credentials from the environment); with a JetStream `url`, "
                     "shared by every node (one exports at a time, under a lease: docs/cluster.md); empty: "
                     "`DATA/history`, this node's own"),
    ] = ""
    export_lease_s: Annotated[
        int,
        msgspec.Meta(description="with a shared `history`: the export lease's TTL in seconds, how long a dead "
                     "exporter holds up the export before another node takes over", ge=1),
    ] = 10
    ack_timeout_s: Annotated[
        float,
        msgspec.Meta(description="how long a write waits for a quorum (elections included) before it gets 503",
                     gt=0),
    ] = 10.0


class ServerState(msgspec.Struct, frozen=True):
    """One server of a replicated log as the last check saw it."""

    name: str  # its server name (the URL of its monitoring endpoint while it has never answered)
    monitor: str | None  # its monitoring endpoint (`[log] monitor`); None: known only as a peer of the stream
    up: bool | None  # it answered its monitoring endpoint on the last check; None: no endpoint to ask
    role: str  # "leader" or "replica" of the stream's Raft group; "" when the last check could not tell
    current: bool | None  # the stream's leader counts it caught up (the leader itself: True); None: unknown
    lag: int | None  # Raft operations it is behind the stream's leader (None: unknown)
    seen_s_ago: float | None  # since the stream's leader last heard from it (None: the leader, or unknown)


class ClusterState(msgspec.Struct, frozen=True):
    """A replicated log's last cluster check (`JetStreamLog.cluster_state()`).

    `quorum`: the stream's leader answered and counts a majority of the stream's replicas (itself
    included) current, so a write can be acknowledged now; otherwise `reason` says what is missing.
    `last_offset`: the stream's newest offset as the check saw it (on the leader, or on any replica
    that answered when no leader did); `partition_last_offsets[p]`: the newest offset of partition p
    (-1: none yet). `checked_at_ms`: wall clock of the check (0: none finished yet).
    """

    stream: str
    replicas: int
    checked_at_ms: int
    quorum: bool
    reason: str
    leader: str | None
    servers: list[ServerState]
    last_offset: int
    partition_last_offsets: list[int]


def cluster_state(log: Log) -> ClusterState | None:
    """The replicated log's last cluster check; None for a log on one machine (nothing to replicate)."""
    check = getattr(log, "cluster_state", None)
    return check() if check is not None else None


class Log(Protocol):
    """What the embedded handle, the query lane and the exporter use of an event log (see the module doc)."""

    partitions: int
    path: Path | None  # a SQLite file the analytics workers may read themselves; None: ship `tail_arrow`

    def append(self, events: list[Event]) -> list[AppendResult]: ...

    def read(self, from_offset: int = 0, limit: int | None = None, *, upto: int | None = None,
             partition: int | None = None) -> Iterator[Event]: ...

    def last_offset(self) -> int: ...

    def exported_offset(self) -> int: ...

    def export(self, history_dir: Path | str, upto_offset: int | None = None, *, min_events: int = 1,
               write: ChunkWriter | None = None) -> int: ...

    def tail_arrow(self, from_offset: int) -> pa.Table: ...

    def follow(self, from_offset: int) -> None:
        """Start passing other writers' events to on_commit from `from_offset` on (a log opened with
        `follow=False`: the owner first replays up to `from_offset - 1` itself, so no event falls between
        its replay and the follower). A no-op for a log with one writer."""
        ...

    def keep_catalog(self, catalog: Catalog) -> None:
        """The catalogue `upsert_items` writes to (a replicated log: brought up to date with the items stream
        before this returns, then kept so in the background)."""
        ...

    def upsert_items(self, items: list[Item]) -> int:
        """Store catalogue rows all-or-nothing; returns how many, once the kept catalogue holds them."""
        ...

    def wake(self) -> None:
        """Read other writers' events now rather than at the next poll: a reader waits for an offset this node
        has not applied yet. A no-op for a log with one writer."""
        ...

    def close(self) -> None: ...

