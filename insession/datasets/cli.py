"""The `insession generate` and `insession import` commands (registered by the top-level CLI)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import typer

from insession.datasets.compare import comparison
from insession.datasets.files import SHARED_SAMPLES, TRENDS_FILE, write_dataset
from insession.datasets.imports import SOURCES, Imported
from insession.datasets.realistic import RealisticShop
from insession.datasets.synthetic import generate_shop


def generate(
    out: Path | None = typer.Option(None, "--out", help="Directory for items.jsonl, events.parquet and "
                                    "sessions.parquet."),
    users: int = typer.Option(500, "--users"),
    items: int = typer.Option(2000, "--items"),
    days: int = typer.Option(14, "--days"),
    events: int | None = typer.Option(None, "--events", help="About this many events (default: ~0.6 "
                                      "sessions per user and day, 1.7 with --realistic)."),
    seed: int = typer.Option(7, "--seed"),
    start: str | None = typer.Option(None, "--start", help="First day, ISO-8601 (naive = UTC); default "
                                     "2026-09-01, fixed so a seed always gives the same shop."),
    realistic: bool = typer.Option(False, "--realistic", help="Sessions calibrated against the real Taobao "
                                   "sample, with surfaces, queries and trends (docs/synthetic.md)."),
    compare: list[str] = typer.Option([], "--compare", help="Instead of writing a shop: print real vs "
                                      "synthetic statistics for these samples under --data (the first sizes "
                                      "the shops), e.g. taobao_userbehavior_head84k."),
    data: Path = typer.Option(SHARED_SAMPLES, "--data", help="Directory of the normalised real samples."),
) -> None:
    """Generate a seeded synthetic shop: catalogue, events in time order, and sessions with their intent."""
    if compare:
        typer.echo(comparison(compare, data, seed))
        return
    if out is None:
        raise typer.BadParameter("say where to write the shop (--out DIR), or pass --compare SAMPLE",
                                 param_hint="--out")
    start_ms = None
    if start is not None:
        first = datetime.fromisoformat(start)
        start_ms = int((first if first.tzinfo else first.replace(tzinfo=UTC)).timestamp() * 1000)
    shop = generate_shop(users, items, days, seed, start_ms=start_ms, target_events=events, realistic=realistic)
    n = write_dataset(out, shop.items, shop.iter_event_tables(), sessions=shop.sessions,
                      total_events=shop.expected_events)
    trends = ""
    if isinstance(shop, RealisticShop):  # where popularity shifts, so an evaluation can mark them
        pq.write_table(shop.trends, out / TRENDS_FILE)
        trends = f", {shop.trends.num_rows} trends"
    typer.echo(f"wrote {len(shop.items)} items, {n} events, {shop.sessions.num_rows} sessions{trends} to {out}")


def import_(
    source: str = typer.Argument(..., help=" | ".join(SOURCES)),
    path: Path = typer.Argument(..., help="The raw file (taobao: UserBehavior.csv; normalised: .parquet or "
                                ".csv[.gz]) or directory (retailrocket: events.csv, category_tree.csv, "
                                "item_properties_part*.csv)."),
    out: Path = typer.Option(..., "--out", help="Directory for items.jsonl and events.parquet."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N valid events of the file."),
) -> None:
    """Import a public dataset's raw files into a dataset directory, mapping its actions onto ours."""
    if source not in SOURCES:
        raise typer.BadParameter(f"expected one of {', '.join(SOURCES)}", param_hint="SOURCE")
    with Imported(source, path, limit) as imported:
        n = write_dataset(out, imported.item_rows(), imported.event_batches(), total_events=imported.n_events)
    typer.echo(f"wrote {n} events to {out} ({imported.skipped} malformed or unmappable rows skipped)")
