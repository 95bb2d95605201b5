"""Zero-code features: CREATE / DROP / SHOW / DESCRIBE FEATURE through the query interface, a backfill that
runs while ingest goes on, routing that switches only once the feature is whole, restarts in the middle,
durable versioned declarations, roles and refusals that name the problem and where it is."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import insession
from insession.embedded import Insession
from insession.features import Feature, FeatureEngine, FeatureRegistry, default_registry
from insession.features.declare import DAY_MS, HOUR_MS, MODEL_FEATURES, pinned_hash, sliding
from insession.features.manage import CHANGES_FILE, FeatureManager, FeatureStatementError
from insession.query import QueryError
from insession.serve.auth import Auth, KeySpec
from insession.serve.query_routes import router

BRANDS_7D = ("CREATE FEATURE brands_7d AS SELECT user_id, distinct_topk(brand, 3) FROM events "
             "WHERE action = 'view' AND ts > now() - INTERVAL '7' DAY "
             "GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)")
BRANDS_QUERY = ("SELECT DISTINCT brand FROM events WHERE user_id = :u AND action = 'view' "
                "AND ts > now() - INTERVAL 7 DAY ORDER BY ts DESC LIMIT 3")
COLORS = ("CREATE FEATURE colors AS SELECT item_id, topk_count(properties.color, 2) FROM events "
          "GROUP BY item_id")
SPEND = ("CREATE FEATURE spend_1d AS SELECT user_id, sum(price) FROM events WHERE action = 'purchase' "
         "AND ts > now() - INTERVAL '1' DAY GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)")


def _events(n: int, seed: int, start_ms: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"user_id": f"u{rng.randrange(30)}", "item_id": f"i{rng.randrange(60)}",
             "action": rng.choice(["view", "view", "view", "add_to_cart", "purchase"]),
             "ts": start_ms + j * 1000 + rng.randrange(-90_000, 1000),  # some late, a few beyond the lateness
             "properties": {"color": rng.choice(["red", "blue", "green", 7])} if rng.random() < 0.7 else None}
            for j in range(n)]


def _open(path: Path) -> Insession:
    db = insession.open(path, maintenance_interval_s=None)
    if not len(db.catalog):
        db.insert("items", [{"item_id": f"i{i}", "category": f"c{i % 5}", "brand": f"b{i % 4}",
                             "price": 3.0 * i} for i in range(55)])  # i55..i59: not catalogued
    return db


def _reads(engine: FeatureEngine, name: str) -> dict[str, Any]:
    f = engine.registry[name]
    keys = [f"u{u}" for u in range(31)] if f.entity == "user" else [f"i{i}" for i in range(61)]
    return dict(zip(keys, engine.read_many(name, keys), strict=True))


def _from_start(db: Insession, name: str) -> dict[str, Any]:
    """The feature as an engine that had it declared from the start computes it over the same log."""
    reg = FeatureRegistry.of([db.features.registry[name]], lateness_ms=db.features.registry.lateness_ms,
                             session_gap_ms=db.features.registry.session_gap_ms)
    ref = FeatureEngine(reg, partitions=db.features.partitions)
    ref.update_many(list(db.log.read(0)))
    return _reads(ref, name)


@pytest.mark.parametrize("seed", [1, 2])
def test_backfill_under_concurrent_ingest_equals_a_feature_declared_from_the_start(tmp_path: Path,
                                                                                    seed: int) -> None:
    now = int(time.time() * 1000)
    evs = _events(6000, seed, now - 7000 * 1000)
    db = _open(tmp_path)
    try:
        db.insert("events", evs[:3000])
        db.export()  # the first half is read from the Parquet history, the rest from the log
        db.insert("events", evs[3000:3500])
        ingest = threading.Thread(
            target=lambda: [db.insert("events", evs[a : a + 100]) for a in range(3500, 6000, 100)])
        ingest.start()
        for sql in (BRANDS_7D, COLORS, SPEND):
            assert db.execute(sql).lane == "features"
        ingest.join()
        for name in ("brands_7d", "colors", "spend_1d"):
            assert db.feature_manager.wait(name, 120) == "serving"
            assert _reads(db.features, name) == _from_start(db, name), name
        assert db.features.applied_offset == 5999
    finally:
        db.close()


def test_create_query_describe_show_drop_and_the_record_of_changes(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    db = _open(tmp_path)
    try:
        db.insert("events", _events(800, 3, now - 900 * 1000))
        assert db.select(BRANDS_QUERY, u="u3").lane == "analytics"  # not declared: computed over the history
        db.execute(BRANDS_7D)
        assert db.feature_manager.wait("brands_7d") == "serving"
        served = db.select(BRANDS_QUERY, u="u3")
        assert (served.lane, served.feature) == ("serving", "brands_7d")
        assert served.rows == db.query.analytics.submit(
            "SELECT brand FROM (SELECT brand, max(ts) AS m FROM events WHERE user_id = 'u3' AND action = 'view' "
            "AND brand IS NOT NULL GROUP BY brand) ORDER BY m DESC, brand LIMIT 3", {}).result().rows
        described = dict(db.execute("DESCRIBE FEATURE brands_7d").rows)
        assert described["status"] == "serving" and described["tiles"] == 168 and described["declared_by"] == "local"
        assert described["state_keys"] == len({e["user_id"] for e in _events(800, 3, 0) if e["action"] == "view"})
        shown = {row[0]: row for row in db.execute("SHOW FEATURES").rows}
        assert set(shown) == {*default_registry().features, "brands_7d"}
        assert shown["brands_7d"][4] == "serving"
        assert db.execute("DROP FEATURE brands_7d").rows[0][0] == "brands_7d"
        assert db.select(BRANDS_QUERY, u="u3").lane == "analytics"
        changes = [json.loads(line) for line in (tmp_path / "features" / CHANGES_FILE).read_text().splitlines()]
        assert [(c["version"], c["op"], c["feature"], c["who"]) for c in changes] == [
            (1, "create", "brands_7d", "local"), (2, "drop", "brands_7d", "local")]
        assert "brands_7d" not in json.loads((tmp_path / "features" / "registry.json").read_text())["features"]
    finally:
        db.close()


def test_routing_switches_only_when_the_feature_is_whole(tmp_path: Path) -> None:
    """The install step needs the writer: holding it keeps the backfill just short of serving."""
    now = int(time.time() * 1000)
    db = _open(tmp_path)
    try:
        db.insert("events", _events(500, 4, now - 600 * 1000))
        with db.features._writer:
            db.execute(BRANDS_7D)
            deadline = time.monotonic() + 60
            while dict(db.execute("DESCRIBE FEATURE brands_7d").rows).get("phase") != "installing":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert db.select(BRANDS_QUERY, u="u1").lane == "analytics"
            explained = db.select("EXPLAIN " + BRANDS_QUERY, u="u1").rows[0]
            assert explained[0] == "analytics" and explained[2].startswith("feature brands_7d is backfilling")
            assert "brands_7d" not in db.features.registry
            with pytest.raises(QueryError, match="unknown column|brands_7d"):
                db.select("SELECT brands_7d FROM features WHERE user_id = :u", u="u1")
        assert db.feature_manager.wait("brands_7d") == "serving"
        assert db.select(BRANDS_QUERY, u="u1").lane == "serving"
    finally:
        db.close()


def test_a_restart_in_the_middle_backfills_again_and_serves_nothing_half_built(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    db = _open(tmp_path)
    db.insert("events", _events(2000, 5, now - 2100 * 1000))
    db.features.snapshot()
    with db.features._writer:  # the backfill cannot finish before the close
        db.execute(COLORS)
        db.feature_manager.close()
    db.close()
    db = _open(tmp_path)
    try:
        assert "colors" not in db.features.registry  # declared, but not in the snapshot: backfilling again
        assert db.feature_manager.wait("colors", 60) == "serving"
        assert _reads(db.features, "colors") == _from_start(db, "colors")
    finally:
        db.close()
    db = _open(tmp_path)  # the backfill's snapshot holds it now: served at once, no backfill
    try:
        assert "colors" in db.features.registry and db.feature_manager.pending() == []
        assert _reads(db.features, "colors") == _from_start(db, "colors")
    finally:
        db.close()


def test_bad_statements_are_refused_naming_the_problem_and_its_position(tmp_path: Path) -> None:
    db = _open(tmp_path)
    try:
        cases = {
            "CREATE FEATURE x AS SELECT user_id, distinct_topk(colour, 5) FROM events GROUP BY user_id":
                (400, "cannot read field 'colour'", 1, 51),
            "CREATE FEATURE x AS SELECT user_id, distinct_topk(price, 3) FROM events GROUP BY user_id":
                (400, "price is a number, which has no one text form the online and offline engines", 1, 51),
            "CREATE FEATURE x AS SELECT user_id, median(ts) FROM events GROUP BY user_id":
                (400, "unknown aggregation", 1, 37),
            "CREATE FEATURE x AS\n  SELECT user_id, count(*) FROM events WHERE brand = 'b1' GROUP BY user_id":
                (400, "unsupported condition", 2, 46),
            "CREATE FEATURE x AS SELECT user_id, count(*) FROM events WHERE ts > now() - INTERVAL '400' DAY "
            "GROUP BY user_id, time_bucket(INTERVAL '1' DAY, ts)": (400, "longer than the 366 days", 1, 77),
            "CREATE FEATURE top_categories_15d AS SELECT user_id, count(*) FROM events GROUP BY user_id":
                (400, "already declared", 1, 16),
            "DROP FEATURE nope": (404, "unknown feature 'nope'", 1, 14),
            "DESCRIBE FEATURE nope": (404, "unknown feature 'nope'", 1, 18),
        }
        for sql, (status, message, line, col) in cases.items():
            with pytest.raises(QueryError) as err:
                db.execute(sql)
            e = err.value
            assert (e.status, e.line, e.col) == (status, line, col), (sql, e.message)
            assert message in e.message, (sql, e.message)
    finally:
        db.close()


def test_only_admin_changes_features_over_http_and_every_role_reads_them(tmp_path: Path) -> None:
    db = _open(tmp_path)
    try:
        from fastapi import FastAPI

        app = FastAPI()
        app.state.insession = db
        keys = {"serve": "k-serve-0123456789", "analytics": "k-analytics-0123456789", "admin": "k-admin-0123456789"}
        app.state.auth = Auth([KeySpec(name=f"{r}-key", roles=[r], key=k) for r, k in keys.items()])
        app.include_router(router)
        client = TestClient(app)

        def post(sql: str, role: str) -> Any:
            return client.post("/v1/query", json={"sql": sql, "params": {}}, headers={"X-API-Key": keys[role]})

        for role in ("serve", "analytics"):
            r = post(COLORS, role)
            assert r.status_code == 403 and "admin" in r.json()["error"], r.json()
            assert post("DROP FEATURE covisit", role).status_code == 403
            assert post("SHOW FEATURES", role).status_code == 200
        r = post(COLORS, "admin")
        assert r.status_code == 200 and r.json()["lane"] == "features"
        assert db.feature_manager.wait("colors") == "serving"
        assert dict(post("DESCRIBE FEATURE colors", "serve").json()["rows"])["declared_by"] == "admin-key"
        bad = post("CREATE FEATURE y AS SELECT user_id, distinct_topk(colour, 5) FROM events GROUP BY user_id", "admin")
        assert bad.status_code == 400 and bad.json()["position"] == {"line": 1, "col": 51}
    finally:
        db.close()


def test_a_model_pins_only_the_features_it_reads(tmp_path: Path) -> None:
    base = default_registry()
    extra = base.plus(Feature("brands", "user", "distinct_topk", sliding(7 * DAY_MS, HOUR_MS), "brand", 3))
    assert pinned_hash(extra) == pinned_hash(base) == base.hash()  # artefacts of the default set stay valid
    assert pinned_hash(base.minus("covisit")) is None
    engine = FeatureEngine.open(tmp_path / "features")
    manager = FeatureManager(engine, tmp_path / "history", lambda a, b: iter(()), lambda: "20261129-1")
    try:
        with pytest.raises(FeatureStatementError, match="serving model .version 20261129-1") as err:
            manager.drop("covisit", "DROP FEATURE covisit", "ops")
        assert err.value.status == 409 and "covisit" in engine.registry
        assert set(MODEL_FEATURES) <= set(engine.registry.features)
    finally:
        manager.close()
