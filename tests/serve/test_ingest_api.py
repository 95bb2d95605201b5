"""The ingest HTTP API: accepted forms, all-or-nothing batches with named errors, idempotency, durability."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import insession
from insession.schema import MAX_BATCH, MAX_BODY_BYTES, BatchRejected
from insession.serve.app import create_app
from insession.serve.process import ServerProcess


def now_ms() -> int:
    return int(time.time() * 1000)


def ev(i: int, **kw: object) -> dict[str, object]:
    return {"user_id": f"u{i % 3}", "item_id": f"sku{i % 5}", "action": "view", "ts": now_ms() - 60_000 + i, **kw}


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tmp_path)) as client:
        yield client


def stored_count(api: TestClient) -> int:
    return int(api.get("/readyz").json()["log_offset"]) + 1


def test_one_object_array_and_ndjson(api: TestClient) -> None:
    r = api.post("/v1/events", json=ev(0))
    assert r.status_code == 200 and r.json()["offsets"] == [0]
    r = api.post("/v1/events", json=[ev(1), ev(2)])
    assert r.json()["offsets"] == [1, 2] and r.json()["stored"] == 2
    body = "\n".join(json.dumps(ev(i)) for i in range(3, 6)) + "\n"
    r = api.post("/v1/events", content=body, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200 and r.json()["offsets"] == [3, 4, 5]
    assert stored_count(api) == 6


def test_bad_batch_is_refused_whole_with_index_and_field(api: TestClient) -> None:
    api.post("/v1/events", json=[ev(0)])
    bad = [ev(1), ev(2, action="teleport"), ev(3, colour="red"), ev(4, ts="soon")]
    r = api.post("/v1/events", json=bad)
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert [(e["index"], e["field"]) for e in errors] == [(1, "action"), (2, "colour"), (3, "ts")]
    assert "record 1, field 'action'" in r.json()["error"]
    assert stored_count(api) == 1  # nothing of the bad batch
    assert api.post("/v1/events", json=[ev(5)]).status_code == 200  # the valid path keeps working
    assert stored_count(api) == 2


def test_malformed_and_oversized(api: TestClient) -> None:
    r = api.post("/v1/events", content=b'[{"user_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = api.post("/v1/events", json=[ev(i) for i in range(MAX_BATCH + 1)])
    assert r.status_code == 413 and str(MAX_BATCH) in r.json()["error"]
    r = api.post("/v1/events", content=b" " * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = api.post("/v1/events", json=[])
    assert r.status_code == 422 and "empty batch" in r.json()["error"]
    assert stored_count(api) == 0


def test_retries_with_event_id_are_stored_once(api: TestClient) -> None:
    batch = [ev(i, event_id=f"e{i}") for i in range(4)]
    first = api.post("/v1/events", json=batch).json()
    again = api.post("/v1/events", json=batch + [ev(9, event_id="e9")]).json()
    assert again["duplicates"] == 4 and again["stored"] == 1
    assert again["offsets"][:4] == first["offsets"]
    assert stored_count(api) == 5


def test_items_enrich_events(api: TestClient) -> None:
    r = api.put("/v1/items", json=[{"item_id": "sku1", "category": "dairy", "subcategory": "milk"}])
    assert r.status_code == 200 and r.json()["stored"] == 1
    r = api.put("/v1/items", json=[{"item_id": "x", "category": 3}])
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "category"
    r = api.post("/v1/events", json=[ev(1), ev(2, item_id="ghost")])
    assert r.json()["unknown_items"] == 1
    db = api.app.state.insession  # type: ignore[attr-defined]
    (stored, ghost) = list(db.log.read(0))
    assert (stored.category, stored.subcategory) == ("dairy", "milk")
    assert ghost.category is None


def test_health_and_openapi(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["ready"] is True
    spec = api.get("/openapi.json").json()
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    one = body["oneOf"][0]
    assert set(one["required"]) == {"user_id", "item_id", "action", "ts"}
    assert "add_to_cart" in one["properties"]["action"]["enum"]


def test_sdk_embedded_and_remote_agree_and_survive_kill9(tmp_path: Path) -> None:
    rows = [ev(i, event_id=f"k{i}") for i in range(50)]
    with ServerProcess(tmp_path / "remote") as server:
        client = insession.Client(server.url)
        acked = client.insert("events", rows).offsets
        with pytest.raises(BatchRejected) as info:
            client.insert("events", [ev(0, action="nope")])
        assert info.value.errors[0].field == "action"
        client.close()
        server.kill()  # kill -9: nothing flushed or snapshotted beyond what was acknowledged
    with insession.open(tmp_path / "remote", maintenance_interval_s=None) as db:
        assert [e.offset for e in db.log.read(0)] == acked
        assert [e.event_id for e in db.log.read(0)] == [r["event_id"] for r in rows]
        assert db.insert("events", rows).duplicates == 50


def test_a_graceful_stop_exports_the_history_and_snapshots_the_features(tmp_path: Path) -> None:
    """SIGTERM: uvicorn shuts the app down (the handle's close: final snapshot and export), then re-raises
    the signal, so the close must run in the app's shutdown, not after `uvicorn.run`."""
    rows = [ev(i, event_id=f"g{i}") for i in range(20)]
    with ServerProcess(tmp_path / "d") as server:
        client = insession.Client(server.url)
        client.insert("events", rows)
        client.close()
    assert list((tmp_path / "d" / "history").rglob("*.parquet")), "no history exported at the stop"
    assert (tmp_path / "d" / "features" / "CURRENT").exists(), "no feature snapshot at the stop"
