"""The feature reader (`[server] reader_port`, `insession.serve.reader`), a real second process beside a real
server: its answers are the server's, its rankings too, with the model version the server serves (also after
a reload to an older one); a read naming the offset of a write sees it; the same API keys are checked; writes
and everything else are sent back to the server with 421; a killed reader is counted and started again; the
server's /readyz and /metrics say how it is."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rank.shop import Shop, items

from insession.features import FeatureEngine, default_registry
from insession.serve.process import ServerProcess, free_port

T0 = 1_700_000_000_000
KEYS = {"ingest": "k-ingest", "serve": "k-serve", "analytics": "k-analytics"}
CONFIG = """
[server]
reader_port = {reader_port}

[rank]
backend = "torch"  # no ONNX export: the test is of the reader, not of the backend

[[auth.keys]]
name = "writer"
roles = ["ingest", "serve"]
key = "k-ingest"

[[auth.keys]]
name = "reader"
roles = ["serve"]
key = "k-serve"

[[auth.keys]]
name = "analyst"
roles = ["analytics"]
key = "k-analytics"

[[auth.keys]]
name = "operator"
roles = ["admin"]
key = "k-admin"
"""
WRITER = {"X-API-Key": KEYS["ingest"]}
SERVE = {"X-API-Key": KEYS["serve"]}


def _until(what: str, done: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if got := done():
                return got
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.1)


class Served:
    def __init__(self, server: ServerProcess, reader_url: str) -> None:
        self.server, self.url, self.reader = server, server.url, reader_url

    def readyz(self) -> dict[str, Any]:
        return httpx.get(self.url + "/readyz", timeout=10).json()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("reader")
    reader_port = free_port()
    (tmp / "server.toml").write_text(CONFIG.format(reader_port=reader_port))
    shop = Shop(None, FeatureEngine(default_registry()), tmp / "data" / "models")  # type: ignore[arg-type]  # artefacts only
    shop.artefact("v1", seed=1)
    shop.artefact("v2", seed=2)  # the newest: the server serves it from the start
    with ServerProcess(tmp / "data", extra_args=["--config", str(tmp / "server.toml")]) as server:
        catalogue = [{"item_id": it.item_id, "category": it.category, "subcategory": it.subcategory,
                      "price": it.price, "available": it.available} for it in items()]
        assert httpx.put(server.url + "/v1/items", json=catalogue, headers=WRITER).status_code == 200
        reader = f"http://127.0.0.1:{reader_port}"
        _until("the reader answers /readyz", lambda: httpx.get(reader + "/readyz", timeout=5).status_code == 200)
        yield Served(server, reader)


def _write(served: Served, events: list[dict[str, Any]]) -> int:
    r = httpx.post(served.url + "/v1/events", json=events, headers=WRITER, timeout=30)
    assert r.status_code == 200, r.text
    return int(r.json()["offsets"][-1])


def test_the_reader_answers_what_the_server_answers_and_reads_a_named_write(served: Served) -> None:
    for n in range(5):
        offset = _write(served, [{"user_id": f"u{u}", "item_id": f"i{(u + n) % 12}", "action": "view",
                                  "ts": T0 + n * 60_000 + u, "session_id": f"s{u}"} for u in range(6)])
        # the write's offset named: the reader waits until it applied it, then answers with it
        got = httpx.get(f"{served.reader}/v1/features/user/u{n}",
                        headers={**SERVE, "X-Insession-Min-Offset": str(offset)}, timeout=10)
        assert got.status_code == 200, got.text
        assert got.json() == httpx.get(f"{served.url}/v1/features/user/u{n}", headers=SERVE, timeout=10).json()
        assert len(got.json()["features"]["session_seq"]) == n + 1
    body = {"entity": "user", "keys": [f"u{u}" for u in range(8)]}
    many = httpx.post(served.reader + "/v1/features", json=body, headers=SERVE, timeout=10)
    assert many.status_code == 200
    assert many.json() == httpx.post(served.url + "/v1/features", json=body, headers=SERVE, timeout=10).json()
    item = httpx.get(served.reader + "/v1/features/item/i3", headers=SERVE, timeout=10)
    assert item.json() == httpx.get(served.url + "/v1/features/item/i3", headers=SERVE, timeout=10).json()
    ready = httpx.get(served.reader + "/readyz", timeout=10).json()
    assert ready["ready"] and ready["role"] == "feature reader" and ready["applied_offset"] >= offset


def test_the_reader_ranks_with_the_model_the_server_serves_and_follows_its_reloads(served: Served) -> None:
    events = [{"user_id": "u-rank", "item_id": f"i{n}", "action": "view", "ts": T0 + 10**6 + n * 60_000,
               "session_id": "s-rank"} for n in (16, 17, 18, 40)]
    offset = _write(served, events)

    def ranked(url: str) -> dict[str, Any]:
        r = httpx.post(url + "/v1/rank", json={"user_id": "u-rank", "k": 10, "budget_ms": 5000}, timeout=30,
                       headers={**SERVE, "X-Insession-Min-Offset": str(offset)})
        assert r.status_code == 200, r.text
        return r.json()

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return ([i["item_id"] for i in a["items"]], a["model_version"], a["fallback"]) == (
            [i["item_id"] for i in b["items"]], b["model_version"], b["fallback"])

    here, there = ranked(served.url), ranked(served.reader)
    assert here["fallback"] is None and here["model_version"] == "v2"
    assert same(there, here)
    admin = {"X-API-Key": "k-admin"}
    back = httpx.post(served.url + "/v1/admin/reload", json={"version": "v1"}, headers=admin, timeout=60)
    assert back.status_code == 200, back.text  # a rollback: the older version serves
    assert ranked(served.url)["model_version"] == "v1"
    until_v1 = _until("the reader ranks with v1", lambda: (r := ranked(served.reader))["model_version"] == "v1"
                      and r, timeout_s=60)
    assert same(until_v1, ranked(served.url))
    assert not same(until_v1, here)  # the two versions rank differently: the comparison can fail


def test_the_reader_checks_the_same_keys_and_sends_everything_else_to_the_server(served: Served) -> None:
    path = served.reader + "/v1/features/user/u1"
    assert httpx.get(path, timeout=10).status_code == 401
    assert httpx.get(path, headers={"X-API-Key": "k-typo"}, timeout=10).status_code == 401
    assert httpx.get(path, headers={"X-API-Key": KEYS["analytics"]}, timeout=10).status_code == 200  # as the server
    assert httpx.get(served.url + "/v1/features/user/u1", headers={"X-API-Key": KEYS["analytics"]},
                     timeout=10).status_code == 200
    for method, route in (("POST", "/v1/events"), ("PUT", "/v1/items"), ("POST", "/v1/query"),
                          ("POST", "/v1/admin/reload"), ("GET", "/metrics"), ("GET", "/console")):
        r = httpx.request(method, served.reader + route, json={}, headers=WRITER, timeout=10)
        assert r.status_code == 421, (route, r.status_code)
        assert r.json()["code"] == "misdirected" and f"port {served.server.port}" in r.json()["error"]
    bad = httpx.post(served.reader + "/v1/features", content=b"{not json", headers=SERVE, timeout=10)
    assert bad.status_code == 400
    behind = httpx.get(path, headers={**SERVE, "X-Insession-Min-Offset": str(10**12)}, timeout=30)
    assert behind.status_code == 503 and behind.json()["code"] == "behind"


def test_a_killed_reader_is_counted_and_started_again(served: Served) -> None:
    before = served.readyz()["reader"]
    assert before["running"] and before["port"] == int(served.reader.rsplit(":", 1)[1])
    pid = int(_reader_pid(served.server))
    os.kill(pid, signal.SIGKILL)
    after = _until("the server restarts its reader", lambda: (r := served.readyz()["reader"])["starts"] ==
                   before["starts"] + 1 and r["running"] and r)
    assert after["failures"] == before["failures"] + 1
    metrics = httpx.get(served.url + "/metrics", headers={"X-API-Key": "k-admin"}, timeout=10).text
    assert "insession_reader_running 1.0" in metrics
    assert f"insession_reader_starts_total {after['starts']:.1f}" in metrics
    assert f"insession_reader_failures_total {after['failures']:.1f}" in metrics
    offset = _write(served, [{"user_id": "u-new", "item_id": "i1", "action": "view", "ts": T0 + 10**7}])
    got = _until("the new reader serves", lambda: httpx.get(
        served.reader + "/v1/features/user/u-new", headers={**SERVE, "X-Insession-Min-Offset": str(offset)},
        timeout=10))
    assert got.status_code == 200 and len(got.json()["features"]["session_seq"]) == 1


def _reader_pid(server: ServerProcess) -> str:
    assert server.proc is not None
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"insession.serve.reader" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    raise AssertionError("no reader process under the server")
