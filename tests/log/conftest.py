"""Shared helpers for the event-log tests: seeded events."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from insession.schema import Event

T0 = 1_763_800_000_000  # 2025-11-22 in epoch ms
DAY_MS = 86_400_000


def make_event(i: int, event_id: str | None = None, *, day: int = 0) -> Event:
    """A deterministic event; `i` also lands in properties so a stored event can be traced back."""
    return Event(
        user_id=f"u{i % 13}",
        item_id=f"i{i % 101}",
        action=("view", "add_to_cart", "purchase")[i % 3],
        ts=T0 + day * DAY_MS + i * 1000,
        event_id=event_id,
        session_id=f"s{i % 5}" if i % 2 else None,
        surface="home" if i % 4 else None,
        properties={"i": i, "q": "shoes"} if i % 3 else None,
        category=f"c{i % 4}",
        subcategory=f"sc{i % 8}",
        ingest_ts=T0 + i,
    )


@pytest.fixture
def ev() -> Callable[..., Event]:
    return make_event
