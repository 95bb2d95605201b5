"""The dataset directory: `generate` and `import` (run through typer) write it, `load_dir` reads it."""

from __future__ import annotations

import pyarrow.parquet as pq
import typer
from typer.testing import CliRunner

from insession.datasets import generate_shop, load_dir, write_dataset
from insession.datasets.cli import generate, import_
from insession.schema import validate_events, validate_items


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("generate")(generate)
    app.command("import")(import_)
    return app


def _check_dir(d, n_items: int) -> list[dict]:
    items, batches = load_dir(d)
    assert len(items) == n_items
    validate_items(items, now_ms=0)
    events: list[dict] = []
    for batch in batches:
        assert 0 < len(batch) <= 1000
        events.extend(batch)
    assert len(events) == pq.ParquetFile(d / "events.parquet").metadata.num_rows
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    validate_events(events[:10_000], now_ms=events[-1]["ts"] + 1)
    return events


def test_generate_command_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "shop"
    result = CliRunner().invoke(_app(), ["generate", "--out", str(out), "--users", "60", "--items", "300",
                                         "--days", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    events = _check_dir(out, 300)
    shop = generate_shop(60, 300, 3, 2)
    assert events == list(shop.iter_events())  # the files hold exactly the shop
    assert pq.read_table(out / "sessions.parquet").equals(shop.sessions)
    assert all(shop.intent_of[e["session_id"]] == e["properties"]["intent"] for e in events)


def test_generate_command_sizes_and_start(tmp_path):
    out = tmp_path / "big"
    result = CliRunner().invoke(_app(), ["generate", "--out", str(out), "--users", "400", "--items", "300",
                                         "--days", "2", "--events", "5000", "--start", "2026-01-05"])
    assert result.exit_code == 0, result.output
    ts = pq.read_table(out / "events.parquet", columns=["ts"])["ts"].to_pylist()
    assert abs(len(ts) - 5000) < 500
    assert min(ts) >= 1767571200000  # 2026-01-05T00:00:00Z


def test_import_command(tmp_path):
    raw = tmp_path / "UserBehavior.csv"
    raw.write_text("1,100,10,pv,1511544070\n1,101,10,cart,1511544080\nbroken\n2,103,12,buy,1511544000\n")
    out = tmp_path / "tb"
    result = CliRunner().invoke(_app(), ["import", "taobao", str(raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 malformed" in result.output
    events = _check_dir(out, 3)
    assert [e["action"] for e in events] == ["purchase", "view", "add_to_cart"]
    result = CliRunner().invoke(_app(), ["import", "nope", str(raw), "--out", str(out)])
    assert result.exit_code != 0


def test_empty_dataset_round_trip(tmp_path):
    assert write_dataset(tmp_path, [], iter([])) == 0
    items, batches = load_dir(tmp_path)
    assert items == [] and list(batches) == []
