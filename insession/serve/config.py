"""The server config file (TOML or JSON), typed: every setting `insession serve` has, and its default.

`load_config(path)` returns a `Config`; an unknown section or key, a wrong type or an invalid value
raises `ConfigError` naming the key, its line in the file (TOML; JSON where the key can be found) and
what is allowed, so a typo can never leave a setting (API keys above all) silently at its default.
`reference_markdown()` renders docs/configuration.md from these types (a test keeps the doc current).

Sections: `[server]` (listening, exposure, maintenance), `[[auth.keys]]` (API keys with roles),
`[query]` (analytics lane limits), `[rank]` with `[rank.hygiene]` and `[rank.quotas]` (ranking service),
`[http]` (request body limits per endpoint), `[features]` (feature engine sizing), `[log]` (the embedded
event log, or a replicated JetStream stream: `insession.log.LogConfig`), `[cluster]` (the nodes serving one
replicated log and the partitions each holds).
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from insession.embedded import SnapshotWriter
from insession.log.base import LogConfig
from insession.query import Limits
from insession.rank import RankConfig
from insession.rank.candidates import CandidateQuotas
from insession.rank.hygiene import HygieneRules
from insession.schema import MAX_BODY_BYTES
from insession.serve.auth import KeySpec

KiB = 1024
MiB = 1024 * KiB
_LIMITS = Limits()
_SIZE = r"^[0-9]+(\.[0-9]+)? *([KkMmGgTt][Ii]?)?[Bb]$"  # a memory size as DuckDB reads it: 512MB, 1.5GB, 2GiB


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file, line, key and what is allowed."""


def _text(description: str, **constraints: Any) -> Meta:
    return Meta(description=description, **constraints)


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[server]`: where to listen and whether exposure without API keys is accepted."""

    host: Annotated[str, _text("address to bind (`--host` overrides)", min_length=1)] = "127.0.0.1"
    port: Annotated[int, _text("TCP port (`--port` overrides)", ge=0, le=65535)] = 8000
    insecure_no_auth: Annotated[
        bool,
        _text("serve a non-loopback host without API keys (refused otherwise; `--insecure-no-auth` sets it)"),
    ] = False
    maintenance_interval_s: Annotated[
        float, _text("seconds between background export/snapshot rounds", gt=0)
    ] = 5.0
    gil_switch_ms: Annotated[
        float,
        _text("how long a thread of the server may hold the GIL while another waits for it "
              "(`sys.setswitchinterval`; Python's own is 5): a request waits this long behind background work "
              "at each hand-over", gt=0, le=100),
    ] = 5.0
    reader_port: Annotated[
        int,
        _text("a feature reader process serves GET /v1/features/..., POST /v1/features and POST /v1/rank on this "
              "port, from its own copy of the state (a second core for reads, another copy of the state in memory; "
              "0: none; the embedded log only)",
              ge=0, le=65535),
    ] = 0


class AuthConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[auth]`: API keys. No key: access control is off (and only loopback may be bound)."""

    keys: Annotated[list[KeySpec], _text("`[[auth.keys]]` tables, one per key")] = []


class QueryConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[query]`: the analytics lane's limits (`insession.query.Limits`; the serving lane has none to set)."""

    concurrency: (
        Annotated[int, _text("analytics queries running at once (default: a quarter of the cores, at least 1)", ge=1)]
        | None
    ) = None
    queue: Annotated[int, _text("analytics queries waiting beyond those; one more gets 429", ge=0)] = _LIMITS.queue
    threads: (
        Annotated[int, _text("DuckDB threads per analytics query (default: a quarter of the cores, at least 1)", ge=1)]
        | None
    ) = None
    nice: Annotated[int, _text("added to the analytics threads' OS niceness (0 leaves it)", ge=0, le=19)] = (
        _LIMITS.nice
    )
    idle_cpu: Annotated[bool, _text("the analytics and export workers run under SCHED_IDLE (Linux): they get CPU "
                                    "only when serving leaves some")] = _LIMITS.idle_cpu
    yield_lag_ms: Annotated[
        float,
        _text("serving first: the running analytics queries pause while the server wakes on average more than "
              "this late (ms, over 100 ms); 0 turns pausing off", ge=0),
    ] = _LIMITS.yield_lag_ms
    timeout_s: Annotated[
        float, _text("per query, from the moment it starts running (time paused for serving not counted)", gt=0)
    ] = _LIMITS.timeout_s
    memory_limit: Annotated[
        str,
        _text("per query (DuckDB memory_limit), e.g. 512MB or 2GB", pattern=_SIZE),
    ] = _LIMITS.memory_limit
    max_rows: Annotated[int, _text("rows returned at most (more: truncated)", ge=1)] = _LIMITS.max_rows
    max_bytes: Annotated[int, _text("Arrow bytes returned at most (more: truncated)", ge=1)] = _LIMITS.max_bytes
    retry_after_s: Annotated[int, _text("told to a client refused with 429", ge=0)] = _LIMITS.retry_after_s
    items_ttl_s: Annotated[
        float, _text("the items table is re-read from the catalogue at most this often", ge=0)
    ] = _LIMITS.items_ttl_s
    worker_memory: (
        Annotated[
            str,
            _text("each analytics worker's address-space cap (default: memory_limit + 768MiB + 64MiB per thread)",
                  pattern=_SIZE),
        ]
        | None
    ) = None

    def limits(self) -> Limits:
        """The analytics lane's `Limits` (unset fields keep Limits' own defaults)."""
        given = {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}
        return Limits(**given)


class HygieneConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[rank.hygiene]`: what every served list respects."""

    max_category_share: Annotated[
        float, _text("largest share of a list one category may take", gt=0, le=1)
    ] = HygieneRules.max_category_share
    replenishable: Annotated[
        list[str], _text("categories or subcategories that may be recommended again after a purchase")
    ] = []


class QuotasConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[rank.quotas]`: how many proposals each candidate source may contribute."""

    n: Annotated[int, _text("proposals in all", ge=1)] = CandidateQuotas.n
    session: Annotated[int, _text("from the current session", ge=0)] = CandidateQuotas.session
    search: Annotated[
        int, _text("results of the session's searches (unused slots are not passed on)", ge=0)
    ] = CandidateQuotas.search
    covisit: Annotated[int, _text("co-visited with the session's items", ge=0)] = CandidateQuotas.covisit
    history: Annotated[int, _text("from the shopper's history", ge=0)] = CandidateQuotas.history
    category: Annotated[int, _text("popular in the shopper's categories", ge=0)] = CandidateQuotas.category


class RankingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[rank]`: the ranking service (`insession.rank.RankConfig`)."""

    budget_ms: Annotated[float, _text("default per-request deadline", gt=0)] = RankConfig.budget_ms
    max_budget_ms: Annotated[float, _text("largest deadline a request may ask for", gt=0)] = RankConfig.max_budget_ms
    max_candidates: Annotated[int, _text("candidates a request may send", ge=1)] = RankConfig.max_candidates
    default_k: Annotated[int, _text("items returned when a request gives no k", ge=1)] = RankConfig.default_k
    explain_items: Annotated[int, _text("top items that get an explanation", ge=0)] = RankConfig.explain_items
    explain_events: Annotated[int, _text("events per side in each explanation", ge=0)] = RankConfig.explain_events
    model_threads: Annotated[int, _text("concurrent model passes", ge=1)] = RankConfig.model_threads
    popular_ttl_s: Annotated[
        float, _text("how often the per-category popular lists are rebuilt", gt=0)
    ] = RankConfig.popular_ttl_s
    backend: Annotated[
        Literal["onnx", "torch"], _text("onnx: ONNX Runtime once exported (eager until then); torch: eager only")
    ] = "onnx"
    torch_threads: Annotated[
        int, _text("torch intra-op threads for the process (0 leaves torch's own setting)", ge=0)
    ] = 1
    hygiene: Annotated[HygieneConfig, _text("`[rank.hygiene]`")] = msgspec.field(default_factory=HygieneConfig)
    quotas: Annotated[QuotasConfig, _text("`[rank.quotas]`")] = msgspec.field(default_factory=QuotasConfig)

    def rank_config(self) -> RankConfig:
        """The ranking service's `RankConfig`."""
        h, q = self.hygiene, self.quotas
        return RankConfig(
            budget_ms=self.budget_ms,
            max_budget_ms=self.max_budget_ms,
            max_candidates=self.max_candidates,
            default_k=self.default_k,
            explain_items=self.explain_items,
            explain_events=self.explain_events,
            hygiene=HygieneRules(h.max_category_share, frozenset(h.replenishable)),
            quotas=CandidateQuotas(n=q.n, session=q.session, search=q.search, covisit=q.covisit, history=q.history,
                                   category=q.category),
            model_threads=self.model_threads,
            popular_ttl_s=self.popular_ttl_s,
            backend=self.backend,
            torch_threads=self.torch_threads or None,
        )


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[http]`: request body limits, enforced before a body is buffered (413 above them)."""

    ingest_max_bytes: Annotated[
        int, _text("body of `POST /v1/events` and `PUT /v1/items`", ge=1)
    ] = MAX_BODY_BYTES
    query_max_bytes: Annotated[int, _text("body of `POST /v1/query`", ge=1)] = 1 * MiB
    rank_max_bytes: Annotated[int, _text("body of `POST /v1/rank`", ge=1)] = 1 * MiB
    other_max_bytes: Annotated[int, _text("body of any other request (admin, health, docs)", ge=1)] = 64 * KiB
    large_body_bytes: Annotated[
        int, _text("a body announced above this (or chunked) is large: see large_bodies_per_client", ge=1)
    ] = 1 * MiB
    large_bodies_per_client: Annotated[
        int, _text("large bodies one client address may send at once; one more gets 429", ge=1)
    ] = 4

    def limit_for(self, path: str) -> int:
        """The body limit of a request path."""
        if path in ("/v1/events", "/v1/items"):
            return self.ingest_max_bytes
        if path in ("/v1/query", "/v1/features"):
            return self.query_max_bytes
        if path == "/v1/rank":
            return self.rank_max_bytes
        return self.other_max_bytes


class FeaturesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[features]`: the online feature engine's sizing."""

    snapshot_interval_s: Annotated[
        float, _text("at most one feature-state snapshot this often (only when the state changed)", gt=0)
    ] = 60.0
    max_users: Annotated[int, _text("shoppers kept in online state at most (0: no cap)", ge=0)] = 0
    partitions: Annotated[int, _text("partitions of the online state", ge=1)] = 16
    snapshot_writer: Annotated[
        SnapshotWriter,
        _text("who writes the snapshots: this process, or a standby process with its own copy of the state "
              "(no snapshot work on serving's GIL, twice the memory; the embedded log only)"),
    ] = "server"


_NODE_URL = r"^https?://[^/?#\s]+$"  # scheme and host[:port], no path: a node's base URL


class ClusterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`[cluster]`: the insession nodes serving one replicated log, and which partitions each holds.

    Partition p is held by `nodes[(p + j) % len(nodes)]` for j < `copies`: the same rule, computed from
    the same list on every node, so every node knows where each shopper lives without asking. A request
    for a shopper this node does not hold is forwarded to a node that does (docs/cluster.md)."""

    nodes: Annotated[
        list[Annotated[str, _text("a node's base URL", pattern=_NODE_URL)]],
        _text("every node's base URL as the others reach it, the same list in the same order on every node "
              "(`http://a:8000`); empty: this node alone holds every partition"),
    ] = []
    node: Annotated[str, _text("this node's own URL: one of `nodes`")] = ""
    copies: Annotated[
        int, _text("how many nodes hold each partition (0: every node holds every partition)", ge=0)
    ] = 0
    forward_timeout_s: Annotated[
        float, _text("how long a forwarded request waits for a node before the next holder is tried", gt=0)
    ] = 2.0
    read_wait_s: Annotated[
        float,
        _text("how long a read that names an offset (`X-Insession-Min-Offset`, set on every forwarded read) "
              "waits for this node to apply it before it answers 503", ge=0),
    ] = 1.0

    def __post_init__(self) -> None:
        if not self.nodes:
            if self.node or self.copies:
                raise ValueError("`node` and `copies` need `nodes`, the list of every node's URL")
            return
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"`nodes` lists a URL twice: {self.nodes}")
        if self.node not in self.nodes:
            raise ValueError(f"`node` ({self.node!r}) must be one of `nodes` ({', '.join(self.nodes)}): "
                             "this node's own URL, spelled as in the list")
        if self.copies > len(self.nodes):
            raise ValueError(f"`copies` ({self.copies}) cannot exceed the {len(self.nodes)} nodes")

    def holders(self, partition: int) -> list[str]:
        """The nodes that hold `partition`, in the order a forwarder tries them (all when not split)."""
        if not self.nodes:
            return []
        n = len(self.nodes)
        return [self.nodes[(partition + j) % n] for j in range(self.copies or n)]

    def held(self, partitions: int) -> frozenset[int] | None:
        """The partitions this node holds (None: every partition, no forwarding)."""
        if not self.nodes or not self.copies or self.copies == len(self.nodes):
            return None
        return frozenset(p for p in range(partitions) if self.node in self.holders(p))


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A whole server config; every section is optional and defaults as documented."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    query: QueryConfig = msgspec.field(default_factory=QueryConfig)
    rank: RankingConfig = msgspec.field(default_factory=RankingConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    features: FeaturesConfig = msgspec.field(default_factory=FeaturesConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.cluster.nodes and not self.log.url:
            raise ValueError("[cluster] nodes share one replicated log: set [log] url (nats://...) on every node; "
                             "the embedded log is one machine's")
        if self.features.snapshot_writer == "standby" and self.log.url:
            raise ValueError("[features] snapshot_writer = \"standby\" reads the embedded log (log.sqlite); with "
                             "[log] url (a replicated log) leave it \"server\"")
        if self.server.reader_port and self.log.url:
            raise ValueError("[server] reader_port: the feature reader follows the embedded log (log.sqlite); with "
                             "[log] url (a replicated log) every node serves reads itself: leave it 0")
        if self.server.reader_port and self.server.reader_port == self.server.port:
            raise ValueError(f"[server] reader_port {self.server.reader_port} is the server's own port: choose "
                             "another (or 0 for no reader)")
        held = self.cluster.held(self.features.partitions)
        if held is not None and not held:
            raise ValueError(f"[cluster] gives node {self.cluster.node!r} none of the {self.features.partitions} "
                             "partitions: raise [cluster] copies or [features] partitions")


# -- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path | None) -> Config:
    """The config in a `.toml` or `.json` file (defaults when no path). Raises ConfigError."""
    if path is None:
        return Config()
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"{path.name}: a server config must be a .toml or .json file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the server config {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_config(text, path.suffix.lstrip("."), name=path.name)


def parse_config(text: str, kind: Literal["toml", "json"] = "toml", *, name: str = "config") -> Config:
    """The config in TOML or JSON text; `name` prefixes error messages. Raises ConfigError."""
    try:
        doc = tomllib.loads(text) if kind == "toml" else json.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name}:{e.lineno}: not valid JSON: {e.msg}") from None
    return config_from(doc, text=text, kind=kind, name=name)


def config_from(
    doc: Any, *, text: str | None = None, kind: Literal["toml", "json"] = "toml", name: str = "config"
) -> Config:
    """A parsed mapping as a Config; `text` (the file's) lets errors give a line. Raises ConfigError."""
    try:
        return msgspec.convert(doc, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(str(e), text, kind, name)) from None


_AT = re.compile(r" - at `\$(.*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _steps(path: str) -> list[tuple[str | int, ...]]:
    """`.auth.keys[1].roles` -> [("auth",), ("keys", 1), ("roles",)] (an index belongs to the key before it)."""
    out: list[tuple[str | int, ...]] = []
    for key, index in _STEP.findall(path):
        if key:
            out.append((key,))
        elif out:
            out[-1] = (out[-1][0], int(index))
    return out


def _explain(message: str, text: str | None, kind: str, name: str) -> str:
    m = _AT.search(message)
    path, problem = (m.group(1), message[: m.start()]) if m else ("", message)
    steps = _steps(path)
    unknown = _UNKNOWN.match(problem)
    if unknown:
        section = _struct_at(steps)
        steps.append((unknown.group(1),))
        where = ".".join(str(s[0]) for s in steps)
        allowed = ", ".join(f.name for f in msgspec.structs.fields(section)) if section else ""
        in_section = f"[{'.'.join(str(s[0]) for s in steps[:-1])}]" if len(steps) > 1 else "the top level"
        detail = f"unknown key {where!r}; allowed in {in_section}: {allowed}"
    else:
        where = ".".join(str(s[0]) + "".join(f"[{i}]" for i in s[1:]) for s in steps) or "(top level)"
        detail = f"{where}: {problem}"
        allowed = _allowed_at(steps)
        if allowed:
            detail += f" (allowed: {allowed})"
    line = _line_of(text, steps, kind) if text is not None else None
    return f"{name}{f':{line}' if line else ''}: {detail}"


def _struct_at(steps: list[tuple[str | int, ...]]) -> type[msgspec.Struct] | None:
    """The config struct reached by following `steps` from `Config` (list items count as their struct)."""
    t: Any = msgspec.inspect.type_info(Config)
    for step in steps:
        t = _field_type(t, str(step[0]))
        if t is None:
            return None
    while isinstance(t, msgspec.inspect.ListType | msgspec.inspect.Metadata):
        t = t.item_type if isinstance(t, msgspec.inspect.ListType) else t.type
    return t.cls if isinstance(t, msgspec.inspect.StructType) else None


def _field_type(t: Any, name: str) -> Any:
    while isinstance(t, msgspec.inspect.ListType | msgspec.inspect.Metadata):
        t = t.item_type if isinstance(t, msgspec.inspect.ListType) else t.type
    if not isinstance(t, msgspec.inspect.StructType):
        return None
    return next((f.type for f in t.fields if f.name == name), None)


def _allowed_at(steps: list[tuple[str | int, ...]]) -> str:
    if not steps:
        return ""
    parent = _struct_at(steps[:-1])
    if parent is None:
        return ""
    t = _field_type(msgspec.inspect.type_info(parent), str(steps[-1][0]))
    return "" if t is None else describe_type(t)


def describe_type(t: msgspec.inspect.Type) -> str:
    """A config value's type and constraints in words (for errors and the reference table)."""
    ins = msgspec.inspect
    if isinstance(t, ins.Metadata):
        return describe_type(t.type)
    if isinstance(t, ins.UnionType):
        return " or ".join(describe_type(x) for x in t.types if not isinstance(x, ins.NoneType))
    if isinstance(t, ins.IntType | ins.FloatType):
        kind = "integer" if isinstance(t, ins.IntType) else "number"
        bounds = [f"{op} {v:g}" for op, v in ((">", t.gt), (">=", t.ge), ("<", t.lt), ("<=", t.le)) if v is not None]
        return kind + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(t, ins.StrType):
        return "string" + (f" matching {t.pattern}" if t.pattern else "")
    if isinstance(t, ins.BoolType):
        return "true or false"
    if isinstance(t, ins.LiteralType):
        return "one of " + ", ".join(json.dumps(v) for v in t.values)
    if isinstance(t, ins.ListType):
        more = f" (at least {t.min_length})" if t.min_length else ""
        return f"list of {describe_type(t.item_type)}{more}"
    if isinstance(t, ins.StructType):
        return "table"
    return type(t).__name__


def _line_of(text: str, steps: list[tuple[str | int, ...]], kind: str) -> int | None:
    """The 1-based line of the deepest key of `steps` found in the file's text (its section if not)."""
    if kind == "json":
        for name in reversed([str(s[0]) for s in steps]):
            for n, line in enumerate(text.splitlines(), 1):
                if f'"{name}"' in line:
                    return n
        return None
    best: tuple[int, int] | None = None  # (matched depth, line)
    table: list[tuple[str, int | None]] = []
    arrays: dict[tuple[str, ...], int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            is_array = line.startswith("[[")
            names = tuple(p.strip().strip("\"'") for p in line.strip("[]").split("."))
            if is_array:
                arrays[names] = arrays.get(names, -1) + 1
            table = [(p, None) for p in names]
            if is_array:
                table[-1] = (names[-1], arrays[names])
            here = table
        elif "=" in line:
            key = [p.strip().strip("\"'") for p in line.split("=", 1)[0].split(".")]
            here = table + [(p, None) for p in key]
        else:
            continue
        depth = _matched(here, steps)
        if depth and (best is None or depth > best[0]):
            best = (depth, n)
    return None if best is None else best[1]


def _matched(here: list[tuple[str, int | None]], steps: list[tuple[str | int, ...]]) -> int:
    """How deep `here` (a line's key path) follows `steps` (a line inside the key counts as the key), or
    0 when it strays from them."""
    for (name, index), step in zip(here, steps, strict=False):
        want = step[1] if len(step) > 1 else None
        if name != step[0] or (index is not None and want is not None and index != want):
            return 0
    return min(len(here), len(steps))


# -- exposure -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding `host` is reachable from this machine only (names other than localhost count as not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(config: Config) -> str | None:
    """None when the bind is safe; the warning to log and show on /readyz when the operator accepted an
    exposed server without keys. Raises ConfigError when it is exposed without keys and not accepted."""
    host = config.server.host
    if config.auth.keys or is_loopback(host):
        return None
    if not config.server.insecure_no_auth:
        raise ConfigError(
            f"refusing to serve {host} without API keys: anyone who can reach it could ingest, query and "
            "reload models. Add [[auth.keys]] to the config, bind 127.0.0.1, or pass --insecure-no-auth "
            "(or [server] insecure_no_auth = true) to accept this"
        )
    return f"serving {host} without API keys (--insecure-no-auth): every endpoint is open to the network"


# -- reference ----------------------------------------------------------------------------------


def reference_markdown() -> str:
    """docs/configuration.md: one table per section, generated from the types above."""
    out = [
        "# Server configuration",
        "",
        "<!-- Generated from insession/serve/config.py by `python -m insession.serve.config`; do not edit. -->",
        "",
        "`insession serve --config server.toml` (or `.json`). Every section and key is optional; an unknown",
        "section or key, a wrong type or a value out of range stops the server with a message naming the key,",
        "its line and what is allowed. `--host`, `--port` and `--insecure-no-auth` override `[server]`.",
        "",
        "```toml",
        "[server]",
        'host = "0.0.0.0"',
        "",
        "[[auth.keys]]",
        'name = "checkout-service"',
        'sha256 = "<sha256 of the key>"   # or key = "..." (hashed on load)',
        'roles = ["serve", "ingest"]',
        "",
        "[query]",
        "timeout_s = 10",
        "```",
        "",
    ]
    sections: list[tuple[str, type[msgspec.Struct]]] = []
    for f in msgspec.structs.fields(Config):
        sections.append((f"[{f.name}]", f.type))
        for sub in msgspec.structs.fields(f.type):
            inner = _struct_at([(f.name,), (sub.name,)])
            if inner is not None:
                header = f"[[{f.name}.{sub.name}]]" if inner is KeySpec else f"[{f.name}.{sub.name}]"
                sections.append((header, inner))
    for header, struct in sections:
        out += [f"## `{header}`", "", (struct.__doc__ or "").strip().splitlines()[0], ""]
        out += ["| key | allowed | default | what |", "|---|---|---|---|"]
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            if isinstance(_plain(field.type), msgspec.inspect.StructType):
                continue  # a sub-table, documented in its own section
            what = (_meta(field.type).get("description") or "").replace("|", "\\|")
            out.append(f"| `{field.name}` | {describe_type(field.type)} | {_default(field)} | {what} |")
        out.append("")
    return "\n".join(out)


def _plain(t: Any) -> Any:
    return t.type if isinstance(t, msgspec.inspect.Metadata) else t


def _meta(t: Any) -> dict[str, Any]:
    if isinstance(t, msgspec.inspect.UnionType):
        return next((m for m in map(_meta, t.types) if m), {})
    return (t.extra_json_schema or {}) if isinstance(t, msgspec.inspect.Metadata) else {}


def _default(field: msgspec.inspect.Field) -> str:
    if field.required:
        return "required"
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if value is None:
        return "—"
    if isinstance(value, msgspec.Struct):
        return "table"
    return f"`{json.dumps(msgspec.to_builtins(value))}`"


if __name__ == "__main__":
    print(reference_markdown())
