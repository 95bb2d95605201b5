"""The typed server config: every setting reachable from the file, typos and bad values refused by name and
line, the reference doc generated from the types, and `insession serve` refusing to start on either."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from insession.cli import app as cli
from insession.query import Limits
from insession.rank import RankConfig
from insession.rank.candidates import CandidateQuotas
from insession.rank.hygiene import HygieneRules
from insession.serve.config import (
    Config,
    ConfigError,
    FeaturesConfig,
    HygieneConfig,
    QueryConfig,
    QuotasConfig,
    RankingConfig,
    load_config,
    parse_config,
    reference_markdown,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

EVERYTHING = """\
[server]
host = "127.0.0.2"
port = 9001
maintenance_interval_s = 2.5
gil_switch_ms = 1.5

[[auth.keys]]
name = "shop"
key = "secret-shop"
roles = ["serve", "ingest"]

[query]
concurrency = 3
queue = 2
threads = 2
nice = 0
timeout_s = 4
memory_limit = "256MB"
max_rows = 50
max_bytes = 4096
retry_after_s = 3
items_ttl_s = 0.5
yield_lag_ms = 12.5

[rank]
budget_ms = 40
max_budget_ms = 500
max_candidates = 100
default_k = 7
explain_items = 2
explain_events = 1
model_threads = 3
popular_ttl_s = 30
backend = "torch"
torch_threads = 0

[rank.hygiene]
max_category_share = 0.3
replenishable = ["milk"]

[rank.quotas]
n = 40
session = 10
search = 4
covisit = 10
history = 10
category = 10

[http]
ingest_max_bytes = 1000
query_max_bytes = 2000
rank_max_bytes = 3000
other_max_bytes = 4000
large_body_bytes = 500
large_bodies_per_client = 3

[features]
snapshot_interval_s = 30
max_users = 1000
partitions = 8
"""


def _error(text: str, kind: str = "toml") -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, kind, name="server." + kind)  # type: ignore[arg-type]
    return str(e.value)


def test_every_setting_is_read_from_the_file() -> None:
    cfg = parse_config(EVERYTHING)
    assert (cfg.server.host, cfg.server.port, cfg.server.maintenance_interval_s, cfg.server.gil_switch_ms) == (
        "127.0.0.2", 9001, 2.5, 1.5)
    assert [(k.name, k.roles) for k in cfg.auth.keys] == [("shop", ["serve", "ingest"])]
    assert cfg.query.limits() == Limits(concurrency=3, queue=2, threads=2, nice=0, timeout_s=4.0,
                                        memory_limit="256MB", max_rows=50, max_bytes=4096, retry_after_s=3,
                                        items_ttl_s=0.5, yield_lag_ms=12.5)
    assert cfg.rank.rank_config() == RankConfig(
        budget_ms=40, max_budget_ms=500, max_candidates=100, default_k=7, explain_items=2, explain_events=1,
        hygiene=HygieneRules(0.3, frozenset({"milk"})), quotas=CandidateQuotas(
            n=40, session=10, search=4, covisit=10, history=10, category=10),
        model_threads=3, popular_ttl_s=30, backend="torch", torch_threads=None,
    )
    assert [cfg.http.limit_for(p) for p in ("/v1/events", "/v1/items", "/v1/query", "/v1/rank", "/v1/admin/reload",
                                            "/healthz")] == [1000, 1000, 2000, 3000, 4000, 4000]
    assert (cfg.http.large_body_bytes, cfg.http.large_bodies_per_client) == (500, 3)
    assert cfg.features == FeaturesConfig(snapshot_interval_s=30.0, max_users=1000, partitions=8)


def test_defaults_are_the_services_own() -> None:
    cfg = Config()
    assert cfg.query.limits() == Limits()
    assert cfg.rank.rank_config() == RankConfig()
    assert cfg.features == FeaturesConfig(snapshot_interval_s=60.0, max_users=0, partitions=16)
    assert not cfg.auth.keys and cfg.server.host == "127.0.0.1"
    assert cfg.server.gil_switch_ms == 5.0 == sys.getswitchinterval() * 1000  # Python's own: a change is chosen


@pytest.mark.parametrize(
    ("section", "settings"),
    [
        (QueryConfig, [f.name for f in msgspec.structs.fields(Limits)]),
        (RankingConfig, [f.name for f in dataclasses.fields(RankConfig)]),
        (HygieneConfig, [f.name for f in dataclasses.fields(HygieneRules)]),
        (QuotasConfig, [f.name for f in dataclasses.fields(CandidateQuotas)]),
    ],
)
def test_every_service_setting_has_a_config_key(section: type[msgspec.Struct], settings: list[str]) -> None:
    """A setting added to the service but not to the config file would be unreachable for operators."""
    assert sorted(f.name for f in msgspec.structs.fields(section)) == sorted(settings)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[auth.key]]\nname = "a"\nkey = "k"\nroles = ["serve"]\n', "server.toml:1: unknown key 'auth.key'; "
         "allowed in [auth]: keys"),
        ('[[auths.keys]]\nname = "a"\n', "server.toml:1: unknown key 'auths'"),
        ('[[Auth.keys]]\nname = "a"\n', "server.toml:1: unknown key 'Auth'"),
        ("[server]\nport = 1\n\n[querry]\ntimeout_s = 1\n", "server.toml:4: unknown key 'querry'; allowed in the "
         "top level: server, auth, query, rank, http, features"),
        ('[query]\nqueue = 1\ntimeout = 3\n', "server.toml:3: unknown key 'query.timeout'; allowed in [query]: "
         "concurrency, queue"),
        ('[query]\nqueue = "many"\n', "server.toml:2: query.queue: Expected `int`, got `str` (allowed: integer >= 0)"),
        ("[query]\nconcurrency = 0\n", "server.toml:2: query.concurrency: Expected `int` >= 1"),
        ('[query]\nmemory_limit = "lots"\n', "server.toml:2: query.memory_limit"),
        ("[rank.hygiene]\nmax_category_share = 2\n", "server.toml:2: rank.hygiene.max_category_share: Expected "
         "`float` <= 1.0"),
        ('[rank]\nbackend = "tpu"\n', 'server.toml:2: rank.backend: Invalid enum value \'tpu\' (allowed: one of '
         '"onnx", "torch")'),
        ('[[auth.keys]]\nname = "a"\nkey = "k"\nroles = ["serve"]\n\n[[auth.keys]]\nname = "b"\nkey = "k2"\n'
         'roles = ["root"]\n', "server.toml:9: auth.keys[1].roles[0]: Invalid enum value 'root'"),
        ('[[auth.keys]]\nname = "a"\nroles = ["serve"]\n', "server.toml:1: auth.keys[0]: key 'a': give exactly "
         "one of key or sha256"),
        ("[features]\npartitions = 0\n", "server.toml:2: features.partitions: Expected `int` >= 1"),
        ("[server]\ngil_switch_ms = 0\n", "server.toml:2: server.gil_switch_ms: Expected `float` > 0.0"),
        ("[server]\ngil_switch_ms = 500\n", "server.toml:2: server.gil_switch_ms: Expected `float` <= 100.0"),
        ('[features]\nsnapshot_writer = "standbye"\n', 'server.toml:2: features.snapshot_writer: Invalid enum value '
         '\'standbye\' (allowed: one of "server", "standby")'),
        ('[log]\nurl = "nats://n:4222"\n[features]\nsnapshot_writer = "standby"\n', '[features] snapshot_writer = '
         '"standby" reads the embedded log'),
        ('[log]\nurl = "nats://n:4222"\n[server]\nreader_port = 9001\n', "[server] reader_port: the feature reader "
         "follows the embedded log"),
        ("[server]\nport = 9001\nreader_port = 9001\n", "[server] reader_port 9001 is the server's own port"),
        ("[server]\nreader_port = 70000\n", "server.toml:2: server.reader_port: Expected `int` <= 65535"),
        ("[server\nport = 1\n", "server.toml: not valid TOML"),
        ('[cluster]\nnodes = ["http://a:8000"]\nnode = "http://a:8000"\n', "server.toml: (top level): [cluster] "
         "nodes share one replicated log: set [log] url"),
        ('[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = ["http://a:8000", "http://b:8000"]\nnode = "http://c:8000"\n',
         "server.toml:3: cluster: `node` ('http://c:8000') must be one of `nodes`"),
        ('[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = ["http://a:8000", "http://a:8000"]\nnode = "http://a:8000"\n',
         "lists a URL twice"),
        ('[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = ["http://a:8000/x"]\nnode = "http://a:8000/x"\n',
         "server.toml:4: cluster.nodes[0]: Expected `str` matching regex"),
        ('[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = ["http://a:8000"]\nnode = "http://a:8000"\ncopies = 2\n',
         "`copies` (2) cannot exceed the 1 nodes"),
        ('[cluster]\ncopies = 2\n', "`node` and `copies` need `nodes`"),
        ('[log]\nurl = "nats://n:4222"\n[features]\npartitions = 1\n[cluster]\nnodes = ["http://a:1", "http://b:1"]\n'
         'node = "http://b:1"\ncopies = 1\n', "gives node 'http://b:1' none of the 1 partitions"),
    ],
)
def test_bad_toml_is_refused_naming_the_key_line_and_what_is_allowed(text: str, says: str) -> None:
    assert says in _error(text)


def test_bad_json_is_refused_naming_the_key() -> None:
    text = json.dumps({"auth": {"key": [{"name": "a", "key": "k", "roles": ["serve"]}]}}, indent=1)
    message = _error(text, "json")
    assert "unknown key 'auth.key'; allowed in [auth]: keys" in message and message.startswith("server.json:3:")
    assert "not valid JSON" in _error('{"auth": ', "json")


def test_files_other_than_toml_or_json_are_refused(tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text("auth: {}")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        load_config(tmp_path / "server.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_the_reference_doc_is_generated_from_the_types() -> None:
    assert DOC.read_text() == reference_markdown() + "\n", "regenerate: python -m insession.serve.config > " + str(
        DOC.relative_to(DOC.parents[1])
    )
    for key in ("`insecure_no_auth`", "`memory_limit`", "`max_category_share`", "`ingest_max_bytes`",
                "`snapshot_interval_s`", "`max_users`", "`partitions`", "[[auth.keys]]"):
        assert key in DOC.read_text()


def test_serve_stops_on_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[[auth.key]]\nname = "a"\nkey = "k"\nroles = ["serve"]\n')
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d"), "--config", str(path)])
    assert result.exit_code == 2
    assert "server.toml:1: unknown key 'auth.key'" in result.output
    assert not (tmp_path / "d").exists()  # refused before anything was opened


def test_serve_refuses_a_reader_on_the_port_given_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[server]\nreader_port = 18777\n")
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d"), "--config", str(path),
                                      "--port", "18777"])
    assert result.exit_code == 2, result.output
    assert "reader_port 18777 is the server's own port" in result.output
    assert not (tmp_path / "d").exists()


def test_serve_refuses_a_non_loopback_host_without_keys(tmp_path: Path) -> None:
    for args in (["--host", "0.0.0.0"], ["--host", "::"], ["--host", "shop.example"]):
        result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d"), *args])
        assert result.exit_code == 2, result.output
        assert "refusing to serve" in result.output and "--insecure-no-auth" in result.output
    path = tmp_path / "server.toml"
    path.write_text('[server]\nhost = "0.0.0.0"\n')
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d"), "--config", str(path)])
    assert result.exit_code == 2 and "refusing to serve 0.0.0.0" in result.output


def test_serve_refuses_a_data_directory_in_use_with_one_line(tmp_path: Path) -> None:
    """Opened before the app starts: the refusal is the message and exit code 3, not a startup traceback."""
    import insession

    with insession.open(tmp_path / "d", maintenance_interval_s=None):
        result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 3, result.output
    assert result.output.startswith("error: ") and "one insession per data directory" in result.output
    assert "Traceback" not in result.output


def test_the_cluster_layout_holds_each_partition_copies_times_and_is_the_same_from_every_node() -> None:
    nodes = ["http://a:8000", "http://b:8000", "http://c:8000"]
    layouts = [parse_config(f'[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = {nodes!r}\nnode = "{me}"\ncopies = 2\n'
                            .replace("'", '"')).cluster for me in nodes]
    held = [c.held(16) for c in layouts]
    assert all(h is not None and len(h) in (10, 11) for h in held)
    assert all(sum(p in h for h in held if h is not None) == 2 for p in range(16))
    assert all(c.holders(p) == layouts[0].holders(p) for c in layouts for p in range(16))
    assert all(nodes[i] in layouts[0].holders(p) for i, h in enumerate(held) if h is not None for p in h)
    everywhere = parse_config('[log]\nurl = "nats://n:4222"\n[cluster]\nnodes = ["http://a:1", "http://b:1"]\n'
                              'node = "http://a:1"\n').cluster
    assert everywhere.held(16) is None and everywhere.holders(3) == ["http://b:1", "http://a:1"]
