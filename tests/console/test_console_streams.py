"""The console's event streams over plain HTTP: their format, their access control, and a server stop."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from insession.serve.console.routes import STREAM_S
from insession.serve.process import ServerProcess

from .conftest import Console


def first_message(url: str, key: str | None = None) -> dict:
    headers = {"X-API-Key": key} if key else {}
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without a message")


def test_the_streams_check_the_key_and_send_json_events(console: Console) -> None:
    url = console.url + "/console/api/shopper/u0/stream"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": console.keys["loader"]}, timeout=10).status_code == 403
    shopper = first_message(url, console.keys["viewer"])
    assert shopper["user_id"] == "u0" and shopper["session_events"] >= 4
    assert shopper["ranking"]["explanations"]
    overview = first_message(console.url + "/console/api/overview/stream", console.keys["viewer"])
    assert overview["ingest"]["events_total"] >= len(shopper["history"])


def test_a_shopper_without_events_is_shown_with_an_empty_session(console: Console) -> None:
    response = httpx.get(console.url + "/console/api/shopper/nobody", timeout=10,
                         headers={"X-API-Key": console.keys["viewer"]})
    assert response.status_code == 200
    shopper = response.json()
    assert shopper["session"] == [] and shopper["history"] == []
    assert shopper["ranking"]["items"]  # the candidate stage's popular items, ranked


def test_an_open_console_does_not_hold_up_a_server_stop(tmp_path: Path) -> None:
    """uvicorn waits for open responses when it stops; the streams end within STREAM_S, so it stops."""
    srv = ServerProcess(tmp_path / "db").start()
    try:
        def hold(path: str) -> None:
            try:
                with httpx.stream("GET", srv.url + path, timeout=30) as response:
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                pass  # the server went away: what the test waits for

        for path in ("/console/api/overview/stream", "/console/api/shopper/u1/stream"):
            threading.Thread(target=hold, args=(path,), daemon=True).start()
        time.sleep(1.0)
        assert srv.proc is not None
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(STREAM_S + 10)
        assert time.monotonic() - start < STREAM_S + 5
    finally:
        srv.kill()


def test_pages_are_data_free_shells_under_a_strict_content_security_policy(console: Console) -> None:
    """Without a key a page loads (to show the login form) but holds no data; it runs only its own files."""
    response = httpx.get(console.url + "/console/shopper?user=u0", timeout=10)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "bakery" not in response.text and "http://" not in response.text and "https://" not in response.text
    assert httpx.get(console.url + "/console", timeout=10).headers["location"] == "/console/overview"
    assert httpx.get(console.url + "/console/nope", timeout=10).status_code == 404
    assert httpx.get(console.url + "/console/static/console.js", timeout=10).status_code == 200
    assert httpx.get(console.url + "/console/static/..%2Froutes.py", timeout=10).status_code == 404


def test_an_overlong_user_id_is_refused(console: Console) -> None:
    response = httpx.get(console.url + "/console/api/shopper/" + "u" * 10_000, timeout=10,
                         headers={"X-API-Key": console.keys["viewer"]})
    assert response.status_code == 422
