"""The dependency rules of docs/architecture.md, as import-linter contracts (pyproject.toml) checked here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(capsys: pytest.CaptureFixture[str]) -> None:
    from importlinter.cli import lint_imports

    status = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert status == 0, capsys.readouterr().out


def test_the_contracts_cover_the_documented_rules() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = {(s, f) for c in contracts if c["type"] == "forbidden"
                 for s in c["source_modules"] for f in c["forbidden_modules"]}
    rules = [
        *((s, f) for s in ("insession.features", "insession.log")
          for f in ("insession.rank", "insession.serve", "insession.model")),
        ("insession.rank", "insession.train"),
        ("insession.rank", "insession.evaluate"),
        ("insession.train", "insession.evaluate"),
        *(("insession.model", f"insession.{m}") for m in ("features", "log", "query", "rank", "serve", "train",
                                                           "evaluate", "datasets", "embedded")),
    ]
    assert not [r for r in rules if r not in forbidden]
