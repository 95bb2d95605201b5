"""Validation of events and items: every bad record is named by index and field; good ones normalise."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insession.schema import (
    ACTIONS,
    MAX_BATCH,
    MAX_FUTURE_MS,
    MIN_EPOCH_MS,
    BatchRejected,
    decode_body,
    validate_events,
    validate_items,
)

NOW = 1_790_000_000_000  # 2026-09-21


def ev(**kw: Any) -> dict[str, Any]:
    base = {"user_id": "u1", "item_id": "i1", "action": "view", "ts": NOW - 1000}
    base.update(kw)
    return base


def test_valid_forms_normalise() -> None:
    out = validate_events(
        [
            ev(),
            ev(user_id=42, item_id=7, ts="2026-09-21T10:00:00Z", session_id=3, event_id="e1",
               surface="pdp", properties={"q": "milk", "pos": 3}),
            ev(ts="2026-09-21T10:00:00"),  # naive ISO means UTC
        ],
        now_ms=NOW,
    )
    assert [e.user_id for e in out] == ["u1", "42", "u1"]
    assert out[1].item_id == "7" and out[1].session_id == "3" and out[1].event_id == "e1"
    assert out[1].ts == out[2].ts == 1_789_984_800_000  # 2026-09-21T10:00:00Z
    assert all(e.ingest_ts == NOW and e.category is None for e in out)


def test_iso_and_epoch_ms_agree() -> None:
    a, b = validate_events([ev(ts="2026-09-21T10:00:00+02:00"), ev(ts=1_789_977_600_000)], now_ms=NOW)
    assert a.ts == b.ts == 1_789_977_600_000  # 2026-09-21T08:00:00Z


@pytest.mark.parametrize(
    ("record", "field", "needle"),
    [
        ({"item_id": "i", "action": "view", "ts": NOW}, "user_id", "missing required field"),
        (ev(colour="red"), "colour", "unknown field"),
        (ev(action="teleport"), "action", "Invalid enum value"),
        (ev(ts=1.5), "ts", "Expected"),
        (ev(ts=NOW + MAX_FUTURE_MS + 60_000), "ts", "in the future"),
        (ev(ts=1_700_000_000), "ts", "epoch seconds"),
        (ev(ts="yesterday"), "ts", "not ISO-8601"),
        (ev(user_id=True), "user_id", ""),
        (ev(user_id="x" * 300), "user_id", "characters"),
        (ev(item_id=""), "item_id", "characters"),
        (ev(properties={"k": [1, 2]}), "properties[...]", "Expected"),
        (ev(properties={f"k{i}": i for i in range(100)}), "properties", "at most"),
        ("just a string", "", "Expected `object`"),
    ],
)
def test_each_error_names_index_and_field(record: Any, field: str, needle: str) -> None:
    with pytest.raises(BatchRejected) as info:
        validate_events([ev(), record], now_ms=NOW)
    (err,) = info.value.errors
    assert err.index == 1
    assert err.field == field
    assert needle in err.message
    assert info.value.status == 422


def test_batch_limits() -> None:
    with pytest.raises(BatchRejected) as info:
        validate_events([ev()] * (MAX_BATCH + 1), now_ms=NOW)
    assert info.value.status == 413
    with pytest.raises(BatchRejected, match="empty batch"):
        validate_events([], now_ms=NOW)


def test_items() -> None:
    (item,) = validate_items([{"item_id": 5, "category": "dairy", "price": 1.5}], now_ms=NOW)
    assert (item.item_id, item.category, item.subcategory, item.available) == ("5", "dairy", "dairy", True)
    with pytest.raises(BatchRejected) as info:
        validate_items([{"item_id": 1, "category": "a"}, {"item_id": 2, "category": ""}, {"item_id": 3}])
    assert [(e.index, e.field) for e in info.value.errors] == [(1, "category"), (2, "category")]


def test_decode_body_forms() -> None:
    assert decode_body(b'{"a": 1}', "application/json") == [{"a": 1}]
    assert decode_body(b'[{"a": 1}, {"a": 2}]', None) == [{"a": 1}, {"a": 2}]
    assert decode_body(b'{"a": 1}\n\n{"a": 2}\n', "application/x-ndjson") == [{"a": 1}, {"a": 2}]
    with pytest.raises(BatchRejected) as info:
        decode_body(b'{"a": 1}\n{"a": ', "application/x-ndjson")
    assert info.value.status == 400 and info.value.errors[0].index == 1 and "line 2" in str(info.value)
    with pytest.raises(BatchRejected) as info:
        decode_body(b"[{", "application/json")
    assert info.value.status == 400


def test_decode_body_refuses_any_depth_with_a_400() -> None:
    for body, ctype in ((b"[" * 100_000, None), (b'{"a": 1}\n' + b"[" * 5_000 + b"]" * 5_000, "application/x-ndjson")):
        with pytest.raises(BatchRejected) as info:
            decode_body(body, ctype)
        assert info.value.status == 400 and "nested too deeply" in str(info.value)


@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00", "1960-01-01T00:00:00Z", "1973-03-03T09:46:39.999Z",
           "9999-12-31T23:59:59-01:00", MIN_EPOCH_MS - 1],
)
def test_event_time_is_bounded_the_same_way_in_every_form(ts: str | int) -> None:
    with pytest.raises(BatchRejected) as info:
        validate_events([ev(ts=ts)], now_ms=NOW)
    assert [(e.index, e.field) for e in info.value.errors] == [(0, "ts")]


def test_the_earliest_event_time_is_accepted_in_every_form() -> None:
    for ts in (MIN_EPOCH_MS, "1973-03-03T09:46:40Z", "1973-03-03T10:46:40+01:00"):
        assert validate_events([ev(ts=ts)], now_ms=NOW)[0].ts == MIN_EPOCH_MS


# A mutation that makes a valid record invalid, and the field the error must name.
MUTATIONS: dict[str, tuple[str, Any]] = {
    "drop_user": ("user_id", None),
    "bad_action": ("action", "fly"),
    "future": ("ts", NOW + 10 * MAX_FUTURE_MS),
    "seconds": ("ts", 1_600_000_000),
    "wrong_type_item": ("item_id", 1.25),
    "unknown": ("extra", 1),
    "bad_session": ("session_id", ["s"]),
}

valid_records = st.fixed_dictionaries(
    {
        "user_id": st.one_of(st.text(min_size=1, max_size=20), st.integers(0, 10**9)),
        "item_id": st.one_of(st.text(min_size=1, max_size=20), st.integers(0, 10**9)),
        "action": st.sampled_from(ACTIONS),
        "ts": st.integers(NOW - 10**10, NOW),
    },
    optional={"session_id": st.text(min_size=1, max_size=8), "surface": st.sampled_from(["home", "pdp"])},
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(valid_records, st.one_of(st.none(), st.sampled_from(sorted(MUTATIONS)))),
                min_size=1, max_size=30))
def test_property_errors_are_exactly_the_corrupted_records(batch: list[tuple[dict, str | None]]) -> None:
    records, expected = [], {}
    for i, (rec, mutation) in enumerate(batch):
        rec = dict(rec)
        if mutation is not None:
            field, value = MUTATIONS[mutation]
            if value is None:
                rec.pop(field)
            else:
                rec[field] = value
            expected[i] = field
        records.append(rec)
    if not expected:
        out = validate_events(records, now_ms=NOW)
        assert [e.user_id for e in out] == [str(r["user_id"]) for r in records]
        assert [e.ts for e in out] == [r["ts"] for r in records]
        return
    with pytest.raises(BatchRejected) as info:
        validate_events(records, now_ms=NOW)
    assert {e.index: e.field for e in info.value.errors} == expected
