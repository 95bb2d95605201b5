"""Hostile input against the server: each case observed in issue 18 and more of its kind.

Deep nesting, huge numbers, oversized and chunked bodies on every endpoint, poisoned timestamps, work
before the role check, exposure without keys, and what error bodies may contain. Every answer must be a
4xx with a JSON body that says what is wrong (never a 5xx, a path or a stack trace); where memory is the
point, the server process's peak resident memory (VmHWM) is measured before and after.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from insession.serve.app import create_app
from insession.serve.config import parse_config
from insession.serve.limits import BodyLimit
from insession.serve.process import ServerProcess

KEYS = {"ingest": "k-ingest-0123456789", "serve": "k-serve-0123456789", "admin": "k-admin-0123456789"}
CONFIG = "".join(f'[[auth.keys]]\nname = "{r}-key"\nkey = "{k}"\nroles = ["{r}"]\n\n' for r, k in KEYS.items())
ADMIN = {"X-API-Key": KEYS["admin"]}
LPAD = "SELECT length(lpad('x', 1000000000, 'y'))"
NOW = "2026-11-01T10:00:00Z"

# (method, path, a valid-looking JSON body) for every endpoint that takes a body
BODY_ENDPOINTS = [
    ("POST", "/v1/events", {"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW}),
    ("PUT", "/v1/items", {"item_id": "i1", "category": "dairy"}),
    ("POST", "/v1/query", {"sql": "SELECT 1 FROM events", "params": {}}),
    ("POST", "/v1/rank", {"user_id": "u1"}),
    ("POST", "/v1/admin/reload", {}),
]
ALL_ENDPOINTS = [(m, p) for m, p, _ in BODY_ENDPOINTS] + [
    ("GET", "/v1/admin/model"), ("GET", "/v1/features/user/u1"), ("GET", "/metrics"), ("GET", "/healthz"),
    ("GET", "/readyz"),
]


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def assert_client_error(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    """A 4xx (one of `statuses` if given) whose JSON body explains itself and leaks nothing."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict) and (body.get("error") or body.get("detail")), body
    assert "Traceback" not in r.text and "/tmp" not in r.text and "site-packages" not in r.text
    return body  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("hostile")
    with TestClient(create_app(data / "data", config=parse_config(CONFIG))) as client:
        yield client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("hostile-server")
    (root / "server.toml").write_text(CONFIG)
    with ServerProcess(root / "data", extra_args=["--config", str(root / "server.toml")]) as srv:
        yield srv


def peak_rss_mb(srv: ServerProcess) -> float:
    assert srv.proc is not None
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def raw_request(srv: ServerProcess, head: str, chunks: Iterator[bytes] = iter(())) -> tuple[int, bytes]:
    """Send `head` (request line and headers) and then `chunks` until the server answers; its status and body.

    Stops sending as soon as an answer is readable, as a client would that watched its socket."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n")
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                part = s.recv(65536)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


# -- nesting and numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_4xx_on_every_endpoint(api: TestClient, depth: int) -> None:
    ingest = {"X-API-Key": KEYS["ingest"], "content-type": "application/json"}
    ndjson = {**ingest, "content-type": "application/x-ndjson"}
    deep = nested(depth)
    event = f'{{"user_id": "u1", "item_id": "i1", "action": "view", "ts": "{NOW}", "properties": {{"a": {deep}}}}}'
    cases = [
        ("POST", "/v1/events", deep, ingest),
        ("POST", "/v1/events", event, ingest),
        ("POST", "/v1/events", '{"user_id": "u1"}\n' + deep, ndjson),
        ("PUT", "/v1/items", f'[{{"item_id": "i1", "category": {deep}}}]', ingest),
        ("POST", "/v1/query", f'{{"sql": "SELECT 1 FROM events", "params": {{"p": {deep}}}}}', ADMIN),
        ("POST", "/v1/rank", f'{{"user_id": "u1", "candidates": {deep}}}', {"X-API-Key": KEYS["serve"]}),
        ("POST", "/v1/admin/reload", f'{{"version": {deep}}}', ADMIN),
    ]
    for method, path, body, headers in cases:
        r = api.request(method, path, content=body.encode(), headers=headers)
        assert_client_error(r, 400, 413, 422)  # 413: deeper than the endpoint's body limit allows at all


def test_a_nested_property_is_refused_naming_the_field(api: TestClient) -> None:
    r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW,
                                     "properties": {"a": [[[1]]]}}, headers={"X-API-Key": KEYS["ingest"]})
    errors = assert_client_error(r, 422)["errors"]
    assert errors[0]["index"] == 0 and errors[0]["field"].startswith("properties")


def test_huge_integers_are_refused_not_stored(api: TestClient) -> None:
    ingest = {"X-API-Key": KEYS["ingest"]}
    for value in (10**30, -(10**30), 2**63):
        r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW,
                                         "properties": {"n": value}}, headers=ingest)
        errors = assert_client_error(r, 422)["errors"]
        assert errors[0]["field"].startswith("properties")
        assert "-9223372036854775808" in errors[0]["message"] or "9223372036854775807" in errors[0]["message"]
        r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": value},
                     headers=ingest)
        assert assert_client_error(r, 422)["errors"][0]["field"] == "ts"
    r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW,
                                     "properties": {"n": 2**63 - 1}}, headers=ingest)
    assert r.status_code == 200, r.text  # the largest 64-bit integer is fine
    r = api.post("/v1/query", json={"sql": "SELECT * FROM events LIMIT :n", "params": {"n": 10**30}}, headers=ADMIN)
    assert assert_client_error(r, 400)["code"] == "bad_parameter"
    for field in ("k", "budget_ms"):
        r = api.post("/v1/rank", json={"user_id": "u1", field: 10**30}, headers={"X-API-Key": KEYS["serve"]})
        assert_client_error(r, 422)
    r = api.put("/v1/items", content=b'{"item_id": "i9", "category": "c", "price": 1e400}',
                headers={**ingest, "content-type": "application/json"})
    assert_client_error(r, 400)


def test_long_ids_are_refused_before_ranking(api: TestClient) -> None:
    serve = {"X-API-Key": KEYS["serve"]}
    for body in ({"user_id": "u" * 100_000}, {"user_id": "u1", "candidates": ["i" * 100_000]}):
        assert_client_error(api.post("/v1/rank", json=body, headers=serve), 422)


def test_long_strings_cannot_amplify_into_the_log(api: TestClient) -> None:
    ingest = {"X-API-Key": KEYS["ingest"]}
    r = api.put("/v1/items", json={"item_id": "big", "category": "c" * 1_000_000}, headers=ingest)
    assert assert_client_error(r, 422)["errors"][0]["field"] == "category"
    r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW,
                                     "properties": {"p" * 300: 1}}, headers=ingest)
    assert_client_error(r, 422)


# -- timestamps ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00", "1960-05-01T00:00:00Z", "1970-01-01T00:00:00Z",
           "9999-12-31T23:59:59-01:00", 0, 1_000_000_000],
)
def test_timestamps_out_of_range_are_refused_whatever_their_form(api: TestClient, ts: str | int) -> None:
    r = api.post("/v1/events", json={"user_id": "u1", "item_id": "i1", "action": "view", "ts": ts},
                 headers={"X-API-Key": KEYS["ingest"]})
    errors = assert_client_error(r, 422)["errors"]
    assert errors == [{"index": 0, "field": "ts", "message": errors[0]["message"]}]


def test_history_export_survives_after_refused_poisoned_events(api: TestClient) -> None:
    db = api.app.state.insession  # type: ignore[attr-defined]
    r = api.post("/v1/events", json=[{"user_id": "u2", "item_id": "i1", "action": "view", "ts": NOW}],
                 headers={"X-API-Key": KEYS["ingest"]})
    assert r.status_code == 200
    db.log.export(db.history_dir)  # every acknowledged event is in range, so the export cannot fail on one
    r = api.post("/v1/query", json={"sql": "SELECT min(ts) FROM events"}, headers=ADMIN)
    assert r.status_code == 200, r.text


# -- authorise before working ---------------------------------------------------------------------


def test_the_role_is_checked_before_the_query_is_evaluated(server: ServerProcess) -> None:
    before = peak_rss_mb(server)
    t0 = time.perf_counter()
    for sql in (LPAD, "SELECT levenshtein(repeat('a', 120000), repeat('b', 120000)) FROM events",
                f"EXPLAIN {LPAD}"):
        r = httpx.post(server.url + "/v1/query", json={"sql": sql}, headers={"X-API-Key": KEYS["serve"]}, timeout=60)
        body = assert_client_error(r, 400, 403)
        assert r.status_code == 403 or body["code"] == "forbidden_function", body
    assert time.perf_counter() - t0 < 5.0
    assert peak_rss_mb(server) - before < 150, "the refused queries were evaluated"


def test_planning_never_evaluates(api: TestClient) -> None:
    service = api.app.state.insession.query  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    plan = service.plan(LPAD + " FROM events")
    assert plan.lane == "analytics" and time.perf_counter() - t0 < 1.0


def test_the_plan_cache_is_bounded_by_size(api: TestClient) -> None:
    from insession.query.service import PLAN_CACHE_CHARS

    service = api.app.state.insession.query  # type: ignore[attr-defined]
    padding = " " * 60_000
    for n in range(40):
        service.plan(f"SELECT {n} AS n FROM events{padding}")
    assert service.cached_plan_chars <= PLAN_CACHE_CHARS


# -- limits before buffering ----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ALL_ENDPOINTS)
def test_an_announced_oversized_body_is_refused_before_it_is_read(server: ServerProcess, method: str,
                                                                   path: str) -> None:
    t0 = time.perf_counter()
    status, body = raw_request(
        server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {KEYS['admin']}\r\nContent-Length: {1 << 30}\r\n",
    )
    assert status == 413 and json.loads(body)["code"] == "too_large"
    assert time.perf_counter() - t0 < 5.0  # answered without waiting for the gigabyte


@pytest.mark.parametrize(("method", "path", "_"), BODY_ENDPOINTS)
def test_a_chunked_body_is_cut_at_the_limit(server: ServerProcess, method: str, path: str, _: Any) -> None:
    before = peak_rss_mb(server)
    chunk = b"[" + b" " * 65_534 + b"\r\n"
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(1024):  # 64 MiB in all
            sent += 65_536
            yield b"10000\r\n" + chunk[:65_536] + b"\r\n"

    key = KEYS["admin"] if "admin" in path or "query" in path else KEYS["ingest" if path == "/v1/events" or
                                                                          path == "/v1/items" else "serve"]
    status, body = raw_request(
        server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {key}\r\n"
        "Transfer-Encoding: chunked\r\n", chunks(),
    )
    assert status == 413 and json.loads(body)["code"] == "too_large"
    assert sent < 48 * 1024 * 1024  # the answer came long before all 64 MiB were sent
    assert peak_rss_mb(server) - before < 100


def test_the_body_limit_counts_chunks_as_they_are_read() -> None:
    """The middleware alone: a chunked body is consumed only up to the limit, then answered 413."""
    read: list[int] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the app saw the whole body")

    async def receive() -> dict[str, Any]:
        read.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(BodyLimit(app, lambda path: 10_000)({"type": "http", "path": "/v1/rank", "headers": []}, receive,
                                                     send))
    assert len(read) == 11 and sent[0]["status"] == 413


def test_large_bodies_are_admitted_a_few_at_a_time_per_client() -> None:
    """Two large bodies in flight from one address: a third from it gets 429, another address gets in."""
    release = asyncio.Event()
    statuses: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    def request(client: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        return {"type": "http", "path": "/v1/events", "client": (client, 1), "headers": headers}

    big = [(b"content-length", b"5000")]
    chunked = [(b"transfer-encoding", b"chunked")]

    async def scenario() -> None:
        limit = BodyLimit(app, lambda path: 10_000, large_bytes=1_000, per_client=2)
        held = [asyncio.create_task(limit(request("10.0.0.1", h), receive, send)) for h in (big, chunked)]
        await asyncio.sleep(0.01)
        await limit(request("10.0.0.1", big), receive, send)  # a third large one from the same address
        assert statuses == [429]
        small = asyncio.create_task(limit(request("10.0.0.1", [(b"content-length", b"10")]), receive, send))
        other = asyncio.create_task(limit(request("10.0.0.2", big), receive, send))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*held, small, other)
        assert statuses == [429, 200, 200, 200, 200]
        await limit(request("10.0.0.1", big), receive, send)  # admitted again once the others are done
        assert statuses[-1] == 200

    asyncio.run(scenario())


def test_a_non_numeric_content_length_is_a_400(server: ServerProcess) -> None:
    status, body = raw_request(server, "POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n")
    assert 400 <= status < 500


# -- errors never say where files live ----------------------------------------------------------


def test_error_bodies_name_no_paths(api: TestClient) -> None:
    data_dir = str(api.app.state.insession.data_dir)  # type: ignore[attr-defined]
    answers = [
        api.post("/v1/admin/reload", json={"version": "v404"}, headers=ADMIN),
        api.post("/v1/admin/reload", headers=ADMIN),
        api.get("/v1/admin/model", headers=ADMIN),
        api.post("/v1/query", json={"sql": "SELECT * FROM read_csv('/etc/passwd')"}, headers=ADMIN),
        api.post("/v1/query", json={"sql": "SELECT nope FROM events"}, headers=ADMIN),
    ]
    for r in answers:
        assert_client_error(r)
        assert data_dir not in r.text and "/etc/passwd" not in r.json()["error"].replace("'/etc/passwd'", "")


# -- exposure -----------------------------------------------------------------------------------


def test_exposure_without_keys_needs_the_flag_and_then_warns(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with code 2"):
        ServerProcess(tmp_path / "a", extra_args=["--host", "0.0.0.0"]).start()
    with ServerProcess(tmp_path / "b", extra_args=["--host", "0.0.0.0", "--insecure-no-auth"]) as srv:
        ready = httpx.get(srv.url + "/readyz").json()
        assert ready["ready"] is True
        assert any("without API keys" in w for w in ready["warnings"])
        assert httpx.get(srv.url + "/metrics").status_code == 200  # open, as the operator accepted


def test_loopback_serves_without_keys_and_without_warnings(api: TestClient, tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path / "d")) as client:
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and "warnings" not in ready


ODD_BODIES = [
    b"", b"null", b"[]", b'"text"', b"1e999", b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b"[null]", b"[1, 2]",
    b'{"user_id": null}', b'{"user_id": {"a": 1}}', b'{"sql": null}', b'{"sql": "SELECT 1", "params": []}',
    b'{"sql": "SELECT ' + b"(" * 5000 + b"1" + b")" * 5000 + b' FROM events"}', b'{"user_id": "u", "k": -1}',
    b'{"user_id": "u", "budget_ms": 1e308}', b'{"version": ""}', b'{"version": "."}',
]


@pytest.mark.parametrize(("method", "path", "_"), BODY_ENDPOINTS)
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_odd_bodies_are_never_a_5xx(api: TestClient, method: str, path: str, _: Any, content_type: str) -> None:
    for body in ODD_BODIES:
        r = api.request(method, path, content=body, headers={**ADMIN, "content-type": content_type})
        if not (path == "/v1/admin/reload" and r.status_code == 404):  # an empty body means "the newest": none
            assert_client_error(r)


def test_odd_keys_are_never_a_5xx(api: TestClient) -> None:
    for path in ("/v1/features/user/" + "u" * 300, "/v1/features/nope/x", "/v1/features/user_item/u1",
                 "/v1/features/user_item/u1?item_id=" + "i" * 300):
        assert_client_error(api.get(path, headers=ADMIN))
