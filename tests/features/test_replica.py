"""The feature reader's copy of the state (`insession.embedded.Replica`): a second process's reads equal the
server's at the same offset, for random streams with late, too-late and re-sent events, started anywhere in
the log (from a snapshot or from nothing); the catalogue's changes reach its hygiene rules; new declarations
make it stale instead of serving another set of features."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from features_helpers import until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import insession
from insession.embedded import Insession, Replica

T0 = 1_700_000_000_000
USERS = [f"u{u}" for u in range(12)]
ITEMS = [f"i{i}" for i in range(30)]
ENTITY_KEYS: dict[str, list[Any]] = {
    "user": USERS, "item": ITEMS, "user_item": [(u, i) for u in USERS[:6] for i in ITEMS[:6]], "global": [None],
}


def _events(n: int, rng: random.Random, start_ms: int) -> list[dict[str, Any]]:
    """Random events: many in order, some late, a few beyond the lateness, some re-sent with the same id."""
    out: list[dict[str, Any]] = []
    for j in range(n):
        if out and rng.random() < 0.1:
            out.append(dict(rng.choice(out)))  # re-sent: the log stores it once
            continue
        out.append({"event_id": f"e{start_ms}-{j}", "user_id": rng.choice(USERS), "item_id": rng.choice(ITEMS),
                    "action": rng.choice(["view", "view", "view", "add_to_cart", "purchase", "search"]),
                    "ts": start_ms + j * 30_000 + rng.choice([0, 0, 0, -120_000, -40 * 60_000]),
                    "session_id": f"s{j // 25}"})
    return out


def _answers(query: Any) -> dict[tuple[str, Any], Any]:
    """Every entity's every key, read and cleaned as the feature routes answer them."""
    return {(entity, key): query.read_features(entity, key) for entity, keys in ENTITY_KEYS.items() for key in keys}


def _primary(path: Path, max_users: int = 0) -> Insession:
    db = insession.open(path, maintenance_interval_s=None, max_users=max_users)
    if not len(db.catalog):
        db.insert("items", [{"item_id": i, "category": f"c{n % 4}", "price": 1.0 + n} for n, i in enumerate(ITEMS)])
    return db


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), before=st.integers(1, 120), after=st.integers(3, 120),
       snapshot=st.booleans(), cap=st.sampled_from([0, 0, 3, 8]))
def test_the_replica_reads_what_the_server_reads_at_the_same_offset(tmp_path_factory: Any, seed: int, before: int,
                                                                     after: int, snapshot: bool, cap: int) -> None:
    """`cap`: the shopper cap (0: none), on both; the replica applies the log in other pages than the server's
    inserts, and evicts the same shoppers at the same event."""
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp("data")
    with _primary(path, cap) as db:
        db.insert("events", _events(before, rng, T0))
        if snapshot:
            db.features.snapshot()
        # the snapshot (if any) and the log after it
        replica = Replica(path, partitions=db.features.partitions, max_users=cap)
        try:
            assert replica.features.applied_offset == db.log.last_offset()
            replica.start()
            for batch in range(3):  # written while it follows
                db.insert("events", _events(after // 3, rng, T0 + (batch + 1) * 10_000_000))
            until("the replica applied the log", lambda: replica.features.applied_offset == db.log.last_offset())
            assert replica.lag() == 0
            assert _answers(replica.query) == _answers(db.query)
            assert replica.features.watermark == db.features.watermark
            assert replica.features.too_late == db.features.too_late
        finally:
            replica.close()


def test_a_catalogue_change_reaches_the_replica_s_hygiene(tmp_path: Path) -> None:
    with _primary(tmp_path / "data") as db:
        db.insert("events", [{"user_id": "u1", "item_id": i, "action": "view", "ts": T0 + n * 1000, "session_id": "s"}
                             for n, i in enumerate(ITEMS[:5])])
        replica = Replica(db.data_dir, check_s=0.1)
        replica.start()
        try:
            def lists(query: Any) -> list[Any]:  # the global item lists (trending, popular), as served
                return [v for v in query.read_features("global", None)[0].values() if isinstance(v, list)]

            assert any("i2" in str(v) for v in lists(db.query))
            assert lists(replica.query) == lists(db.query)
            db.insert("items", [{"item_id": "i2", "category": "c2", "price": 3.0, "available": False}])
            assert not any("i2" in str(v) for v in lists(db.query))  # unavailable: no list offers it on the server
            until("the replica's hygiene drops the unavailable item",
                   lambda: lists(replica.query) == lists(db.query), timeout_s=20.0)
        finally:
            replica.close()


def test_new_declarations_make_the_replica_stale(tmp_path: Path) -> None:
    with _primary(tmp_path / "data") as db:
        replica = Replica(db.data_dir, check_s=0.1)
        replica.start()
        try:
            assert not replica.stale.is_set()
            db.execute("CREATE FEATURE views_1h_by_user AS SELECT user_id, count(*) FROM events "
                       "WHERE action = 'view' GROUP BY user_id WINDOW 1 HOUR")
            until("the replica notices the new declarations", replica.stale.is_set, timeout_s=20.0)
        finally:
            replica.close()


def test_a_follower_that_fails_stops_the_replica_instead_of_serving_a_stale_copy(tmp_path: Path) -> None:
    with _primary(tmp_path / "data") as db:
        replica = Replica(db.data_dir, check_s=0.1)

        def broken() -> int:
            raise OSError("disk I/O error")

        replica.tail.step = broken  # type: ignore[method-assign]  # a fault the file system would cause
        replica.start()
        try:
            until("the replica stops", replica.stale.is_set, timeout_s=20.0)
            assert replica.failed
        finally:
            replica.close()
