"""Data to run on: seeded synthetic shops (the easy default; `realistic=True`, calibrated against the real Taobao
sample by `stats.measure`, docs/synthetic.md), importers for public datasets, and the dataset directory layout.

A dataset directory holds `items.jsonl` (ItemIn wire form), `events.parquet` (EventIn columns, ts in epoch
ms, extra columns become properties, time order) and, for synthetic shops, `sessions.parquet` (intents).
"""

from insession.datasets.files import events_from_table, load_dir, write_dataset
from insession.datasets.imports import SOURCES, Imported, read
from insession.datasets.synthetic import DEFAULT_START_MS, Shop, generate_shop

__all__ = ["DEFAULT_START_MS", "SOURCES", "Imported", "Shop", "events_from_table", "generate_shop",
           "load_dir", "read", "write_dataset"]
