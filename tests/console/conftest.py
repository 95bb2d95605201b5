"""A real `insession serve` with API keys, a small shop and two model versions, and a headless Chromium.

The server is a child process (`ServerProcess`), filled through the HTTP API. The browser is Debian's
chromium driven by Playwright (`scripts/setup_browser.sh` installs both); the browser tests are skipped,
with the reason, only when Playwright is missing or chromium cannot launch. Page screenshots (test
artefacts) go to `$INSESSION_SCREENSHOTS` when set (`docs/img` refreshes the docs' pictures), else to the
run's temporary directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import torch

from insession.features import default_registry
from insession.model import DualSequenceReranker, Vocab
from insession.model.artefact import save_artefact
from insession.serve.auth import write_config
from insession.serve.process import ServerProcess
from insession.train.plots import plot_curve
from insession.train.trainer import EpochLog

CHROMIUM = "/usr/bin/chromium"
CATEGORIES = ("dairy", "bakery", "produce", "drinks")
N_ITEMS = 48  # i0..i47, 12 per category, in two subcategories each
MINUTE = 60_000


@dataclass
class Console:
    """The running server, its keys by name (admin, viewer: serve, loader: ingest) and the shop's clock."""

    url: str
    keys: dict[str, str]
    now_ms: int

    def post(self, path: str, body: Any, key: str = "admin") -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"X-API-Key": self.keys[key]}, timeout=30)


def catalogue() -> list[dict[str, Any]]:
    return [
        {"item_id": f"i{n}", "category": CATEGORIES[n // 12], "subcategory": f"{CATEGORIES[n // 12]}-{n // 6 % 2}",
         "price": 1.0 + n}
        for n in range(N_ITEMS)
    ]


def shop_events(now_ms: int) -> list[dict[str, Any]]:
    """u1..u8 browse a category each (history two days ago); u0 has a history in dairy and a session now
    in bakery with a cart; co-visits tie i12 (bakery) to i13..i15."""
    events = []
    t = now_ms - 2 * 24 * 60 * MINUTE
    for u in range(1, 9):
        for n in range(10):
            item = 12 * (u % 4) + (n * 5 + u) % 12
            events.append({"user_id": f"u{u}", "item_id": f"i{item}", "action": "view", "ts": t})
            t += MINUTE
        events.append({"user_id": f"u{u}", "item_id": "i12", "action": "view", "ts": t})
        events.append({"user_id": f"u{u}", "item_id": f"i{13 + u % 3}", "action": "add_to_cart", "ts": t + MINUTE})
        t += 5 * MINUTE
    for n in range(20):  # u0's history: dairy, a day ago
        events.append({"user_id": "u0", "item_id": f"i{n % 12}", "action": "view" if n % 5 else "add_to_cart",
                       "ts": now_ms - 24 * 60 * MINUTE + n * MINUTE})
    for n, (item, action) in enumerate((("i12", "view"), ("i13", "view"), ("i13", "add_to_cart"), ("i20", "view"))):
        events.append({"user_id": "u0", "item_id": item, "action": action, "ts": now_ms - (10 - n) * MINUTE})
    return events


def save_model(models: Path, version: str, seed: int) -> None:
    """A seeded, untrained tiny ReRanker over the catalogue as an artefact, with a training-curve figure."""
    rows = catalogue()
    vocab = Vocab.build(pa.array([r["item_id"] for r in rows]), pa.array([r["category"] for r in rows]),
                        pa.array([r["subcategory"] for r in rows]))
    torch.manual_seed(seed)
    cfg = vocab.config(dim=32, n_heads=2, n_layers=1, dropout=0.0, max_history=50, max_session=20)
    path = save_artefact(models / version, DualSequenceReranker(cfg).eval(), vocab, default_registry().hash(),
                         {"val_ndcg10": 0.3 + seed / 100, "epochs": 3, "seed": seed})
    epochs = [EpochLog(e, 100, 1.0 / e, 0.2 + 0.05 * e + seed / 100, 0.4, 1.0, 100.0) for e in (1, 2, 3)]
    plot_curve(epochs, path / "curve.png", title=f"ReRanker {version}")


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    data = tmp_path_factory.mktemp("console")
    save_model(data / "db" / "models", "v1", seed=1)
    save_model(data / "db" / "models", "v2", seed=2)  # the newest: it serves from the start
    config = data / "server.toml"
    keys = write_config(config, {"admin": ["admin"], "viewer": ["serve"], "loader": ["ingest"]})
    # eager PyTorch: no ONNX export of each version at start and reload (15-30 s of a test worker's CPU);
    # nothing the console shows depends on the backend
    config.write_text(config.read_text() + '\n[rank]\nbackend = "torch"\n')
    now_ms = int(time.time() * 1000)
    with ServerProcess(data / "db", extra_args=["--config", str(config)]) as srv:
        c = Console(srv.url, keys, now_ms)
        items = httpx.put(srv.url + "/v1/items", json=catalogue(), headers={"X-API-Key": keys["loader"]}, timeout=30)
        assert items.status_code == 200, items.text
        assert c.post("/v1/events", shop_events(now_ms), key="loader").status_code == 200
        yield c


@pytest.fixture(scope="package")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save page screenshots (test artefacts)."""
    chosen = os.environ.get("INSESSION_SCREENSHOTS")
    if not chosen:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: run scripts/setup_browser.sh")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Exception as e:  # no chromium, or it cannot start here
            pytest.skip(f"chromium cannot launch from {CHROMIUM} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "run scripts/setup_browser.sh")
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own session storage) at 1280 px; `page.errors` collects console errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.errors = []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    yield tab
    context.close()
