"""One exporter at a time for a replicated log: a lease with a TTL in a JetStream key-value bucket, and the
export mark beside it (see docs/cluster.md, "History in a cluster").

Bucket `<stream>_export` (created when missing; the stream's replica count, file storage, one revision per
key), two keys:

- `lease`: the holder's node name, stored with a per-message TTL (`Nats-TTL`, server 2.11+) of `ttl_s`.
  A node takes it with a create (stored only when the key has no live message) and renews it every
  `ttl_s / 3`. A holder that stops renewing (SIGKILL, a lost network) loses it when the server expires
  the message, `ttl_s` after its last renewal; a clean `close` deletes it so another node takes over at
  once.
- `exported`: the export mark, the newest offset in the shared Parquet history (absent: -1). Written
  only by the holder, after the parts up to it are durable (the commit point of an export chunk).

Fencing (decision): every write of the holder (renewal, mark) carries `Nats-Expected-Last-Sequence` = the
bucket's last sequence after its own previous write. While it holds the lease nobody else writes to the
bucket (a refused create stores nothing), so its writes pass; once its lease expired and another node
created one, each of its writes is refused (err 10071), whatever its own clock believes. Its clock is
used only to stop early: it writes a part only while `ttl_s / 3` of its lease is certainly left (the
deadline runs from when it sent the renewal, before the server started the TTL). A holder paused for
longer than that between its check and its write (a stopped process, not a killed one) can still write
one part after another node took over. Its commit is refused and it stops; the new holder's
`verify_history` removes that part if it lands before the new holder's first export; later, its events
would be in the history twice until the next takeover, and its manifest write (read, add, replace) could
drop the new holder's newest parts from the manifest. Not fenced further: that needs a pause of more than
a third of the TTL (3.3 s by default) inside one export chunk.

A SIGKILLed holder's lease lasts until the TTL after its last renewal, i.e. between 2/3 of the TTL and
the TTL after its death; the other nodes try every TTL / 3. Measured in tests/log/test_log_export_lease.py
with a 2 s TTL, five runs on the loaded 2-core machine: another node held the lease 1.7-2.5 s after the
holder died; its first export follows on its next maintenance round (every 5 s in `insession serve`).
A clean close releases the lease at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import Header, KeyValueConfig, StorageType

log = logging.getLogger(__name__)

LEASE_KEY = "lease"
MARK_KEY = "exported"
_ERR_WRONG_LAST_SEQUENCE = 10071

Run = Callable[[Coroutine[Any, Any, Any], float], Any]
T = TypeVar("T")
ERR_NO_PLACEMENT = 10005  # "no suitable peers for placement": a server not (yet) known to be up


def forming(e: BaseException) -> bool:
    """Whether JetStream answered with a moment's state of a cluster that is forming or taking a server back:
    503 while it elects its leaders, a timeout, or 400 "no suitable peers for placement" (seen right after a
    cluster formed: a node creating its stream failed to start)."""
    if isinstance(e, nats.js.errors.BadRequestError):
        return e.err_code == ERR_NO_PLACEMENT
    return isinstance(e, nats.js.errors.ServiceUnavailableError | nats.errors.TimeoutError)


async def asked_again(call: Callable[[], Coroutine[Any, Any, T]], timeout_s: float) -> T:
    """`call()`, asked again every 0.25 s while it fails with a `forming` answer, for at most `timeout_s`;
    then (or at once, for any other error) the error is raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await call()
        except Exception as e:
            if not forming(e) or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.25)


class LeaseLost(RuntimeError):
    """This node's write to the lease bucket was refused: another node took the lease after it expired."""


class ExportLease:
    """The export lease and mark of one stream, kept by a background thread; thread-safe.

    `held()`: this node may export now. `mark()`: the export mark as last read or committed (never waits
    on the network; a non-holder refreshes it every renewal period, so it may trail the holder's by that
    long, which the analytics lane tolerates: it hides history rows at or beyond the tail it reads).
    `commit(offset)`: record the mark; raises LeaseLost when fenced off.
    """

    def __init__(self, nc: Any, run: Run, *, stream: str, replicas: int, ttl_s: int, node: str,
                 timeout_s: float) -> None:
        self.bucket = f"{stream}_export"
        self.ttl_s = ttl_s
        self.node = node
        self._js = nc.jetstream(timeout=timeout_s)
        self._run = run
        self._timeout_s = timeout_s
        self._writing = threading.Lock()  # one write to the bucket at a time (take, renew, commit, release)
        self._fence = 0  # the bucket's last sequence after this node's last write while holding (`_writing`)
        self._lock = threading.Lock()  # guards what follows; never held across a network call
        self._lease_rev = 0  # the subject revision of this node's lease message; 0: not holding
        self._deadline = 0.0  # monotonic time until which this node's lease certainly holds
        self._taken = 0  # how many times this node took the lease
        self.holder: str | None = None  # the holder as last seen (this node's name while it holds)
        self._kv = run(asked_again(lambda: self._open(replicas), timeout_s), timeout_s + 5)
        self._mark = run(self._read_mark(), timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="insession-export-lease", daemon=True)
        self._thread.start()

    async def _open(self, replicas: int) -> Any:
        try:
            return await self._js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:  # two nodes creating it with one config both succeed
            return await self._js.create_key_value(KeyValueConfig(  # no direct gets: its leader answers reads
                bucket=self.bucket, history=1, replicas=replicas, storage=StorageType.FILE, direct=False))

    async def _read_mark(self) -> int:
        try:
            entry = await self._kv.get(MARK_KEY)
        except nats.js.errors.NotFoundError:  # never written, or deleted
            return -1
        return int(entry.value)

    async def _holder(self) -> str | None:
        try:
            return (await self._kv.get(LEASE_KEY)).value.decode()
        except nats.js.errors.NotFoundError:
            return None

    # -- the holder's view (never waits on the network) ---------------------------------------------

    def held(self) -> bool:
        """Whether this node holds the lease with at least a third of its TTL certainly left."""
        with self._lock:
            return self._lease_rev > 0 and time.monotonic() < self._deadline - self.ttl_s / 3

    def takeovers(self) -> int:
        """How many times this node took the lease (a new holding starts with `verify_history`)."""
        with self._lock:
            return self._taken

    def mark(self) -> int:
        """The export mark: the newest offset in the shared history as last read or committed; -1: none."""
        with self._lock:
            return self._mark

    # -- writes -------------------------------------------------------------------------------------

    def commit(self, offset: int) -> None:
        """Record `offset` as the export mark (the parts up to it are durable). Raises LeaseLost when
        another node holds the lease now; any other failure leaves the outcome unknown and gives the lease
        up locally (it expires; the next holder reads the mark afresh)."""
        with self._writing:
            with self._lock:
                if self._lease_rev == 0:
                    raise LeaseLost(f"node {self.node} does not hold the export lease of {self.bucket}")
            try:
                self._fenced_put(MARK_KEY, str(offset).encode(), None)
            except BaseException:
                self._drop()
                raise
            with self._lock:
                self._mark = offset

    def _fenced_put(self, key: str, value: bytes, ttl_s: int | None) -> int:
        """Store key = value only if the bucket's last sequence is still this node's last write's (caller
        holds `_writing`); advances the fence; returns the key's new revision. Raises LeaseLost when fenced."""
        try:
            ack = self._run(self._js.publish(f"$KV.{self.bucket}.{key}", value, timeout=self._timeout_s,
                                             headers={Header.EXPECTED_LAST_SEQUENCE: str(self._fence)},
                                             msg_ttl=ttl_s), self._timeout_s + 1)
        except nats.js.errors.APIError as e:
            if e.err_code != _ERR_WRONG_LAST_SEQUENCE:
                raise
            self._drop()
            raise LeaseLost(f"the export lease of {self.bucket} was taken by another node after node "
                            f"{self.node}'s expired: it stops exporting") from e
        self._fence = ack.seq
        return int(ack.seq)

    def _drop(self) -> None:
        """Stop holding: no more writes until the lease is taken again."""
        with self._lock:
            self._lease_rev = 0
            self._deadline = 0.0

    # -- the background thread ----------------------------------------------------------------------

    def _keep(self) -> None:
        """Take or renew the lease every ttl_s / 3 until close; never dies."""
        while True:
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - no quorum, lost connection: the next round tries again
                log.warning("export lease %s: %r", self.bucket, e)
            if self._stop.wait(self.ttl_s / 3):
                return

    def tick(self) -> None:
        """One round: renew the lease held, or try to take it (reading the mark afresh when taken); a node
        that does not hold it refreshes the mark and the holder's name."""
        with self._writing:
            sent = time.monotonic()
            with self._lock:
                holding = self._lease_rev > 0
            if holding:
                try:
                    rev = self._fenced_put(LEASE_KEY, self.node.encode(), self.ttl_s)
                except LeaseLost as e:
                    log.warning("%s", e)
                    return
                with self._lock:
                    self._lease_rev, self._deadline = rev, sent + self.ttl_s
                return
            try:
                rev = self._run(self._kv.create(LEASE_KEY, self.node.encode(), msg_ttl=self.ttl_s), self._timeout_s)
            except nats.js.errors.KeyWrongLastSequenceError:  # another node holds it
                holder = self._run(self._holder(), self._timeout_s)
                mark = self._run(self._read_mark(), self._timeout_s)
                with self._lock:
                    self.holder, self._mark = holder, mark
                return
            except nats.js.errors.NotFoundError:  # it expired while the create looked at it: next round
                return
            self._fence = rev  # a create appends: its sequence is the bucket's last
            mark = self._run(self._read_mark(), self._timeout_s)
            with self._lock:
                self._lease_rev, self._deadline = rev, sent + self.ttl_s
                self._mark = mark
                self._taken += 1
                self.holder = self.node
        log.info("node %s took the export lease of %s at mark %d", self.node, self.bucket, mark)

    def close(self) -> None:
        """Stop renewing; a holder deletes its lease so another node takes over at once (not after the TTL)."""
        self._stop.set()
        self._thread.join()
        with self._writing:
            with self._lock:
                rev = self._lease_rev
            if rev:
                try:
                    self._run(self._kv.delete(LEASE_KEY, last=rev), self._timeout_s)
                except (nats.errors.Error, TimeoutError) as e:
                    log.warning("export lease %s not released (%r): another node takes it after %d s",
                                self.bucket, e, self.ttl_s)
                self._drop()
