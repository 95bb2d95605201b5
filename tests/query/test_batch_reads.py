"""Many keys in one read: `features` with `<key> IN (...)` and POST /v1/features answer exactly what one read
per key answers, in the order asked, unknown keys included; malformed batches get a 4xx naming why."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.query import QueryError
from insession.query.match import MAX_KEYS

from .conftest import World, make_app

USERS = [f"u{i}" for i in range(10)]  # u8, u9: no events
ITEMS = [f"i{i}" for i in range(64)]  # i60..i63: never seen


@pytest.fixture(scope="module")
def client(world: World) -> TestClient:
    return TestClient(make_app(world.handle()))


def _one(world: World, entity: str, key: str) -> dict[str, Any]:
    values, _ = world.query.read_features(entity, key)
    return values


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.sampled_from(USERS), min_size=1, max_size=12), named=st.booleans())
def test_in_list_equals_one_read_per_key(world: World, keys: list[str], named: bool) -> None:
    params = {f"k{n}": k for n, k in enumerate(keys)}
    cols = "top_categories_15d, session_length" if named else "*"
    r = world.query.execute(f"SELECT {cols} FROM features WHERE user_id IN ({', '.join(':' + p for p in params)})",
                            params)
    assert r.lane == "serving"
    unique = list(dict.fromkeys(keys))
    assert [row[0] for row in r.rows] == unique
    for row in r.rows:
        want = _one(world, "user", row[0])
        assert dict(zip(r.columns[1:], row[1:], strict=True)) == {c: want[c] for c in r.columns[1:]}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.sampled_from(ITEMS), min_size=1, max_size=20))
def test_batch_endpoint_equals_the_single_key_endpoint(client: TestClient, keys: list[str]) -> None:
    r = client.post("/v1/features", json={"entity": "item", "keys": keys})
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert [row["key"] for row in rows] == keys
    for row in rows:
        one = client.get(f"/v1/features/item/{row['key']}").json()
        assert (row["features"], row["fallbacks"]) == (one["features"], one["fallbacks"])


def test_user_item_pairs_and_a_subset_of_features(client: TestClient) -> None:
    keys = [["u1", "i3"], ["u2", "i5"], ["u9", "i60"]]
    r = client.post("/v1/features", json={"entity": "user_item", "keys": keys, "features": ["user_item_count_28d"]})
    assert r.status_code == 200, r.text
    for row, (u, i) in zip(r.json()["rows"], keys, strict=True):
        one = client.get(f"/v1/features/user_item/{u}", params={"item_id": i}).json()["features"]
        assert row["features"] == {"user_item_count_28d": one["user_item_count_28d"]}


@pytest.mark.parametrize(("body", "code"), [
    ({"entity": "user", "keys": []}, "bad_request"),
    ({"entity": "user", "keys": [f"u{n}" for n in range(MAX_KEYS + 1)]}, "bad_request"),
    ({"entity": "shop", "keys": ["u1"]}, "bad_request"),
    ({"entity": "user", "keys": [["u1", "i1"]]}, "bad_key"),
    ({"entity": "user_item", "keys": ["u1"]}, "bad_key"),
    ({"entity": "user", "keys": ["u1"], "features": ["nope"]}, "unknown_feature"),
    ({"entity": "user", "keys": ["u1"], "features": ["covisit"]}, "unknown_feature"),
    ({"entity": "user", "keys": ["x" * 300]}, "bad_request"),
    ({"entity": "user", "keys": ["u1"], "extra": 1}, "bad_request"),
])
def test_malformed_batches_are_refused_with_400(client: TestClient, body: dict[str, Any], code: str) -> None:
    r = client.post("/v1/features", json=body)
    assert (r.status_code, r.json()["code"]) == (400, code), r.text


def test_in_lists_only_on_user_or_item_keys_and_bounded(world: World) -> None:
    with pytest.raises(QueryError, match="IN list"):
        world.query.execute("SELECT * FROM features WHERE user_id IN ('u1', 'u2') AND item_id = 'i1'")
    many = ", ".join(f"'u{n}'" for n in range(MAX_KEYS + 1))
    with pytest.raises(QueryError, match="IN list"):
        world.query.execute(f"SELECT * FROM features WHERE user_id IN ({many})")
    assert world.query.execute("SELECT action, count(*) FROM events WHERE user_id IN ('u1', 'u2') "
                               "GROUP BY action").lane == "analytics"  # events with IN: not a feature
