"""`POST /v1/rank` and `POST /v1/admin/reload` over HTTP on a real embedded handle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from insession.embedded import Insession
from insession.rank import RankConfig, Ranker
from insession.serve.rank_routes import router

from .shop import Shop, items


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, Shop]]:
    db = Insession(tmp_path / "data", maintenance_interval_s=None)
    fields = ("item_id", "category", "subcategory", "available")
    db.insert("items", [{f: getattr(it, f) for f in fields} for it in items()])
    now = int(time.time() * 1000) - 60_000
    db.insert("events", [
        {"user_id": f"u{n % 3}", "item_id": f"i{n % 20}", "action": "view", "ts": now + n} for n in range(60)
    ])
    shop = Shop(db.catalog, db.features, tmp_path / "models")
    ranker = Ranker(db.features, db.catalog, shop.model_dir, RankConfig(budget_ms=5_000, backend="torch"))
    db.ranker = ranker  # type: ignore[attr-defined]
    app = FastAPI()
    app.include_router(router)
    app.state.insession = db
    with TestClient(app) as client:
        yield client, shop
    ranker.close()
    db.close()


def test_rank_without_a_model_then_reload_then_rank_with_it(served: tuple[TestClient, Shop]) -> None:
    client, shop = served
    r = client.post("/v1/rank", json={"user_id": "u1", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["fallback"], body["fallback_reason"], body["model_version"]) == (
        "trending", "no_model", None)
    assert len(body["items"]) == 5
    metrics = client.app.state.metrics.render().decode()  # type: ignore[attr-defined]
    assert 'insession_rank_fallbacks_total{reason="no_model"} 1.0' in metrics

    assert client.get("/v1/admin/model").status_code == 404
    shop.artefact("v1", seed=1)
    r = client.post("/v1/admin/reload")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v1"
    assert client.get("/v1/admin/model").json()["backend"] == "torch"
    r = client.post("/v1/rank", json={"user_id": "u1", "candidates": ["i1", "i2", 3, "i4"], "explain": True})
    body = r.json()
    assert r.status_code == 200 and body["model_version"] == "v1" and body["fallback"] is None
    assert {it["item_id"] for it in body["items"]} == {"i1", "i2", "i4"}  # 3 is no item: hygiene drops it
    assert body["explanations"][0]["item_id"] == body["items"][0]["item_id"]


def test_refused_artefact_is_a_409_and_bad_versions_are_4xx(served: tuple[TestClient, Shop]) -> None:
    client, shop = served
    shop.artefact("v1", seed=1)
    assert client.post("/v1/admin/reload", json={"version": "v1"}).status_code == 200
    shop.artefact("v2", seed=2, feature_hash="feedfacefeedface")
    r = client.post("/v1/admin/reload", json={"version": "v2"})
    assert r.status_code == 409 and "feedfacefeedface" in r.json()["error"]
    assert client.post("/v1/rank", json={"user_id": "u1"}).json()["model_version"] == "v1"
    assert client.post("/v1/admin/reload", json={"version": "../v1"}).status_code == 422
    assert client.post("/v1/admin/reload", json={"version": "v7"}).status_code == 404
    assert client.post("/v1/admin/reload", json={"path": "/etc"}).status_code == 422


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"user_id": "u1", "candidates": [f"i{n}" for n in range(501)]}, 422, "at most 500"),
        ({"user_id": "u1", "k": 0}, 422, "k must be"),
        ({"user_id": "u1", "nope": 1}, 422, "unknown field"),
        ({"user_id": True}, 422, "Expected"),
        ({"k": 3}, 422, "user_id"),
    ],
)
def test_bad_rank_requests_are_4xx_with_a_message(
    served: tuple[TestClient, Shop], body: dict[str, object], status: int, message: str
) -> None:
    r = served[0].post("/v1/rank", json=body)
    assert r.status_code == status and message in r.json()["error"]


def test_malformed_json_is_a_400(served: tuple[TestClient, Shop]) -> None:
    r = served[0].post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_openapi_documents_the_rank_body(served: tuple[TestClient, Shop]) -> None:
    doc = served[0].get("/openapi.json").json()
    body = doc["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"user_id", "candidates", "k", "budget_ms", "explain"} <= set(body["properties"])
