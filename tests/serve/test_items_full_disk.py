"""Catalogue upserts on a full disk: refused with 507 (the handle and `PUT /v1/items`), nothing of the
refused batch stored (neither in the catalogue the events are enriched from nor on disk), and the same
batch is stored once space is freed, without a restart. The disk is a real 4 MiB tmpfs."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import insession
from insession.schema import BatchRejected
from insession.serve.app import create_app


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own: a disk that really fills up (as in tests/test_embedded.py)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _items(batch: int, n: int = 50) -> list[dict[str, object]]:
    return [{"item_id": f"b{batch}-{j}", "category": f"c{j % 3}", "subcategory": f"s{j % 7}",
             "name": f"item {j} of batch {batch} " + "x" * 900} for j in range(n)]


def _stored(data: Path) -> set[str]:
    with insession.open(data, maintenance_interval_s=None) as db:
        return {row["item_id"] for row in db.catalog.to_arrow().to_pylist()}


def test_a_full_disk_refuses_item_upserts_with_507_stores_nothing_and_recovers(small_disk: Path) -> None:
    data = small_disk / "data"
    acked: set[str] = set()
    db = insession.open(data, maintenance_interval_s=None)
    try:
        with TestClient(create_app(handle=db), raise_server_exceptions=False) as http:  # what a client sees
            assert http.put("/v1/items", json=_items(0)).status_code == 200  # the catalogue and its WAL exist
            acked |= {row["item_id"] for row in _items(0)}
            filler = small_disk / "filler"
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 96 * 1024))
            refused = None
            for batch in range(1, 200):
                answer = http.put("/v1/items", json=_items(batch))
                if answer.status_code != 200:
                    refused = answer
                    break
                acked |= {row["item_id"] for row in _items(batch)}
            assert refused is not None, "the disk never filled up"
            assert refused.status_code == 507, refused.text
            assert "disk is full" in refused.json()["error"] and str(small_disk) not in refused.text
            assert db.catalog.get(f"b{batch}-0") is None  # events are not enriched from a refused batch
            with pytest.raises(BatchRejected) as again:  # the handle's own verb says the same
                db.insert("items", _items(batch))
            assert again.value.status == 507
            assert all(db.catalog.get(row["item_id"]) is None for row in _items(batch))
            filler.unlink()  # space is freed: the same batch goes through, no restart
            assert http.put("/v1/items", json=_items(batch)).status_code == 200
            acked |= {row["item_id"] for row in _items(batch)}
            assert db.catalog.get(f"b{batch}-0") is not None
    finally:
        db.close()
    assert _stored(data) == acked  # every acknowledged item on disk, nothing of a refused attempt
