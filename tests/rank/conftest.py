"""Fixtures of the ranking tests: a filled shop and a ranker over it with a seeded tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from insession.features import FeatureEngine, default_registry
from insession.log.catalog import Catalog
from insession.rank import RankConfig, Ranker

from .shop import Shop, fill, items


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.upsert(items())
    s = Shop(catalog, FeatureEngine(default_registry()), tmp_path / "models")
    fill(s)
    yield s
    catalog.close()


@pytest.fixture
def ranker(shop: Shop) -> Iterator[Ranker]:
    shop.artefact("v1", seed=1)
    r = Ranker(shop.features, shop.catalog, shop.model_dir, RankConfig(budget_ms=5_000, backend="torch"))
    yield r
    r.close()
