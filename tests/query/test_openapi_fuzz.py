"""schemathesis against the whole server's OpenAPI: no input makes any endpoint answer 5xx, input the
schema forbids is refused with a 4xx, and no endpoint declared as keyed answers without the key.

A real `insession serve` process on a loopback port with API keys on, fuzzed by the schemathesis CLI in
every phase: examples, coverage (boundary and schema-violating values), fuzzing (positive and negative
data) and stateful sequences. The fuzzer holds a key with every role as the schema's API-key scheme, so
every endpoint is reached and the cases it sends without a valid key are its own. Checks:
`not_a_server_error`, `negative_data_rejection` (a 413 for a body over its endpoint's limit counts as a
refusal) and `ignored_auth` (a request without the key must get 401). Run against the same server without
keys, the last two fail (ST201, ST401: the schema declares the key even when none is configured). The
server's schema declares no links, so the stateful phase gets two here, what a client does: write an
event or an item, then read that shopper's or item's features.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from insession.serve.process import ServerProcess

from .conftest import events

KEY = "fuzz-key-with-every-role"
FEATURES = "/v1/features/{entity}/{key}"
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
MAX_EXAMPLES = 25  # per operation and phase: ~900 requests, about 10 s of the CLI on 2 busy cores


def _with_links(schema: dict) -> dict:
    """The server's schema plus links from each write to the features of what it wrote."""
    read = schema["paths"][FEATURES]["get"]["operationId"]
    for path, method, entity, field in (("/v1/events", "post", "user", "user_id"),
                                        ("/v1/items", "put", "item", "item_id")):
        ok = schema["paths"][path][method]["responses"]["200"]
        ok["links"] = {f"{entity}_features": {
            "operationId": read, "parameters": {"entity": entity, "key": f"$request.body#/{field}"}}}
    return schema


def test_no_input_gives_a_server_error_and_invalid_input_is_refused(tmp_path: Path) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency (pip install -e '.[test]')"
    (tmp_path / "server.toml").write_text(
        f'[[auth.keys]]\nname = "fuzzer"\nkey = "{KEY}"\nroles = ["ingest", "serve", "analytics", "admin"]\n')
    (tmp_path / "schemathesis.toml").write_text(
        f'[auth.openapi.APIKeyHeader]\napi_key = "{KEY}"\n\n'
        f"[checks.negative_data_rejection]\nexpected-statuses = {json.dumps(REFUSALS)}\n")
    with ServerProcess(tmp_path / "data", extra_args=["--config", str(tmp_path / "server.toml")]) as server:
        auth = {"X-API-Key": KEY}
        assert httpx.get(server.url + "/v1/features/user/u1").status_code == 401  # keys are on
        httpx.put(server.url + "/v1/items", headers=auth,
                  json=[{"item_id": f"i{i}", "category": f"c{i % 3}"} for i in range(40)]).raise_for_status()
        httpx.post(server.url + "/v1/events", headers=auth, json=events(200, 1_790_000_000_000)).raise_for_status()
        schema = httpx.get(server.url + "/openapi.json").json()
        assert {"/v1/query", "/v1/rank", "/v1/events", "/v1/items", "/metrics", FEATURES} <= set(schema["paths"])
        (tmp_path / "openapi.json").write_text(json.dumps(_with_links(schema)))
        run = subprocess.run(
            [st, "--config-file", str(tmp_path / "schemathesis.toml"), "run", str(tmp_path / "openapi.json"),
             "--url", server.url, "--checks", "not_a_server_error,negative_data_rejection,ignored_auth",
             "--phases", "examples,coverage,fuzzing,stateful", "--mode", "all",
             "--max-examples", str(MAX_EXAMPLES), "--seed", "7", "--workers", "1", "--output-truncate", "true"],
            capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        )
    out = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, out
    covered = re.search(r"API Links: +(\d+) covered", run.stdout)
    assert covered is not None and int(covered.group(1)) >= 1, out  # the stateful sequences followed a link
