"""API keys and roles: 401 without a valid key, 403 without the role, admin implies all, keys never logged."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from insession.serve.auth import Auth, KeySpec, hash_key, write_config
from insession.serve.config import ConfigError, load_config

from .conftest import World, make_app

SERVING = (
    "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
    "ORDER BY ts DESC LIMIT 5"
)
ANALYTICS = "SELECT action, count(*) FROM events GROUP BY action"
KEYS = {
    "ingest": "k-ingest-0123456789",
    "serve": "k-serve-0123456789",
    "analytics": "k-analytics-0123456789",
    "admin": "k-admin-0123456789",
}


@pytest.fixture(scope="module")
def client(world: World) -> TestClient:
    auth = Auth([KeySpec(name=f"{role}-key", roles=[role], key=key) for role, key in KEYS.items()])
    return TestClient(make_app(world.handle(), auth))


def _query(client: TestClient, sql: str, key: str | None, bearer: bool = False) -> int:
    headers = {} if key is None else ({"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key})
    return client.post(
        "/v1/query", json={"sql": sql, "params": {"user": "u1"} if ":user" in sql else {}}, headers=headers
    ).status_code


def test_missing_or_unknown_key_is_401(client: TestClient) -> None:
    assert _query(client, SERVING, None) == 401
    assert _query(client, SERVING, "not-a-key") == 401
    assert client.get("/v1/features/user/u1").status_code == 401
    assert client.get("/metrics").status_code == 401


def test_roles_per_route_and_lane(client: TestClient) -> None:
    assert _query(client, SERVING, KEYS["ingest"]) == 403
    assert _query(client, SERVING, KEYS["serve"]) == 200
    assert _query(client, SERVING, KEYS["serve"], bearer=True) == 200
    assert _query(client, ANALYTICS, KEYS["serve"]) == 403  # the analytics lane needs the analytics role
    assert _query(client, ANALYTICS, KEYS["analytics"]) == 200
    assert _query(client, SERVING, KEYS["analytics"]) == 200
    assert client.get("/metrics", headers={"X-API-Key": KEYS["serve"]}).status_code == 403
    assert client.get("/v1/features/user/u1", headers={"X-API-Key": KEYS["ingest"]}).status_code == 403


def test_admin_implies_every_role(client: TestClient) -> None:
    for sql in (SERVING, ANALYTICS):
        assert _query(client, sql, KEYS["admin"]) == 200
    assert client.get("/metrics", headers={"X-API-Key": KEYS["admin"]}).status_code == 200
    assert client.get("/v1/features/user/u1", headers={"X-API-Key": KEYS["admin"]}).status_code == 200


def test_auth_is_off_without_keys(world: World) -> None:
    open_client = TestClient(make_app(world.handle(), Auth()))
    assert _query(open_client, ANALYTICS, None) == 200
    assert TestClient(make_app(world.handle())).get("/metrics").status_code == 200


def test_keys_are_never_logged_or_kept(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for key in KEYS.values():
        _query(client, ANALYTICS, key)
    _query(client, ANALYTICS, "wrong-secret-attempt")
    text = caplog.text + repr(client.app.state.auth.__dict__)
    for key in (*KEYS.values(), "wrong-secret-attempt"):
        assert key not in text
    body = client.post(
        "/v1/query", json={"sql": SERVING, "params": {"user": "u1"}}, headers={"X-API-Key": KEYS["ingest"]}
    ).text
    assert KEYS["ingest"] not in body and "ingest-key" in body  # the key's name, never the key


def test_config_from_toml_holds_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    keys = write_config(path, {"shop": ["serve", "ingest"], "ops": ["admin"]})
    text = path.read_text()
    assert all(k not in text for k in keys.values())
    assert hash_key(keys["shop"]) in text
    auth = Auth(load_config(path).auth.keys)
    shop = auth.authenticate(keys["shop"])
    assert shop is not None and shop.roles == {"serve", "ingest"}
    ops = auth.authenticate(keys["ops"])
    assert ops is not None and ops.roles == {"ingest", "serve", "analytics", "admin"}
    assert auth.authenticate(keys["shop"] + "x") is None and auth.authenticate("") is None


def test_json_config_and_bad_configs(tmp_path: Path) -> None:
    path = tmp_path / "server.json"
    path.write_text('{"auth": {"keys": [{"name": "a", "key": "secret-a", "roles": ["analytics"]}]}}')
    assert Auth(load_config(path).auth.keys).authenticate("secret-a").roles == {"analytics"}
    for bad, says in (
        ({"name": "x", "roles": ["serve"]}, "exactly one of key or sha256"),
        ({"name": "x", "roles": ["serve"], "key": "k", "sha256": "a" * 64}, "exactly one of key or sha256"),
        ({"name": "x", "roles": ["root"], "key": "k"}, "auth.keys[0].roles[0]"),
        ({"name": "x", "roles": [], "key": "k"}, "auth.keys[0].roles"),
        ({"name": "x", "roles": ["serve"], "sha256": "abc"}, "auth.keys[0].sha256"),
    ):
        path.write_text(json.dumps({"auth": {"keys": [bad]}}))
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(path)
        with pytest.raises(ValueError):  # keys built in code get the same checks
            Auth([KeySpec(**bad)])
