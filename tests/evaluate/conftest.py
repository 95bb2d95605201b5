"""A tiny seeded synthetic shop shared by the evaluation tests (built once per session)."""

from __future__ import annotations

import pytest

from insession.evaluate.data import Dataset, load_synthetic
from insession.evaluate.split import TimeSplit, requests
from insession.train.replay import CandidateSets, build_candidates


@pytest.fixture(scope="session")
def shop() -> Dataset:
    return load_synthetic(users=40, items=240, days=5, seed=3)


@pytest.fixture(scope="session")
def split(shop: Dataset) -> TimeSplit:
    return TimeSplit.of(shop.events, 0.2, 0.2)


@pytest.fixture(scope="session")
def sets(shop: Dataset, split: TimeSplit) -> CandidateSets:
    return build_candidates(shop.events, shop.items, requests(shop.events, split), progress=False)
