"""The replicated event log: one NATS JetStream stream over a quorum of servers (see docs/cluster.md).

Stream: `[log] stream` (INSESSION), subjects `<stream lower-cased>.events.<p>` with p = crc32(user_id) % P
(the embedded log's rule; P is kept in the stream's metadata and checked on open), file storage,
`[log] replicas` (3) copies, `allow_atomic` (all-or-nothing batches), `allow_direct` (any replica answers
reads, so reads go on without a quorum), a duplicate window of `DUPLICATE_WINDOW_S` (10 minutes, longer
than any client's retries). Created when missing; an existing stream is used as it is after its
partition count and flags are checked.

Durability (decision): a publish is acknowledged once the stream's Raft group has it on a quorum; that
means fsynced only with `jetstream { sync_interval: always }` on the servers (the default fsyncs every 2
minutes, and a simultaneous power loss then loses acknowledged writes). Opening checks every server's
`/varz` (`jetstream.config.sync_always`) and refuses an unsynced server, or a majority it cannot check,
unless `allow_unsynced` says durability is not wanted.

Offsets (decision): `offset = stream sequence - 1`. Sequences start at 1 and are dense here (nothing is
deleted; a duplicate or an abandoned batch takes no sequence), so offsets are dense from 0 like the
embedded log's and every reader of the log is unchanged.

Writes: each event is one message (msgpack `Event`, as enriched by the caller) with `Nats-Msg-Id` =
its `event_id` percent-encoded (`message_id`: headers are CRLF-framed text that clients trim, so the id
itself would make " x" and "x" one event, or a line break a header of its own), or a random id for one
without (so that retries of this call stay idempotent), so a retry
is stored once whichever server it reaches, within the duplicate window. A batch of 2..1000 is one
atomic batch publish (ADR-50, `Nats-Batch-Id/-Sequence/-Commit`): the stream stores all of it or none.
The server refuses a whole atomic batch that contains a known message id (err 10201); the log then asks
for each id with a publish that cannot be stored (`Nats-Expected-Last-Sequence` far beyond the end: a
known id answers `duplicate` with its original sequence, an unknown one fails the expectation), drops
the known ones and publishes the rest atomically. A timeout, a lost connection or an election is
retried (same ids: idempotent) until `ack_timeout_s`; then `LogUnavailable` (503): the quorum is lost
and the outcome unknown (a leader that regains its quorum stores the batch, all of it).

Reads: batch direct gets (`$JS.API.DIRECT.GET`, 1,000 messages a request), per partition with
`next_by_subj`. `on_commit` gets every event stored after the handle opened, in sequence order, one
call at a time, and an append returns after its events went through it (read-your-writes): an append
whose events directly follow the last delivered ones hands them over from memory (one writer: nothing is
read back); a follower thread reads the rest (other writers' events, and an append's own when others
came between) from the stream. `last_offset()` is the newest offset this handle has seen acknowledged or
delivered, kept locally: it never waits on the network.

Cluster state (decision): a watcher thread checks the cluster every `CHECK_EVERY_S` and keeps the
result for `cluster_state()`, which metrics, /readyz and the console read without waiting on the
network. A check asks the stream's leader for the stream info (its Raft peers: current, lag, last
seen), any replica for the newest message of each partition subject (a batch direct get with
`multi_last`, answered without a leader), and each server's monitoring endpoint (`/varz`) whether it is
up. The quorum holds when the leader answered within `CHECK_TIMEOUT_S` and counts a majority of the
replicas (itself included) current. A leader is not enough: one whose peers are all down stays leader
with every peer `current: false`, and any write it proposes waits for a majority that is not there.

History: `export` writes the stream to the same day-partitioned Parquet as the embedded log. Without
`[log] history` each node keeps its own (`DATA/history`), with its mark in the file
`<state_dir>/<stream>.exported` (fsynced). With it (decision), the nodes share one history directory and
one exports at a time: the holder of the export lease (`insession.log.lease`, a JetStream key-value
bucket with a TTL), whose mark lives beside the lease, where every node reads it; a node that takes the
lease first makes the history what its manifest and the mark say (`verify_history`: removes a dead
holder's parts beyond the mark), then continues from the mark, so no event is written twice or skipped.
The history may be an object store (`s3://...`, `insession.log.export.HistoryStore`).

Readers that are not nodes (`insession train --log`) use `StreamReader`: read-only, it creates no stream
and takes no lease; it reads the export mark, the stream's end from its leader (every acknowledged event
is at or below it) and the events after the mark, and refuses without a quorum.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
import pyarrow as pa
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from insession.log.base import AppendResult, ClusterState, LogConfig, LogUnavailable, OnCommit, ServerState
from insession.log.export import (
    ChunkWriter,
    events_to_arrow,
    history_end,
    history_location,
    redacted,
    remove_orphans,
    verify_history,
    writer_here,
)
from insession.log.lease import MARK_KEY, ExportLease, LeaseLost, asked_again, forming
from insession.schema import BatchRejected, Event, FieldError, Item, partition_of

if TYPE_CHECKING:
    from insession.log.catalog import Catalog

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # JetStream's atomic batch limit (jetstream.limits.batch.max_msgs)
ITEMS_PER_MESSAGE = 1000  # catalogue rows per message of the items stream (~100 KB, under max_payload's 1 MB)
ITEMS_PAGE = 16  # items-stream messages per direct get
DUPLICATE_WINDOW_S = 600.0
READ_PAGE = 1000  # messages per batch direct get
EXPORT_CHUNK = 200_000
FOLLOW_IDLE_S = 0.05  # the follower's poll interval when the stream has nothing new
ITEMS_IDLE_S = 0.5  # ... the catalogue follower's (an upsert through this node wakes it at once)
FOLLOW_BEHIND_S = 0.001  # ... and when a write is acknowledged but the replica that answered has not applied it
ATTEMPT_TIMEOUT_S = 2.0  # one publish attempt; attempts repeat until ack_timeout_s
PARTITIONS_KEY = "insession_partitions"
_ERR_DUPLICATE_IN_BATCH = 10201
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_BATCH_INCOMPLETE = 10176
_ERR_DUPLICATE_IN_PROCESS = 10158  # our earlier attempt with this id is still being proposed: outcome pending
INCOMPLETE_TRIES = 3  # an atomic batch incomplete this often has a message the stream refuses: an error
_IMPOSSIBLE_SEQ = str(2**62)
CHECK_EVERY_S = 1.0  # the cluster watcher's period
CHECK_TIMEOUT_S = 1.0  # how long one check waits for the stream's leader, a replica, a monitoring endpoint

T = TypeVar("T")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)
_items_decoder = msgspec.msgpack.Decoder(list[Item])
_acks = msgspec.json.Decoder(dict[str, Any])


class JetStreamError(RuntimeError):
    """The JetStream log cannot be opened as configured (unsynced servers, another stream layout, unreachable)."""


class _Retry(Exception):
    """One attempt failed in a way the next may not (timeout, election, lost connection)."""


class _Incomplete(_Retry):
    """The server did not store every message of an atomic batch (err 10176): one was lost on the way
    (an election, a reconnect) or refused on its own (e.g. over the stream's max_msg_size)."""


class _NoQuorum(Exception):
    """The stream's leader answered but counts no majority current: asked again until the reader's timeout."""


class _KnownIds(Exception):
    """The server refused an atomic batch because it holds one of its message ids (err 10201)."""


def _hpub_frames(msgs: list[tuple[str, bytes, str]], batch_id: str) -> bytes:
    """The protocol frames (`HPUB subject hdr_len total_len`) of an atomic batch's messages before its commit,
    numbered from 1, in one buffer for the client's write queue. Built here rather than by 999 calls of
    nats-py's `publish` (6 us each, its header checks and a flush future per message, against 1 us): every
    part is known to be plain header text (the subject ours, the batch id hex, message ids `message_id`'s)."""
    frames = []
    for i, (subject, body, mid) in enumerate(msgs, 1):
        hdr = b"NATS/1.0\r\nNats-Batch-Id: %b\r\nNats-Batch-Sequence: %d\r\nNats-Msg-Id: %b\r\n\r\n" % (
            batch_id.encode(), i, mid.encode())
        frames.append(b"HPUB %b %d %d\r\n%b%b\r\n" % (subject.encode(), len(hdr), len(hdr) + len(body), hdr, body))
    return b"".join(frames)


_MSG_ID_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")  # printable ASCII but space and %


def message_id(event_id: str) -> str:
    """The `Nats-Msg-Id` of an event id: percent-encoded, so it is printable ASCII without spaces (nothing a
    header's framing or the client's trimming can change) and distinct ids stay distinct (`%` is encoded
    too). Ids of letters, digits and punctuation other than `%` are sent as they are."""
    return quote(event_id, safe=_MSG_ID_SAFE)


def counts_quorum(info: Any) -> tuple[bool, int, int]:
    """(quorum, current, needed) from a stream's info as its leader answered it: the leader plus the replicas
    it counts current and not offline, against a majority of the stream's replicas. A stream without Raft
    (one server) always has its quorum. NATS keeps a replica it stopped hearing from current for its
    lost-quorum interval (seconds), so a leader whose followers just died still counts them for that long."""
    cluster = info.cluster
    replicas = int(info.config.num_replicas or 1)
    needed = replicas // 2 + 1
    if cluster is None:
        return True, 1, needed
    leader = cluster.leader or None
    current = (1 if leader else 0) + sum(1 for p in cluster.replicas or [] if p.current and not p.offline)
    return leader is not None and current >= needed, current, needed


def monitor_urls(config: LogConfig) -> list[str]:
    """The monitoring endpoints to check: `[log] monitor`, else each url's host with port + 4000."""
    if config.monitor:
        return [u.strip().rstrip("/") for u in config.monitor.split(",") if u.strip()]
    out = []
    for url in server_urls(config):
        parts = urlsplit(url)
        out.append(f"http://{parts.hostname}:{(parts.port or 4222) + 4000}")
    return out


NATS_SCHEMES = ("nats", "tls")


def server_urls(config: LogConfig) -> list[str]:
    """The `[log] url` list, each with a scheme (`host:port` alone means `nats://host:port`). Raises
    JetStreamError naming the entry when one is not a NATS server URL (a bad config refuses to start)."""
    urls = [u if "://" in u else f"nats://{u}" for u in (x.strip() for x in config.url.split(",")) if u]
    for url in urls:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
        except ValueError:
            bad = True
        else:
            bad = parts.scheme not in NATS_SCHEMES or not parts.hostname or parts.path not in ("", "/")
        if bad:
            raise JetStreamError(f"[log] url / --log: {url!r} is not a NATS server URL; write "
                                 "nats://host:4222, comma-separated for several servers (docs/cluster.md)")
    return urls


async def direct_get(nc: Any, stream: str, req: dict[str, Any], on_msg: Callable[[Any], None]) -> dict[str, str]:
    """One batch direct get (`$JS.API.DIRECT.GET`, answered by any replica): `on_msg` gets each message,
    in order; returns the end marker's headers (status 204: `Nats-Last-Sequence`, `Nats-UpTo-Sequence`),
    or {} when nothing matched (404). A callback, not next_msg(): no timer per message."""
    done: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def collect(msg: Any) -> None:
        if done.done():
            return
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            try:
                on_msg(msg)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)
        elif status == "204":  # end of batch
            done.set_result(headers)
        elif status == "404":  # nothing matched
            done.set_result({})
        else:
            done.set_exception(_Retry(f"direct get answered {status} {headers.get('Description', '')}"))

    sub = await nc.subscribe(nc.new_inbox(), cb=collect)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(req).encode(), reply=sub.subject)
        return await asyncio.wait_for(done, ATTEMPT_TIMEOUT_S)
    except TimeoutError as e:
        raise _Retry("no replica answered a read in time") from e
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def get_batch(nc: Any, stream: str, seq: int, n: int, subject: str | None) -> list[Event]:
    """Up to n stored events from sequence `seq` (of one subject), from whichever replica answers.

    A whole-stream read asks for the bodies only (`no_hdr`: nats-py parses headers in Python, most of
    a read's cost): the stream is dense, so the i-th message has sequence seq + i, which the batch's
    end marker confirms (its Nats-Last-Sequence). One partition's messages are not adjacent: they
    come with their headers and each one's Nats-Sequence.
    """
    req: dict[str, Any] = {"seq": seq, "batch": n}
    if subject is None:
        req["no_hdr"] = True
    else:
        req["next_by_subj"] = subject
    out: list[Event] = []

    def on_msg(msg: Any) -> None:
        ev = _decoder.decode(msg.data)
        ev.offset = seq + len(out) - 1 if subject is None else int(msg.headers["Nats-Sequence"]) - 1
        out.append(ev)

    end = int((await direct_get(nc, stream, req, on_msg)).get("Nats-Last-Sequence", -1))
    if out and subject is None and end != out[-1].offset + 1:
        raise RuntimeError(f"stream {stream} has a gap: {len(out)} messages from sequence {seq} end at {end}; "
                           "something deleted messages from it (insession never does)")
    return out


def stop_client_loop(loop: asyncio.AbstractEventLoop, io: threading.Thread, nc: Any) -> None:
    """Close the connection `nc` (None: never opened), cancel what is left on its loop (the client's own
    tasks), stop the loop's thread `io` and close the loop."""

    async def finish() -> None:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(finish(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    io.join()
    loop.close()


def check_synced(monitors: list[str], timeout_s: float = 2.0) -> list[str]:
    """Raise JetStreamError unless every server that answers fsyncs each write and a majority answer;
    returns the endpoints that did not answer (a down server cannot be checked; it is named in the log)."""
    unsynced, unreachable = [], []
    for url in monitors:
        try:
            with urllib.request.urlopen(f"{url}/varz", timeout=timeout_s) as r:
                varz = json.load(r)
        except (OSError, ValueError):
            unreachable.append(url)
            continue
        js = (varz.get("jetstream") or {}).get("config") or {}
        if not js.get("sync_always"):
            every = js.get("sync_interval")
            unsynced.append(f"{varz.get('server_name', url)} at {url} (sync_interval "
                            f"{every / 1e9 if isinstance(every, int | float) else '?'} s)")
    if unsynced:
        raise JetStreamError(
            f"JetStream servers that do not fsync every write: {', '.join(unsynced)}; an acknowledged event could be "
            "lost on a power loss. Set `jetstream { sync_interval: always }` on every server (docs/cluster.md), or "
            "accept the risk with [log] allow_unsynced = true."
        )
    if len(unreachable) * 2 >= len(monitors):
        raise JetStreamError(
            f"cannot check that the JetStream servers fsync every write: no answer from {', '.join(unreachable)} "
            "(/varz). Give each server's monitoring endpoint in [log] monitor (nats-server `http: host:port`), or "
            "set [log] allow_unsynced = true."
        )
    return unreachable


class JetStreamLog:
    """The event log on a replicated JetStream stream; thread-safe; see the module doc for the contract."""

    path: Path | None = None  # nothing local for the analytics workers to read: they get `tail_arrow`

    def __init__(self, config: LogConfig, state_dir: Path, partitions: int = 16,
                 on_commit: OnCommit | None = None, follow: bool = True) -> None:
        self.config = config
        self.partitions = partitions
        self.stream = config.stream
        self._prefix = f"{config.stream.lower()}.events"
        self._urls = server_urls(config)
        if not self._urls:
            raise JetStreamError("[log] url names no NATS server")
        self._monitors = monitor_urls(config)
        self._server_names: dict[str, str] = {}  # monitoring endpoint -> server_name, once it answered
        if config.allow_unsynced:
            log.warning("JetStream log with allow_unsynced: servers are not checked for an fsync before each ack")
        else:
            for url in check_synced(self._monitors):
                log.warning("JetStream server monitor %s did not answer; its fsync setting is unchecked", url)
        self._on_commit = on_commit
        self._state_dir = Path(state_dir)
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._mark_path = self._state_dir / f"{self.stream}.exported"
        self._exported = int(self._mark_path.read_text()) if self._mark_path.exists() else -1
        self._export_lock = threading.Lock()
        self._lease: ExportLease | None = None  # with a shared [log] history: who exports, and the mark
        self._checked: int | None = None  # the holding (lease takeover count; own history: 0) whose history
        #                                   was last checked for a failed export's leftovers
        self._cond = threading.Condition()  # guards _last, _delivered, _closed; notified on delivery
        self._kick = threading.Event()
        self._delivering = False  # one on_commit call at a time: an append's own events, or the follower's page
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self._loop.run_forever, name="insession-nats", daemon=True)
        self._io.start()
        self._nc: Any = None
        self._items_stream = f"{self.stream}_ITEMS"  # catalogue upserts, in one order for every node
        self._items_subject = f"{config.stream.lower()}.items"
        self._catalog: Catalog | None = None
        self._items_kick = threading.Event()
        self._items_follower = threading.Thread(target=self._follow_items, name="insession-items-follower",
                                                daemon=True)
        try:
            self._nc = self._run(self._connect(), config.ack_timeout_s + 5)
            last_seq = self._run(self._ensure_stream(), config.ack_timeout_s + 5)
        except BaseException:
            self._shutdown_loop()
            raise
        if config.history:
            try:
                self._lease = ExportLease(self._nc, self._run, stream=self.stream, replicas=config.replicas,
                                          ttl_s=config.export_lease_s, timeout_s=config.ack_timeout_s,
                                          node=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
            except BaseException:
                self._shutdown_loop()
                raise
        self._last = last_seq - 1
        self._delivered = self._last  # on_commit gets what is stored after this handle opened
        self._cluster = ClusterState(self.stream, config.replicas, 0, False, "not checked yet", None, [],
                                     self._last, [-1] * partitions)
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="insession-log-watcher", daemon=True)
        self._watcher.start()
        self._follower = threading.Thread(target=self._follow, name="insession-log-follower", daemon=True)
        if follow:
            self._follower.start()

    def follow(self, from_offset: int) -> None:
        """Start the follower at `from_offset` (the owner replayed everything before it): without this, an
        event another node stored between this handle's open and the owner's replay could be delivered
        first, and the replay would then skip the events before it."""
        with self._cond:
            self._delivered = from_offset - 1
            self._last = max(self._last, from_offset - 1)
        self._follower.start()

    # -- the event loop thread ----------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run a coroutine on the client's loop from any thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _connect(self) -> Any:
        async def on_error(e: Exception) -> None:
            log.warning("NATS connection: %s", e)

        try:
            return await asyncio.wait_for(
                # a server that stops answering (a partition, not a crash) is left after 3 missed 2 s pings
                nats.connect(servers=self._urls, connect_timeout=2, reconnect_time_wait=0.25,
                             max_reconnect_attempts=-1, ping_interval=2, max_outstanding_pings=3,
                             error_cb=on_error, name="insession"),
                self.config.ack_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            raise JetStreamError(f"no NATS server of {', '.join(self._urls)} answered within "
                                 f"{self.config.ack_timeout_s:.0f} s ({e!r}); start them (insession nats-cluster) "
                                 "or fix [log] url / --log") from e

    async def _ensure_stream(self) -> int:
        """Create the stream and its items stream if missing; check an existing one; return its last
        sequence. A cluster still electing its leaders (JetStream answers 503 "temporarily unavailable") or
        still learning that a server is back (400 "no suitable peers for placement": seen right after a
        cluster formed) is asked again until `ack_timeout_s`, so a node can start together with its servers."""
        async def both() -> int:
            last_seq = await self._open_stream()
            await self._open_items_stream()
            return last_seq

        try:
            return await asked_again(both, self.config.ack_timeout_s)
        except Exception as e:
            if not forming(e):
                raise
            raise JetStreamError(f"JetStream did not serve stream {self.stream} within "
                                 f"{self.config.ack_timeout_s:.0f} s ({e}): is a majority of its servers "
                                 "up? (insession nats-cluster, or the servers of [log] url)") from e

    async def _open_stream(self) -> int:
        js = self._nc.jetstream()
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            cfg = StreamConfig(
                name=self.stream, subjects=[f"{self._prefix}.*"], num_replicas=self.config.replicas,
                storage=StorageType.FILE, retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                duplicate_window=DUPLICATE_WINDOW_S, allow_atomic=True, allow_direct=True,
                metadata={PARTITIONS_KEY: str(self.partitions)},
            )
            info = await js.add_stream(cfg)  # the same config from two nodes at once: both succeed
        cfg = info.config
        held = (cfg.metadata or {}).get(PARTITIONS_KEY)
        if held != str(self.partitions):
            raise JetStreamError(f"stream {self.stream} holds {held} partitions, not {self.partitions}: use "
                                 f"[features] partitions = {held}, or another [log] stream")
        if not (cfg.allow_atomic and cfg.allow_direct) or cfg.subjects != [f"{self._prefix}.*"]:
            raise JetStreamError(f"stream {self.stream} exists with another layout (subjects {cfg.subjects}, "
                                 f"allow_atomic {cfg.allow_atomic}, allow_direct {cfg.allow_direct}); it was not "
                                 "created by insession: choose another [log] stream")
        return int(info.state.last_seq)

    # -- writes -------------------------------------------------------------------------------------

    def subject(self, partition: int) -> str:
        """The subject of one partition's events."""
        return f"{self._prefix}.{partition}"

    def append(self, events: list[Event]) -> list[AppendResult]:
        """Store a batch on a quorum, all-or-nothing; returns once on_commit has seen it. Sets `ev.offset`.

        Raises BatchRejected (413) for more than 1000 events (one atomic batch), LogUnavailable (503) when
        no quorum acknowledged within `ack_timeout_s`.
        """
        if not events:
            return []
        if len(events) > MAX_BATCH:
            raise BatchRejected([FieldError(-1, "", f"batch of {len(events)} events exceeds {MAX_BATCH}, the most "
                                            "the replicated log stores all-or-nothing; split it")], 413)
        with self._cond:
            if self._closed:
                raise RuntimeError("the event log is closed")
        first: dict[str, int] = {}  # event_id -> index of its first occurrence in this batch
        unique: list[int] = []
        msgs: list[tuple[str, bytes, str]] = []
        for i, ev in enumerate(events):
            eid = ev.event_id
            if eid is not None:
                if eid in first:
                    continue
                first[eid] = i
            unique.append(i)
            msgs.append((self.subject(partition_of(ev.user_id, self.partitions)), _encoder.encode(ev),
                         message_id(eid) if eid is not None else f"insession-{uuid.uuid4().hex}"))
        stored = self._run(self._store(msgs), self.config.ack_timeout_s + 2 * ATTEMPT_TIMEOUT_S)
        results: list[AppendResult | None] = [None] * len(events)
        for i, res in zip(unique, stored, strict=True):
            results[i] = res
        for i, ev in enumerate(events):
            res = results[i]
            if res is None:  # a repeat inside this batch: the first occurrence's offset
                res = results[i] = AppendResult(results[first[ev.event_id]].offset, True)  # type: ignore[index, union-attr]
            ev.offset = res.offset
        new = [(events[i], r.offset) for i, r in zip(unique, stored, strict=True) if not r.duplicate]
        self._deliver_own([ev for ev, _ in new], [off for _, off in new], max(r.offset for r in stored))
        return results  # type: ignore[return-value]

    async def _store(self, msgs: list[tuple[str, bytes, str]]) -> list[AppendResult]:
        """Publish until every message is stored or known; retries are idempotent by message id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ack_timeout_s
        out: list[AppendResult | None] = [None] * len(msgs)
        maybe_ours: set[int] = set()  # sent in an attempt whose outcome is unknown
        pending = list(range(len(msgs)))
        last_error = "no attempt"
        incomplete = 0
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                raise LogUnavailable(
                    f"the replicated log lost its quorum: no majority of the JetStream servers acknowledged the batch "
                    f"within {self.config.ack_timeout_s:.0f} s ({last_error}). Nothing of it is acknowledged; it may "
                    "still be stored, all of it, when the quorum returns: retry with the same event_ids."
                )
            timeout = min(ATTEMPT_TIMEOUT_S, left)
            batch = [msgs[k] for k in pending]
            try:
                if len(batch) == 1:
                    seq, dup = await self._publish_one(batch[0], timeout)
                    out[pending[0]] = AppendResult(seq - 1, dup and pending[0] not in maybe_ours)
                else:
                    last = await self._publish_atomic(batch, timeout)
                    for j, k in enumerate(pending):
                        out[k] = AppendResult(last - len(batch) + j, False)  # offsets = sequences - 1
                pending = []
            except _KnownIds:
                known = await asyncio.gather(*(self._probe(msgs[k], timeout) for k in pending))
                for k, seq in zip(pending, known, strict=True):
                    if seq is not None:
                        out[k] = AppendResult(seq - 1, k not in maybe_ours)
                pending = [k for k in pending if out[k] is None]
            except _Retry as e:
                if isinstance(e, _Incomplete):
                    incomplete += 1
                    if incomplete >= INCOMPLETE_TRIES:
                        raise RuntimeError(f"JetStream stream {self.stream} stored none of a batch of {len(pending)}: "
                                           f"{e} {incomplete} times; a message is refused on its own (over the "
                                           "stream's max_msg_size?)") from e
                last_error = str(e)
                maybe_ours.update(pending)
                await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))
        return out  # type: ignore[return-value]

    async def _request(self, subject: str, body: bytes, headers: dict[str, str], timeout: float) -> dict[str, Any]:
        try:
            reply = await self._nc.request(subject, body, headers=headers, timeout=timeout)
        except nats.errors.NoRespondersError as e:
            raise _Retry("no stream leader answered (an election?)") from e
        except (TimeoutError, nats.errors.TimeoutError) as e:
            raise _Retry(f"no acknowledgement within {timeout:.1f} s") from e
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, OSError) as e:
            raise _Retry(f"connection: {e!r}") from e
        return _acks.decode(reply.data) if reply.data else {}

    def _check(self, ack: dict[str, Any]) -> dict[str, Any]:
        err = ack.get("error")
        if err is None:
            return ack
        code, text = err.get("err_code"), err.get("description", "")
        if code == _ERR_DUPLICATE_IN_BATCH:
            raise _KnownIds()
        if code == _ERR_BATCH_INCOMPLETE:
            raise _Incomplete(f"JetStream: {text} ({code})")
        if code == _ERR_DUPLICATE_IN_PROCESS or err.get("code") == 503 or "batch" in text:
            # pending, unavailable, or a batch cut by an election: resend it (idempotent) until the deadline
            raise _Retry(f"JetStream: {text} ({code})")
        raise RuntimeError(f"JetStream stream {self.stream} refused the events: {text} (error {code})")

    async def _publish_one(self, msg: tuple[str, bytes, str], timeout: float) -> tuple[int, bool]:
        subject, body, mid = msg
        ack = self._check(await self._request(subject, body, {"Nats-Msg-Id": mid}, timeout))
        return int(ack["seq"]), bool(ack.get("duplicate"))

    async def _publish_atomic(self, batch: list[tuple[str, bytes, str]], timeout: float) -> int:
        """One atomic batch: all but the last message fire-and-forget, the last commits and is acknowledged
        with the batch's last sequence (its messages have the sequences just before it, in order)."""
        bid = uuid.uuid4().hex
        n = len(batch)
        nc = self._nc
        if nc.is_closed or not nc.is_connected:
            raise _Retry("connection: not connected")
        try:
            await nc._send_command(_hpub_frames(batch[:-1], bid))  # what publish() does, once for all of them
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, OSError) as e:
            raise _Retry(f"connection: {e!r}") from e
        subject, body, mid = batch[-1]
        headers = {"Nats-Batch-Id": bid, "Nats-Batch-Sequence": str(n), "Nats-Batch-Commit": "1", "Nats-Msg-Id": mid}
        ack = self._check(await self._request(subject, body, headers, timeout))
        if ack.get("count") != n:
            raise RuntimeError(f"JetStream committed {ack.get('count')} of a batch of {n}: {ack}")
        return int(ack["seq"])

    async def _probe(self, msg: tuple[str, bytes, str], timeout: float) -> int | None:
        """The sequence of an already stored message id, or None; stores nothing (the expectation fails)."""
        subject, _, mid = msg
        ack = await self._request(subject, b"", {"Nats-Msg-Id": mid, "Nats-Expected-Last-Sequence": _IMPOSSIBLE_SEQ},
                                  timeout)
        if ack.get("duplicate"):
            return int(ack["seq"])
        if (ack.get("error") or {}).get("err_code") == _ERR_WRONG_LAST_SEQUENCE:
            return None
        self._check(ack)
        raise RuntimeError(f"JetStream answered a message-id probe unexpectedly: {ack}")

    def _deliver_own(self, new: list[Event], offsets: list[int], upto: int) -> None:
        """Pass this append's stored events to on_commit in offset order, then return (read-your-writes).

        When everything before them is delivered, they go to on_commit from memory (no read-back: the
        common case of one writer); else the follower delivers the events of other writers in between,
        and these with them if it reads them first. One delivery at a time (`_delivering`), in offset order.
        """
        own = bool(new) and offsets == list(range(offsets[0], upto + 1))  # contiguous, and the newest of the batch
        deadline = time.monotonic() + self.config.ack_timeout_s
        with self._cond:
            self._last = max(self._last, upto)
            while self._delivered < upto and not self._closed:
                if own and not self._delivering and self._delivered == offsets[0] - 1:
                    self._delivering = True
                    break
                self._kick.set()  # events of other writers come first: the follower reads them
                if not self._cond.wait(deadline - time.monotonic()) and time.monotonic() >= deadline:
                    raise LogUnavailable(
                        f"the batch is stored (up to offset {upto}) but the events before it were not served back to "
                        f"this node within {self.config.ack_timeout_s:.0f} s; a retry with the same event_ids "
                        "returns its offsets")
            else:
                return
        self._hand_over(new, offsets[-1])

    def _hand_over(self, events: list[Event], upto: int) -> None:
        """Call on_commit (this thread holds `_delivering`), then mark `upto` delivered and wake the waiters."""
        try:
            if self._on_commit is not None:
                self._on_commit(events)
        except Exception:  # the events are durable; a failing subscriber must not stop the log
            log.exception("on_commit failed for offsets %d..%d", events[0].offset, upto)
        finally:
            with self._cond:
                self._delivered = upto
                self._last = max(self._last, upto)
                self._delivering = False
                self._cond.notify_all()

    # -- reads --------------------------------------------------------------------------------------

    async def _direct_get(self, req: dict[str, Any], on_msg: Callable[[Any], None]) -> dict[str, str]:
        return await direct_get(self._nc, self.stream, req, on_msg)

    async def _get_batch(self, seq: int, n: int, subject: str | None) -> list[Event]:
        return await get_batch(self._nc, self.stream, seq, n, subject)

    async def _partition_ends(self) -> tuple[list[int], int]:
        """The newest sequence of each partition (0: none) and the stream's, as the replica that answers has them."""
        ends = [0] * self.partitions
        first = len(self._prefix) + 1

        def on_msg(msg: Any) -> None:
            p = int(msg.headers["Nats-Subject"][first:])
            if 0 <= p < self.partitions:
                ends[p] = int(msg.headers["Nats-Sequence"])

        end = await self._direct_get({"multi_last": [f"{self._prefix}.*"], "batch": self.partitions}, on_msg)
        return ends, int(end.get("Nats-UpTo-Sequence", max(ends)))

    def read(self, from_offset: int = 0, limit: int | None = None, *, upto: int | None = None,
             partition: int | None = None) -> Iterator[Event]:
        """Stored events in offset order with from_offset <= offset (<= upto), at most `limit`; with
        `partition`, that partition's only. Reads at least up to the last offset known when called: a
        replica that has not caught up yet is asked again until `ack_timeout_s`."""
        start = max(from_offset, 0)
        end = self.last_offset() if upto is None else min(upto, self.last_offset())
        subject = None if partition is None else self.subject(partition)
        left = limit
        give_up = time.monotonic() + self.config.ack_timeout_s
        while left is None or left > 0:
            n = READ_PAGE if left is None else min(READ_PAGE, left)
            try:
                page = self._run(self._get_batch(start + 1, n, subject), ATTEMPT_TIMEOUT_S * 2)
            except _Retry as e:
                page, reason = [], str(e)
            else:
                reason = "a replica has not caught up"
            page = [ev for ev in page if upto is None or ev.offset <= upto]
            yield from page
            if page:
                start = page[-1].offset + 1
                if left is not None:
                    left -= len(page)
            if len(page) == n:
                continue
            if partition is not None or start > end:
                return  # one partition's end cannot be told from the stream's: what the replica has
            if time.monotonic() > give_up:
                raise LogUnavailable(f"reading the replicated log stopped at offset {start - 1} of {end}: {reason}")
            time.sleep(FOLLOW_IDLE_S)

    def _follow(self) -> None:
        """The follower: pass every new event to on_commit in sequence order; never dies."""
        failures = 0
        while True:
            with self._cond:
                if self._closed:
                    return
                nxt = self._delivered + 1
            try:
                page = self._run(self._get_batch(nxt + 1, READ_PAGE, None), ATTEMPT_TIMEOUT_S * 2)
                failures = 0
            except Exception as e:  # noqa: BLE001 - lost connection, no replica: try again, slower
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("the log follower cannot read from offset %d (%d failures): %r", nxt, failures, e)
                self._kick.wait(min(1.0, FOLLOW_IDLE_S * failures))
                continue
            if not page:
                with self._cond:
                    behind = self._last >= nxt  # acknowledged but not served yet: the replica that answered lags
                if behind:
                    time.sleep(FOLLOW_BEHIND_S)
                else:
                    self._kick.wait(FOLLOW_IDLE_S)
                    self._kick.clear()
                continue
            with self._cond:
                self._cond.wait_for(lambda: not self._delivering)
                page = [ev for ev in page if ev.offset > self._delivered]  # an append delivered its own meanwhile
                if not page or page[0].offset != self._delivered + 1:
                    continue
                self._delivering = True
            self._hand_over(page, page[-1].offset)

    # -- the catalogue ------------------------------------------------------------------------------

    async def _open_items_stream(self) -> None:
        """Create the items stream if missing (the events stream's replicas, file storage, atomic batches)."""
        js = self._nc.jetstream()
        try:
            await js.stream_info(self._items_stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(
                name=self._items_stream, subjects=[self._items_subject], num_replicas=self.config.replicas,
                storage=StorageType.FILE, retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                duplicate_window=DUPLICATE_WINDOW_S, allow_atomic=True, allow_direct=True))

    def keep_catalog(self, catalog: Catalog) -> None:
        """Apply the items stream to `catalog` from the message it holds on (every node's upserts, in the
        stream's order): all of it before this returns, then in the background. A replica that cannot answer
        yet (a stream just created, its replicas still electing: direct gets answer 503) is asked again
        until `ack_timeout_s`, then JetStreamError."""
        self._catalog = catalog
        deadline = time.monotonic() + self.config.ack_timeout_s
        while True:
            try:
                if not self._apply_items():
                    break
            except _Retry as e:
                if time.monotonic() >= deadline:
                    raise JetStreamError(f"no replica of stream {self._items_stream} served the catalogue within "
                                         f"{self.config.ack_timeout_s:.0f} s ({e}): is a majority of its servers "
                                         "up?") from e
                time.sleep(0.25)
        self._items_follower.start()

    def _apply_items(self) -> bool:
        """Apply the next page of the items stream to the catalogue; whether there was one."""
        catalog = self._catalog
        assert catalog is not None
        first = catalog.replicated_seq + 1
        pages: list[list[Item]] = []
        self._run(direct_get(self._nc, self._items_stream, {"seq": first, "batch": ITEMS_PAGE, "no_hdr": True},
                             lambda msg: pages.append(_items_decoder.decode(msg.data))), ATTEMPT_TIMEOUT_S * 2)
        for seq, items in enumerate(pages, first):  # the stream is dense: the i-th message is seq first + i
            catalog.upsert(items, seq=seq)
        return bool(pages)

    def _follow_items(self) -> None:
        """Keep the catalogue up to date with the items stream; never dies."""
        while not self._closed:
            try:
                if self._apply_items():
                    continue
            except Exception as e:  # noqa: BLE001 - lost connection, no replica: try again
                log.warning("the catalogue follower cannot read the items stream: %r", e)
            self._items_kick.wait(ITEMS_IDLE_S)
            self._items_kick.clear()

    def upsert_items(self, items: list[Item]) -> int:
        """Store catalogue rows on a quorum (one atomic batch of messages of ITEMS_PER_MESSAGE rows), then
        wait until this node's catalogue has applied them; raises LogUnavailable (503) without a quorum."""
        catalog = self._catalog
        if catalog is None:
            raise RuntimeError("upsert_items before keep_catalog: no catalogue to write to")
        chunks = [items[i : i + ITEMS_PER_MESSAGE] for i in range(0, len(items), ITEMS_PER_MESSAGE)]
        if len(chunks) > MAX_BATCH:
            raise BatchRejected([FieldError(-1, "", f"{len(items)} items exceed what one atomic batch holds "
                                            f"({MAX_BATCH * ITEMS_PER_MESSAGE}); split them")], 413)
        msgs = [(self._items_subject, _encoder.encode(chunk), f"insession-{uuid.uuid4().hex}") for chunk in chunks]
        stored = self._run(self._store(msgs), self.config.ack_timeout_s + 2 * ATTEMPT_TIMEOUT_S)
        last = max(r.offset for r in stored) + 1  # its sequence in the items stream
        deadline = time.monotonic() + self.config.ack_timeout_s
        while catalog.replicated_seq < last:
            self._items_kick.set()
            if time.monotonic() > deadline:
                raise LogUnavailable(f"the items are stored (items stream sequence {last}) but this node's catalogue "
                                     f"has not applied them within {self.config.ack_timeout_s:.0f} s; they will be")
            time.sleep(0.002)
        return len(items)

    def wake(self) -> None:
        """Have the follower read the stream now instead of after its idle poll (FOLLOW_IDLE_S): a read through
        this node waits for an offset another node acknowledged."""
        self._kick.set()

    def last_offset(self) -> int:
        """Newest offset this handle knows acknowledged (its own writes, the follower's reads); -1: empty."""
        with self._cond:
            return self._last

    # -- cluster state ------------------------------------------------------------------------------

    def cluster_state(self) -> ClusterState:
        """The last cluster check (servers, the stream's leader, quorum, partition ends); never waits."""
        with self._cond:
            return self._cluster

    def _watch(self) -> None:
        """The watcher: check the cluster every CHECK_EVERY_S until close; never dies."""
        while not self._stopping.is_set():
            try:
                state = self._check_cluster()
            except Exception as e:  # noqa: BLE001 - a check that fails says so and the next one runs
                log.exception("the cluster check failed")
                with self._cond:
                    state = msgspec.structs.replace(self._cluster, checked_at_ms=int(time.time() * 1000),
                                                    quorum=False, reason=f"the cluster check failed: {e!r}")
            with self._cond:
                self._cluster = state
            self._stopping.wait(CHECK_EVERY_S)

    def _check_cluster(self) -> ClusterState:
        """One check: the stream's leader and peers, the partitions' newest offsets, each server's endpoint."""

        def server(name: str, monitor: str | None = None, up: bool | None = None) -> dict[str, Any]:
            return {"name": name, "monitor": monitor, "up": up, "role": "", "current": None, "lag": None,
                    "seen_s_ago": None}

        servers: dict[str, dict[str, Any]] = {}
        for url in self._monitors:
            up = self._server_up(url)
            name = self._server_names.get(url, url)
            servers[name] = server(name, url, up)
        leader: str | None = None
        last_seq = 0
        replicas = self.config.replicas
        try:
            info = self._run(self._stream_info(), CHECK_TIMEOUT_S + 1)
        except Exception as e:  # noqa: BLE001 - no leader answered: that is the finding
            quorum, reason = False, (f"no leader of stream {self.stream} answered within {CHECK_TIMEOUT_S:.0f} s "
                                     f"({type(e).__name__}): writes cannot be acknowledged")
        else:
            last_seq = int(info.state.last_seq)
            cluster = info.cluster
            leader = (cluster.leader if cluster is not None else None) or None
            peers = list(cluster.replicas or []) if cluster is not None else []
            replicas = int(info.config.num_replicas or 1)
            quorum, current, needed = counts_quorum(info)
            if quorum:
                reason = ""
            elif leader is None:
                reason = f"stream {self.stream} has no leader (an election is running): writes wait for it"
            else:
                reason = (f"the leader {leader} of stream {self.stream} counts {current} of {replicas} servers "
                          f"current, {needed} are needed: writes cannot be acknowledged")
            if leader is not None:
                servers.setdefault(leader, server(leader)).update(role="leader", current=True, lag=0)
            for p in peers:
                servers.setdefault(p.name, server(p.name)).update(
                    role="replica", current=bool(p.current and not p.offline), lag=p.lag or 0,  # NATS omits a 0
                    seen_s_ago=round(p.active / 1e9, 3) if p.active is not None else None)
        try:
            ends, replica_seq = self._run(self._partition_ends(), ATTEMPT_TIMEOUT_S + 1)
            last_seq = max(last_seq, replica_seq)
        except Exception as e:  # noqa: BLE001 - no replica answered either: keep the last known ends
            log.debug("no replica answered the partition ends: %r", e)
            with self._cond:
                ends = [off + 1 for off in self._cluster.partition_last_offsets]
                last_seq = max(last_seq, self._cluster.last_offset + 1)
        return ClusterState(
            stream=self.stream, replicas=replicas, checked_at_ms=int(time.time() * 1000),
            quorum=quorum, reason=reason, leader=leader,
            servers=[ServerState(**entry) for _, entry in sorted(servers.items())],
            last_offset=last_seq - 1, partition_last_offsets=[seq - 1 for seq in ends],
        )

    async def _stream_info(self) -> Any:
        return await self._nc.jetstream(timeout=CHECK_TIMEOUT_S).stream_info(self.stream)

    def _server_up(self, monitor: str) -> bool:
        """Whether the server answers its monitoring endpoint (`/varz`, which also names it)."""
        try:
            with urllib.request.urlopen(f"{monitor}/varz", timeout=CHECK_TIMEOUT_S) as r:
                name = json.load(r).get("server_name")
        except (OSError, ValueError):
            return False
        if name:
            self._server_names[monitor] = name
        return True

    # -- history ------------------------------------------------------------------------------------

    def exported_offset(self) -> int:
        """Last offset in the Parquet history (this node's own, or the shared one's mark as last read: it
        trails the exporter's by up to a lease renewal period); -1 when nothing is exported."""
        return self._exported if self._lease is None else self._lease.mark()

    def exporting(self) -> bool:
        """Whether this node writes the history now: its own always; a shared one while it holds the lease."""
        return self._lease is None or self._lease.held()

    def export(self, history_dir: Path | str, upto_offset: int | None = None, *, min_events: int = 1,
               write: ChunkWriter | None = None) -> int:
        """Export (exported_offset, upto_offset] to Parquet by event day, as the embedded log does; returns the
        mark. With a shared history only the lease holder writes (elsewhere: the mark, nothing written);
        each chunk is committed by moving the mark, and a holder that lost the lease stops at once."""
        history_dir = history_location(history_dir)  # a Path, or an object-store URI as it is
        write = write or writer_here(lambda a, b: self.read(a, upto=b), history_dir)
        lease = self._lease
        with self._export_lock:
            if lease is not None and not lease.held():
                return lease.mark()
            exported = self.exported_offset()
            last = self.last_offset()
            upto = last if upto_offset is None else min(upto_offset, last)
            if upto - exported < max(min_events, 1):
                return exported
            holding = 0 if lease is None else lease.takeovers()
            if self._checked != holding:  # first export, after a failed one, or a new holding of the lease
                if lease is None:
                    remove_orphans(history_dir, exported)
                else:  # the shared history as the previous holder left it: its parts beyond the mark go
                    self._check_history_of_stream(history_dir)
                    verify_history(history_dir, exported, lambda first, end: self.read(first, upto=end))
                self._checked = holding
            try:
                while exported < upto:
                    end = min(upto, exported + EXPORT_CHUNK)
                    if lease is not None and not lease.held():
                        break  # its renewal failed: the lease may be another node's before the next chunk lands
                    write(exported + 1, end)
                    if lease is None:
                        self._save_mark(end)
                        self._exported = end
                    else:
                        lease.commit(end)
                    exported = end
            except LeaseLost as e:  # another node exports now; its takeover removes this chunk's parts
                log.warning("%s", e)
                self._checked = None
            except BaseException:
                self._checked = None
                raise
            return exported

    def _check_history_of_stream(self, history_dir: Path) -> None:
        """Refuse a shared history that holds offsets beyond the stream's end: another stream's (or a
        deleted and recreated stream's), whose parts `verify_history` would otherwise delete as leftovers."""
        timeout_s = self.config.ack_timeout_s
        info = self._run(self._nc.jetstream(timeout=timeout_s).stream_info(self.stream), timeout_s + 1)
        stream_end, end = int(info.state.last_seq) - 1, history_end(history_dir)
        if end > stream_end:
            raise JetStreamError(f"the shared history {redacted(history_dir)} holds events up to offset {end} but "
                                 f"stream {self.stream} ends at offset {stream_end}: it is another stream's history. "
                                 "Point [log] history at this stream's own directory, or move that one aside.")

    def _save_mark(self, offset: int) -> None:
        tmp = self._mark_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._mark_path)
        fd = os.open(self._state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def tail_arrow(self, from_offset: int) -> pa.Table:
        """Events with offset >= from_offset (call with exported_offset() + 1) as `EVENT_ARROW_SCHEMA`."""
        return events_to_arrow(list(self.read(from_offset)))

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the follower, drain the connection, stop the client's loop (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._kick.set()
        self._items_kick.set()
        self._stopping.set()
        if self._lease is not None:
            self._lease.close()
        self._watcher.join()
        if self._items_follower.ident is not None:
            self._items_follower.join()
        if self._follower.ident is not None:  # a handle opened with follow=False may never have started it
            self._follower.join()
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        stop_client_loop(self._loop, self._io, self._nc)

    def __enter__(self) -> JetStreamLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamReader:
    """A read-only client of the replicated log for tools that are not nodes (`insession train --log`).

    It creates nothing (a missing stream is an error, not a new stream), takes no export lease, starts no
    follower or watcher, and checks no server's fsync setting (it writes nothing). What it reads:

    - `shared_mark()`: the export mark of a shared `[log] history`, from the lease bucket's leader (None
      when no node ever exported into a shared history of this stream);
    - `last_offset()`: the stream's newest offset from the stream's leader, so every event acknowledged
      before the call is at or below it (an acknowledged event is on a quorum, and the leader has it);
    - `read(first, upto)` / `tail_arrow(first, upto)`: the stream's events in [first, upto] from whichever
      replica answers, asked again until `ack_timeout_s` while a lagging replica has not caught up.

    Decision: reading "every acknowledged event" needs the stream's leader counting a quorum (the rule of
    `counts_quorum`). Without one the reader fails (JetStreamError naming the servers) instead of training on
    whatever one replica holds. Bound (NATS's, not ours): a leader whose followers just died counts them
    current for NATS's lost-quorum interval and is read from meanwhile; it still holds every acknowledged
    event unless a network partition let the others elect a new leader within that interval.
    """

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.stream = config.stream
        self._urls = server_urls(config)
        if not self._urls:
            raise JetStreamError("[log] url / --log names no NATS server")
        self._timeout_s = config.ack_timeout_s
        self._loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self._loop.run_forever, name="insession-nats-reader", daemon=True)
        self._io.start()
        self._nc: Any = None
        try:
            self._nc = self._run(self._connect(), self._timeout_s + 5)
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _servers(self) -> str:
        return ", ".join(self._urls)

    async def _connect(self) -> Any:
        async def on_error(e: Exception) -> None:
            log.debug("NATS connection (reader): %s", e)

        try:
            return await asyncio.wait_for(
                nats.connect(servers=self._urls, connect_timeout=2, reconnect_time_wait=0.25,
                             max_reconnect_attempts=-1, error_cb=on_error, name="insession-reader"),
                self._timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as e:
            raise JetStreamError(f"no NATS server of {self._servers()} answered within {self._timeout_s:.0f} s "
                                 f"({type(e).__name__}); check --log / [log] url and that the servers run") from e

    async def _with_leader(self, what: str, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`call()` until it answers; a cluster without a leader (an election, a lost quorum) is asked again
        until ack_timeout_s, then JetStreamError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while True:
            try:
                return await call()
            except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    TimeoutError, _NoQuorum) as e:
                if loop.time() >= deadline:
                    raise JetStreamError(
                        f"no leader of {what} answered within {self._timeout_s:.0f} s ({type(e).__name__}"
                        f"{': ' + str(e) if isinstance(e, _NoQuorum) else ''}): reading "
                        "every acknowledged event needs a quorum, a majority of the servers "
                        f"{self._servers()} up; start them or wait for them") from e
                await asyncio.sleep(0.25)

    def shared_mark(self) -> int | None:
        """The shared history's export mark (-1: nothing exported yet); None: no lease bucket, i.e. no node
        of this stream was ever configured with a shared `[log] history`."""
        bucket = f"{self.stream}_export"
        js = self._nc.jetstream(timeout=min(self._timeout_s, ATTEMPT_TIMEOUT_S))

        async def read() -> int | None:
            try:
                kv = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                return None
            try:
                entry = await kv.get(MARK_KEY)
            except nats.js.errors.NotFoundError:  # never written (or deleted)
                return -1
            return int(entry.value)

        return self._run(self._with_leader(f"the export bucket {bucket}", read), self._timeout_s + 5)

    def last_offset(self) -> int:
        """The stream's newest offset as its leader has it (-1: empty). JetStreamError when the stream does not
        exist or no leader answers."""
        js = self._nc.jetstream(timeout=min(self._timeout_s, ATTEMPT_TIMEOUT_S))

        async def info() -> Any:
            try:
                got = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError as e:
                raise JetStreamError(f"stream {self.stream} does not exist on {self._servers()}: check --stream / "
                                     "[log] stream (a node creates it when it first opens the log)") from e
            quorum, current, needed = counts_quorum(got)
            if not quorum:
                raise _NoQuorum(f"the leader counts {current} servers current, {needed} needed")
            return got

        got = self._run(self._with_leader(f"stream {self.stream}", info), self._timeout_s + 5)
        return int(got.state.last_seq) - 1

    def read(self, first: int, upto: int) -> Iterator[Event]:
        """The stream's events with first <= offset <= upto, in offset order; JetStreamError when the replicas
        that answer do not reach `upto` within ack_timeout_s."""
        start = max(first, 0)
        give_up = time.monotonic() + self._timeout_s
        reason = "no read yet"
        while start <= upto:
            n = min(READ_PAGE, upto - start + 1)
            try:
                page = self._run(get_batch(self._nc, self.stream, start + 1, n, None), ATTEMPT_TIMEOUT_S * 2)
            except _Retry as e:
                page, reason = [], str(e)
            else:
                reason = "the replica that answered has not caught up"
            page = [ev for ev in page if ev.offset <= upto]
            if page:
                yield from page
                start = page[-1].offset + 1
                give_up = time.monotonic() + self._timeout_s
                continue
            if time.monotonic() > give_up:
                raise JetStreamError(f"reading stream {self.stream} stopped at offset {start - 1} of {upto}: {reason}")
            time.sleep(FOLLOW_IDLE_S)

    def tail_arrow(self, first: int, upto: int) -> pa.Table:
        """`read(first, upto)` as `EVENT_ARROW_SCHEMA`."""
        return events_to_arrow(list(self.read(first, upto)))

    def close(self) -> None:
        """Close the connection and stop the client's loop (idempotent)."""
        if not self._loop.is_closed():
            stop_client_loop(self._loop, self._io, self._nc)

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
