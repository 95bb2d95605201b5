"""schemathesis against the whole server's OpenAPI: no input makes any endpoint answer 5xx.

A real `insession serve` process on a loopback port, fuzzed by the schemathesis CLI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from insession.serve.process import ServerProcess

from .conftest import events


def test_no_input_gives_a_server_error(tmp_path: Path) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency (pip install -e '.[test]')"
    with ServerProcess(tmp_path / "data") as server:
        httpx.put(server.url + "/v1/items", json=[{"item_id": f"i{i}", "category": f"c{i % 3}"} for i in range(40)])
        httpx.post(server.url + "/v1/events", json=events(200, 1_790_000_000_000))
        paths = set(httpx.get(server.url + "/openapi.json").json()["paths"])
        assert {"/v1/query", "/v1/rank", "/v1/events", "/v1/items", "/metrics"} <= paths
        run = subprocess.run(
            [st, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "25", "--seed", "7", "--workers", "1"],
            capture_output=True, text=True, timeout=900, check=False,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
