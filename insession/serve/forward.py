"""Requests for shoppers this node does not hold, answered by a node that holds them.

With `[cluster] copies` below the number of nodes, each node keeps the user and user_item features of only
some partitions (`ClusterConfig.held`); every node still applies every event (item and global features, and
the partition-free parts: sessions and co-visitation's shopper side). A request that needs a shopper's
features (`GET /v1/features/user/...`, `POST /v1/features` for users, `POST /v1/rank`, a serving-lane
`POST /v1/query`) is served here when this node holds the shopper's partition, else forwarded:

- **Where.** To the partition's holders in `ClusterConfig.holders` order (the same rule on every node,
  from the same `nodes` list, so no directory service is needed), the next one when a holder cannot be
  reached, times out, or answers 503; when none answers, 503 `partition_unavailable` naming each failure.
- **Once.** A forwarded request carries `X-Insession-Forwarded-By`; a node that receives one for a
  partition it does not hold answers 421 `misdirected` (the nodes' `[cluster]` lists differ) instead of
  forwarding again, so a misconfiguration never loops.
- **As the client.** The client's API key headers travel unchanged and the holder authorizes them again
  (every node has the same keys); nothing is trusted because it came from a node.
- **Read-your-writes.** A forwarded request carries `X-Insession-Min-Offset`: the offset this node had
  applied when it forwarded (its own writes included, since an insert returns after its events applied
  here). The holder waits until it has applied that offset too (`read_wait_s`, usually a few ms: both
  follow the same stream) or answers 503 `behind`, and the next holder is tried. A client may send the
  header itself (the `offsets` of its insert result) to read its write through any node.
- The answer carries `X-Insession-Served-By`: the node that read the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from insession.schema import partition_of
from insession.serve.auth import API_KEY_HEADER
from insession.serve.config import ClusterConfig

FORWARDED_BY = "X-Insession-Forwarded-By"
MIN_OFFSET = "X-Insession-Min-Offset"
SERVED_BY = "X-Insession-Served-By"
_PASSED = (API_KEY_HEADER, "authorization", "content-type")  # what travels from the client to the holder
_WAIT_STEP_S = 0.002


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


async def wait_applied(request: Request, applied: Callable[[], int], wait_s: float,
                       wake: Callable[[], None] = lambda: None) -> Response | None:
    """Hold a read until this node has applied the offset the request names in `X-Insession-Min-Offset`
    (`applied()` returns this node's applied offset; `wake()` has the log's follower read now rather than
    at its next idle poll, 50 ms): None to go on, else the error to answer (400 for a malformed header,
    503 `behind` when `wait_s` passes first)."""
    raw = request.headers.get(MIN_OFFSET)
    if raw is None:
        return None
    try:
        wanted = int(raw)
    except ValueError:
        return _error(400, "bad_header", f"{MIN_OFFSET} must be an integer offset, not {raw[:40]!r}")
    deadline = time.monotonic() + wait_s
    while applied() < wanted:
        wake()
        if time.monotonic() >= deadline:
            return _error(503, "behind", f"this node has applied the log up to offset {applied()}, the read asks for "
                          f"{wanted} ({MIN_OFFSET}); retry, or read through the node that took the write")
        await asyncio.sleep(_WAIT_STEP_S)
    return None


async def _relay(r: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in r.aiter_raw():
            yield chunk
    finally:
        await r.aclose()


class Forwarder:
    """This node's side of forwarding (see the module docstring); `forwarded` counts outcomes per target."""

    def __init__(self, cluster: ClusterConfig, partitions: int) -> None:
        held = cluster.held(partitions)
        if held is None:
            raise ValueError("this node holds every partition: nothing to forward")
        self.cluster, self.partitions, self.held = cluster, partitions, held
        self.node = cluster.node
        self.forwarded: dict[tuple[str, str], int] = {}  # (target node, outcome) -> requests
        self._client: httpx.AsyncClient | None = None

    def partition(self, user_id: str) -> int:
        return partition_of(user_id, self.partitions)

    def holds(self, user_id: str) -> bool:
        return self.partition(user_id) in self.held

    def targets(self, partitions: frozenset[int]) -> list[str]:
        """The other nodes holding every one of `partitions`, in the order they are tried (the holders
        order of the lowest partition)."""
        first, *rest = sorted(partitions)
        return [n for n in self.cluster.holders(first)
                if n != self.node and all(n in self.cluster.holders(p) for p in rest)]

    def _count(self, target: str, outcome: str) -> None:
        self.forwarded[(target, outcome)] = self.forwarded.get((target, outcome), 0) + 1

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # created on the server's event loop, its connections kept alive
            self._client = httpx.AsyncClient(timeout=self.cluster.forward_timeout_s,
                                             limits=httpx.Limits(max_keepalive_connections=32))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, request: Request, partitions: frozenset[int], applied: int, *, body: bytes | None = None,
                   path: str | None = None, stream: bool = False) -> Response:
        """Forward `request` (or `body` to `path`, same method) to a node holding all of `partitions` and
        relay its answer (`stream`: relayed as it comes, for server-sent events); `applied` is this node's
        applied offset, which the holder's read waits for."""
        where = f"partition {min(partitions)}" if len(partitions) == 1 else f"partitions {sorted(partitions)}"
        if request.headers.get(FORWARDED_BY):
            return _error(421, "misdirected", f"{where} not held by {self.node} (the request came from "
                          f"{request.headers[FORWARDED_BY]}): the nodes' [cluster] configs differ")
        targets = self.targets(partitions)
        if not targets:
            return _error(422, "spans_nodes", f"no node holds all of {where} that this read needs: ask for the "
                          "shoppers of one node per request, or use POST /v1/features, which gathers keys across nodes")
        headers = {h: request.headers[h] for h in _PASSED if h in request.headers}
        headers[FORWARDED_BY] = self.node
        headers[MIN_OFFSET] = str(applied)
        url_path = path or request.url.path + (f"?{request.url.query}" if request.url.query else "")
        content = body if body is not None else await request.body()
        failures = []
        for target in targets:
            try:
                # a relayed event stream may be quiet for long: no read timeout for it, the others' as configured
                timeout = httpx.Timeout(self.cluster.forward_timeout_s, read=None) if stream else \
                    httpx.USE_CLIENT_DEFAULT
                sent = self._http().build_request(request.method, target + url_path, content=content, headers=headers,
                                                  timeout=timeout)
                r = await self._http().send(sent, stream=stream)
            except httpx.HTTPError as e:
                self._count(target, "unreachable")
                failures.append(f"{target}: {type(e).__name__}")
                continue
            if stream and r.status_code == 200:
                self._count(target, "answered")
                return StreamingResponse(_relay(r), headers={SERVED_BY: target},
                                         media_type=r.headers.get("content-type"))
            await r.aread()
            await r.aclose()
            if r.status_code == 503:
                self._count(target, "unavailable")
                failures.append(f"{target}: 503 {r.text[:200]}")
                continue
            self._count(target, "answered")
            return Response(r.content, status_code=r.status_code, headers={SERVED_BY: target},
                            media_type=r.headers.get("content-type"))
        return _error(503, "partition_unavailable", f"no node holding {where} answered ({'; '.join(failures)}); retry")

    async def scatter(self, request: Request, doc: Mapping[str, Any], keys: list[Any], user_of: Callable[[Any], str],
                      local: Callable[[list[Any]], list[Any]], applied: int) -> Response | list[Any]:
        """`POST /v1/features` over several partitions: the keys this node holds are answered by `local(keys)`
        (a list of rows), the others forwarded, one request per partition, with `doc` (the request body) and
        their keys. Returns the rows in `keys` order, or the first error answer of a forwarded part."""
        rows: list[Any] = [None] * len(keys)
        mine: list[int] = []
        theirs: dict[int, list[int]] = {}
        for n, key in enumerate(keys):
            p = self.partition(user_of(key))
            (mine if p in self.held else theirs.setdefault(p, [])).append(n)
        if mine:
            for n, row in zip(mine, local([keys[n] for n in mine]), strict=True):
                rows[n] = row
        parts = list(theirs.items())
        answers = await asyncio.gather(*(
            self.send(request, frozenset([p]), applied, path=request.url.path,
                      body=msgspec.json.encode({**doc, "keys": [keys[n] for n in where]}))
            for p, where in parts))
        for (_, where), answer in zip(parts, answers, strict=True):
            if answer.status_code != 200:
                return answer  # type: ignore[no-any-return]
            for n, row in zip(where, msgspec.json.decode(answer.body)["rows"], strict=True):
                rows[n] = row
        return rows


def forwarder_of(request: Request) -> Forwarder | None:
    """The app's Forwarder; None when this node holds every partition (or the router runs without one)."""
    return getattr(request.app.state, "forwarder", None)


async def here_or_there(request: Request, user_id: str | None = None) -> Response | None:
    """The gate of every read of a shopper's state: waits for `X-Insession-Min-Offset` when the request
    names one, then returns None when this node serves `user_id` (or no shopper is involved), else the
    answer of a node holding it."""
    state = request.app.state
    features = state.insession.features
    config = getattr(state, "config", None)
    wait_s = config.cluster.read_wait_s if config is not None else ClusterConfig().read_wait_s
    waited = await wait_applied(request, lambda: features.applied_offset, wait_s, state.insession.wake)
    if waited is not None:
        return waited
    forwarder = forwarder_of(request)
    if forwarder is None or user_id is None or forwarder.holds(user_id):
        return None
    stream = request.url.path.endswith("/stream")
    partition = frozenset([forwarder.partition(user_id)])
    return await forwarder.send(request, partition, features.applied_offset, stream=stream)
