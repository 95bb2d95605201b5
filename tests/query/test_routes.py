"""The HTTP routes: answers, every error class as a 4xx with a position, 429 + Retry-After, /metrics."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from insession.query import Limits, Sources
from insession.schema import partition_of

from .conftest import World, make_app, make_world

SERVING = (
    "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
    "ORDER BY ts DESC LIMIT 5"
)


def test_query_answers_from_both_lanes(world: World) -> None:
    client = TestClient(make_app(world.handle()))
    r = client.post("/v1/query", json={"sql": SERVING, "params": {"user": "u1"}})
    assert r.status_code == 200
    doc = r.json()
    assert (
        doc["lane"] == "serving" and doc["feature"] == "top_categories_15d" and doc["columns"] == ["category"]
    )
    assert doc["rows"] == [[c] for c in world.features.read("top_categories_15d", "u1")]
    r = client.post(
        "/v1/query", json={"sql": "SELECT user_id, max(ts) AS last FROM events GROUP BY 1 ORDER BY 1"}
    )
    doc = r.json()
    assert r.status_code == 200 and doc["lane"] == "analytics" and doc["columns"] == ["user_id", "last"]
    assert doc["rows"][0][0] == "u0" and doc["rows"][0][1].startswith("20")  # timestamps travel as ISO text
    r = client.post("/v1/query", json={"sql": "EXPLAIN SELECT count(*) FROM events"})
    assert r.json()["rows"][0][0] == "analytics" and "PARQUET_SCAN" in r.json()["rows"][0][2].upper()


def test_features_endpoint(world: World) -> None:
    client = TestClient(make_app(world.handle()))
    doc = client.get("/v1/features/user/u2").json()
    assert doc["entity"] == "user" and set(doc["features"]) == {
        f.name for f in world.features.registry.of_entity("user")
    }
    assert doc["features"]["top_categories_15d"] == world.features.read("top_categories_15d", "u2")
    pair = client.get("/v1/features/user_item/u1", params={"item_id": "i3"}).json()
    assert set(pair["features"]) == {"user_item_count_28d"}
    assert client.get("/v1/features/user_item/u1").status_code == 400
    assert client.get("/v1/features/global/-").json()["features"].keys() == {"trending_items_2h"}
    assert client.get("/v1/features/shop/u1").status_code == 404


def test_error_classes_are_4xx_with_messages_and_positions(world: World) -> None:
    client = TestClient(make_app(world.handle()))
    cases = [
        ({"sql": "SELEC * FROM events"}, 400, "syntax_error"),
        ({"sql": "SELECT * FROM orders"}, 400, "unknown_table"),
        ({"sql": "SELECT colour FROM events"}, 400, "unknown_column"),
        ({"sql": SERVING}, 400, "missing_parameter"),
        ({"sql": SERVING, "params": {"user": ["a"]}}, 400, "bad_parameter"),
        ({"sql": "SELECT * FROM read_csv('/etc/passwd')"}, 400, "forbidden_table"),
        ({"sql": "COPY events TO '/tmp/x'"}, 400, "forbidden_statement"),
    ]
    for body, status, code in cases:
        r = client.post("/v1/query", json=body)
        assert r.status_code == status, (body, r.text)
        doc = r.json()
        assert doc["code"] == code and doc["error"]
    doc = client.post("/v1/query", json={"sql": "SELECT *\nFROM orders"}).json()
    assert doc["position"] == {"line": 2, "col": 6}
    for bad in (b'{"params": {}}', b"{not json", b'{"sql": 1}', b'{"sql": "SELECT 1", "extra": 1}', b""):
        r = client.post("/v1/query", content=bad)
        assert r.status_code == 400 and r.json()["code"] == "bad_request", bad


def test_full_analytics_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    gate = threading.Event()
    w = make_world(tmp_path, n=50)
    base = Sources.of(w.log, w.catalog, w.history_dir)

    def gated_tail(offset: int):  # noqa: ANN202 - a pyarrow Table
        gate.wait(30)
        return base.tail_arrow(offset)

    gated = Sources(base.history_dir, base.exported_offset, gated_tail, base.items_arrow)
    w.query.close()
    from insession.query import QueryService

    w.query = QueryService(
        w.features,
        w.log,
        w.catalog,
        w.history_dir,
        Limits(concurrency=1, queue=1, retry_after_s=2),
        sources=gated,
    )
    client = TestClient(make_app(w.handle()))
    try:
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    client.post("/v1/query", json={"sql": "SELECT count(*) FROM events"}).status_code
                )
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while w.query.analytics.queue_depth + w.query.analytics.running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/query", json={"sql": "SELECT count(*) FROM items"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.json()["code"] == "overloaded"
        # the serving lane does not wait behind the blocked analytics lane
        t0 = time.perf_counter()
        ok = client.post("/v1/query", json={"sql": SERVING, "params": {"user": "u1"}})
        assert ok.status_code == 200 and time.perf_counter() - t0 < 2
        metrics = client.get("/metrics").text
        assert "insession_analytics_rejected_total 1.0" in metrics
        assert "insession_analytics_queue_depth 1.0" in metrics
        gate.set()
        for t in threads:
            t.join(20)
        assert results == [200, 200]
    finally:
        gate.set()
        w.close()


def test_metrics_endpoint_has_the_product_metrics(world: World) -> None:
    client = TestClient(make_app(world.handle()))
    client.post("/v1/query", json={"sql": SERVING, "params": {"user": "u1"}})
    client.post("/v1/query", json={"sql": "SELECT count(*) FROM events"})
    client.post("/v1/query", json={"sql": "SELECT nope FROM events"})  # bound (and refused) on its lane
    client.post("/v1/query", json={"sql": "SELECT FROM nope WHERE"})  # refused before it has a lane
    text = client.get("/metrics").text
    for name in (
        'insession_query_seconds_bucket{lane="serving"',
        'insession_query_seconds_count{lane="analytics"}',
        'insession_query_errors_total{lane="invalid",status="400"}',
        'insession_query_errors_total{lane="analytics",status="400"}',
        "insession_analytics_queue_depth",
        "insession_feature_watermark_ms",
        "insession_feature_lag",
        "process_resident_memory_bytes",
        "insession_event_to_feature_seconds_bucket",
        "insession_ingest_records_total",
        "insession_rank_seconds_bucket",
        "insession_feature_hygiene_drops_total",
    ):
        assert name in text, name


def test_a_damaged_history_part_is_an_error_that_names_no_path(tmp_path: Path) -> None:
    w = make_world(tmp_path / "w")
    try:
        parts = sorted(w.history_dir.rglob("*.parquet"))
        assert parts
        parts[0].write_bytes(parts[0].read_bytes()[:100])  # truncated
        r = TestClient(make_app(w.handle())).post("/v1/query", json={"sql": "SELECT count(*) FROM events"})
        assert r.status_code >= 400 and r.json()["error"]
        assert str(tmp_path) not in r.text and ".parquet" not in r.text.replace("<server file>", "")
    finally:
        w.close()


def test_error_bodies_keep_their_message_without_paths() -> None:
    from insession.query import QueryError

    e = QueryError('IO Error: No files found that match the pattern "/srv/data/history/day=*/part-*.parquet"')
    assert e.to_dict()["error"] == 'IO Error: No files found that match the pattern "<server file>"'
    assert "/srv/data/history" in str(e)  # the server's log keeps it
    assert QueryError("1/2 and a/b/c are not paths").to_dict()["error"] == "1/2 and a/b/c are not paths"


def test_a_feature_read_never_stalls_the_loop_on_a_unit_a_snapshot_is_capturing(world: World) -> None:
    """While a snapshot holds a partition's lock to capture a section (`FeatureEngine.capturing`), a read of
    that partition waits in a thread, not on the event loop: reads of other shoppers, by every route, are
    answered meanwhile, and the waiting one gets the same answer once the capture is done."""
    engine = world.features
    mine = "u1"
    other = next(u for u in (f"u{n}" for n in range(8))
                 if partition_of(u, engine.partitions) != partition_of(mine, engine.partitions))
    lock = engine._parts[partition_of(mine, engine.partitions)].lock
    with TestClient(make_app(world.handle())) as client, ThreadPoolExecutor(4) as pool:  # one event loop
        expected = client.get(f"/v1/features/user/{mine}").json()
        lock.acquire()
        engine.capturing = True
        try:
            pending = pool.submit(client.get, f"/v1/features/user/{mine}")
            time.sleep(0.2)
            assert not pending.done(), "the captured partition's read waits for the capture"
            answers = [
                pool.submit(client.get, f"/v1/features/user/{other}"),
                pool.submit(client.post, "/v1/features", json={"entity": "user", "keys": [other]}),
                pool.submit(client.post, "/v1/query", json={"sql": SERVING, "params": {"user": other}}),
            ]
            assert [a.result(5).status_code for a in answers] == [200, 200, 200]
        finally:
            engine.capturing = False
            lock.release()
        assert pending.result(10).json() == expected
