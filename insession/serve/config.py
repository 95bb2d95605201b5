"""The server config file (TOML or JSON): API keys (`[[auth.keys]]`) and analytics limits (`[query]`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from insession.query import Limits


def load_config(path: str | Path | None) -> dict[str, Any]:
    """The parsed config (empty when no path: auth off, default limits)."""
    if path is None:
        return {}
    path = Path(path)
    text = path.read_text()
    return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)


def query_limits(config: dict[str, Any]) -> Limits | None:
    section = config.get("query")
    return None if section is None else msgspec.convert(section, Limits)
