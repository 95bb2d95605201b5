"""QueryService: one SQL-friendly entry point that routes each query to the serving or the analytics lane.

`execute(sql, params, roles)` (blocking, for the SDK's `select`) and `execute_async` (for the HTTP
route: the serving lane answers inline, the analytics lane is awaited without blocking the loop) both
parse once per distinct SQL text (cached), check the caller's roles, bind the parameters, and either
read online feature state (cleaned by `Hygiene`) or run DuckDB on the analytics lane.

Authorisation comes before any work: a plan is the parsed statement and its lane, decided from the
sqlglot tree alone; nothing is prepared, planned or evaluated by DuckDB before the role check, and
DuckDB only ever sees a query on the analytics lane, under that lane's deadline and memory limit (a
query DuckDB cannot bind is answered 400 from there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
from sqlglot import exp

from insession.features.declare import ENTITY_KEYS
from insession.features.manage import FeatureManager, FeatureStatementError
from insession.features.sql import FeatureSQLError, FeatureStatement, parse_statement
from insession.query.analytics import AnalyticsLane, Limits, Sources, Table
from insession.query.errors import QueryError
from insession.query.hygiene import Hygiene
from insession.query.match import FEATURES_TABLE, MAX_KEYS, FeaturePlan, Matcher
from insession.query.sql import DIALECT, Statement, bind_params, param_contexts, parse, position_of
from insession.query.tables import TABLE_COLUMNS
from insession.schema import ACTIONS

if TYPE_CHECKING:
    from insession.features import FeatureEngine

T = TypeVar("T")
SERVING, ANALYTICS = "serving", "analytics"
FEATURES = "features"  # CREATE / DROP / SHOW / DESCRIBE FEATURE (insession.features.manage)
INVALID = "invalid"  # the metrics label of queries refused before they could be routed
ENTITIES = tuple(ENTITY_KEYS)
# Which roles may use which lane (admin may use everything; see insession.serve.auth).
LANE_ROLES = {
    SERVING: frozenset({"serve", "analytics", "admin"}),
    ANALYTICS: frozenset({"analytics", "admin"}),
    FEATURES: frozenset({"serve", "analytics", "admin"}),  # SHOW and DESCRIBE; CREATE and DROP: CHANGE_ROLES
}
CHANGE_ROLES = frozenset({"admin"})
_ALL_COLUMNS = {c: t for cols in TABLE_COLUMNS.values() for c, t in cols.items()}
# Plans are cached by the size of their SQL text, not their number: a sqlglot tree takes ~60 bytes per
# character of SQL (a 96 KB query ~6 MB), so 1M characters of SQL keep the cache near 60 MB at most.
PLAN_CACHE_CHARS = 1_000_000


class Result(msgspec.Struct):
    """A query's answer. `feature`: the declared feature that answered (serving lane); `fallbacks`: feature
    -> the feature its empty value fell back to (see Hygiene); `truncated`: a row/byte limit cut it."""

    lane: str
    columns: list[str]
    rows: list[list[Any]]
    feature: str | None = None
    fallbacks: dict[str, str] = {}
    truncated: bool = False
    elapsed_ms: float = 0.0


class Explanation(msgspec.Struct):
    """What EXPLAIN says: the lane, the feature (serving) and the plan (DuckDB's, for analytics)."""

    lane: str
    feature: str | None
    plan: str


class QueryListener(Protocol):
    """What the metrics module implements to observe queries."""

    def query_done(self, lane: str, seconds: float, status: int) -> None: ...

    def hygiene_dropped(self, feature: str, reason: str, n: int) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A parsed, routed query (cached per SQL text)."""

    stmt: Statement | None  # None for a feature statement
    lane: str
    serving: FeaturePlan | None
    duck_sql: str | None
    param_types: dict[str, str | None] = field(default_factory=dict)
    feature_stmt: FeatureStatement | None = None

    @property
    def roles(self) -> frozenset[str]:
        """The roles that may run it (any one of them)."""
        return CHANGE_ROLES if self.feature_stmt is not None and self.feature_stmt.changes else LANE_ROLES[self.lane]


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    params: dict[str, Any]
    start: float


class QueryService:
    """Built once per process: `QueryService(features, log, catalog, history_dir, limits)`."""

    def __init__(
        self,
        features: FeatureEngine,
        log: Any,
        catalog: Any,
        history_dir: Path | None,
        limits: Limits | None = None,
        *,
        sources: Sources | None = None,
        manager: FeatureManager | None = None,
    ) -> None:
        self.features = features
        self.manager = manager
        # None for a process that serves online features only (a feature reader, `insession.serve.reader`)
        self.analytics = None if log is None and sources is None else \
            AnalyticsLane(sources or Sources.of(log, catalog, history_dir), limits)
        self.matcher = Matcher(self._declared, ACTIONS)
        self.hygiene = Hygiene(catalog.get, lambda name: features.read(name, None), self._declared, self._dropped)
        self.listeners: list[QueryListener] = []
        self._plans: dict[tuple[str, int], Plan] = {}  # insertion-ordered: the oldest is evicted first
        self._plan_chars = 0
        self._plans_lock = threading.Lock()

    def _declared(self) -> list[Any]:
        return list(self.features.registry)

    def listen(self, listener: QueryListener) -> None:
        self.listeners.append(listener)

    def _dropped(self, feature: str, reason: str, n: int) -> None:
        for listener in self.listeners:
            listener.hygiene_dropped(feature, reason, n)

    def _done(self, lane: str, start: float, status: int) -> float:
        seconds = time.perf_counter() - start
        for listener in self.listeners:
            listener.query_done(lane, seconds, status)
        return seconds * 1000

    # -- planning -------------------------------------------------------------------------------

    def plan(self, sql: str) -> Plan:
        """Parse, sandbox and route `sql` (cached; a newly declared feature invalidates the cache).

        Never runs DuckDB: what a query needs (its lane, hence the role) is known from the tree alone."""
        if not isinstance(sql, str):
            raise QueryError("sql must be a string", code="syntax_error")
        key = (sql, self.features.version)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._compile(sql)
            with self._plans_lock:
                if key not in self._plans:
                    self._plans[key] = plan
                    self._plan_chars += len(sql)
                while self._plan_chars > PLAN_CACHE_CHARS and self._plans:
                    oldest = next(iter(self._plans))
                    del self._plans[oldest]
                    self._plan_chars -= len(oldest[0])
        return plan

    def is_planned(self, sql: str) -> bool:
        """Whether `plan(sql)` is a cache hit (the HTTP route plans misses off the event loop)."""
        return (sql, self.features.version) in self._plans

    @property
    def cached_plan_chars(self) -> int:
        """Characters of SQL whose plans are cached (what bounds the cache)."""
        return self._plan_chars

    def _compile(self, sql: str) -> Plan:
        try:
            feature_stmt = parse_statement(sql)
        except FeatureSQLError as e:
            raise QueryError(str(e), line=e.line, col=e.col, code="invalid_feature") from None
        if feature_stmt is not None:
            return Plan(None, FEATURES, None, None, feature_stmt=feature_stmt)
        stmt = parse(sql, (*TABLE_COLUMNS, FEATURES_TABLE))
        serving = self.matcher.match(stmt)
        if serving is not None:
            types: dict[str, str | None] = {k.param: "VARCHAR" for k in (*serving.keys, *serving.many)
                                            if k.param is not None}
            return Plan(stmt, SERVING, serving, None, types)
        duck_sql = stmt.tree.sql(dialect=DIALECT)
        return Plan(stmt, ANALYTICS, None, duck_sql, param_contexts(stmt.tree, _ALL_COLUMNS))

    def prepare(
        self,
        sql: str,
        params: Mapping[str, Any] | None,
        roles: Collection[str] | None,
        plan: Plan | None = None,
    ) -> Prepared:
        """Plan, check roles (None: access control is off) and bind parameters. A refusal is counted under
        its lane, or under "invalid" when the query could not be routed at all."""
        start = time.perf_counter()
        lane = INVALID
        try:
            plan = plan or self.plan(sql)
            lane = plan.lane
            if roles is not None and not plan.roles & set(roles):
                need = " or ".join(sorted(plan.roles - {"admin"} or {"admin"}))
                what = ("changing features" if plan.roles == CHANGE_ROLES
                        else f"this query runs on the {plan.lane} lane, which")
                raise QueryError(f"{what} needs the role {need}", 403, code="forbidden")
            if plan.stmt is None:
                return Prepared(plan, {}, start)
            return Prepared(plan, bind_params(plan.stmt, params or {}, plan.param_types), start)
        except QueryError as e:
            self._done(lane, start, e.status)
            raise

    # -- execution ------------------------------------------------------------------------------

    def run_serving(self, p: Prepared) -> Result:
        """Answer a serving-lane query from online state (fast; safe on the event loop)."""
        fp = p.plan.serving
        assert fp is not None
        if p.plan.stmt.explain:
            return self._explained(p, Explanation(SERVING, ",".join(fp.features), fp.note))
        if fp.many:
            keys = fp.many_keys(p.params)
            raws = self.features.read_all_many(fp.entity, keys, list(fp.features))  # type: ignore[arg-type]
            rows = []
            fallbacks = {}
            for k, raw in zip(keys, raws, strict=True):
                values, fb = self._clean(fp.features, raw)
                rows.append([k, *(values[f] for f in fp.features)])
                fallbacks |= fb
            ms = self._done(SERVING, p.start, 200)
            return Result(SERVING, list(fp.columns), rows, None, fallbacks, elapsed_ms=ms)
        key = fp.key(p.params)
        if fp.agg is None:
            raw = self.features.read_all(fp.entity, key)
        else:
            raw = {fp.features[0]: self.features.read(fp.features[0], key)}
        values, fallbacks = self._clean(fp.features, raw)
        rows = fp.rows(values, p.params)
        feature = fp.features[0] if fp.agg is not None else None
        ms = self._done(SERVING, p.start, 200)
        return Result(SERVING, list(fp.columns), rows, feature, fallbacks, elapsed_ms=ms)

    def _clean(self, names: Collection[str], raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        registry = self.features.registry
        values: dict[str, Any] = {}
        fallbacks: dict[str, str] = {}
        for name in names:
            values[name], fb = self.hygiene.clean(registry[name], raw[name])
            if fb is not None:
                fallbacks[name] = fb
        return values, fallbacks

    def _lane(self) -> AnalyticsLane:
        if self.analytics is None:
            raise QueryError("this process serves online features only (a feature reader): send analytics queries "
                             "to the server", 421, code="misdirected")
        return self.analytics

    def submit(self, p: Prepared) -> Future[Table]:
        """Admit an analytics-lane query (429 when the queue is full)."""
        plan = p.plan
        assert plan.duck_sql is not None
        try:
            return self._lane().submit(
                plan.duck_sql,
                p.params,
                explain=plan.stmt.explain,
                position=functools.partial(_column_position, plan.stmt),
            )
        except QueryError as e:
            self._done(ANALYTICS, p.start, e.status)
            raise

    def _analytics_result(self, p: Prepared, fut: Future[Table]) -> Result:
        try:
            table = fut.result()
        except QueryError as e:
            self._done(ANALYTICS, p.start, e.status)
            raise
        if p.plan.stmt.explain:
            return self._explained(p, Explanation(ANALYTICS, None, self._backfill_note(p.plan) + table.rows[0][0]))
        ms = self._done(ANALYTICS, p.start, 200)
        return Result(ANALYTICS, table.columns, table.rows, truncated=table.truncated, elapsed_ms=ms)

    def _backfill_note(self, plan: Plan) -> str:
        """For EXPLAIN of an analytics query: the declared feature still backfilling that will answer it."""
        pending = self.manager.backfilling() if self.manager is not None else {}
        if not pending or plan.stmt is None:
            return ""
        try:
            fp = Matcher(lambda: [f for f, _ in pending.values()], ACTIONS).match(plan.stmt)
        except QueryError:
            return ""
        if fp is None or fp.agg is None:
            return ""
        name = fp.features[0]
        return (f"feature {name} is backfilling ({pending[name][1]}): this query runs on the analytics lane until "
                "it serves\n")

    def _explained(self, p: Prepared, ex: Explanation) -> Result:
        ms = self._done(ex.lane, p.start, 200)
        return Result(ex.lane, ["lane", "feature", "plan"], [[ex.lane, ex.feature, ex.plan]], ex.feature, elapsed_ms=ms)

    def run_features(self, p: Prepared, sql: str, who: str) -> Result:
        """Carry out a feature statement (CREATE / DROP / SHOW / DESCRIBE FEATURE) through the manager."""
        fs = p.plan.feature_stmt
        assert fs is not None
        try:
            if self.manager is None:
                raise QueryError("feature statements need an insession with a data directory", code="unsupported")
            try:
                columns, rows = self.manager.execute(fs, sql, who)
            except FeatureStatementError as e:
                raise QueryError(str(e), e.status, line=e.line, col=e.col, code=e.code) from None
        except QueryError as e:
            self._done(FEATURES, p.start, e.status)
            raise
        ms = self._done(FEATURES, p.start, 200)
        return Result(FEATURES, columns, rows, fs.name, elapsed_ms=ms)

    def execute(
        self, sql: str, params: Mapping[str, Any] | None = None, roles: Collection[str] | None = None,
        who: str = "local",
    ) -> Result:
        """Run a query to completion in the calling thread (the SDK's `select(sql, **params)`); `who`
        names the caller in the record of feature changes."""
        p = self.prepare(sql, params, roles)
        if p.plan.lane == FEATURES:
            return self.run_features(p, sql, who)
        if p.plan.lane == SERVING:
            return self.run_serving(p)
        fut = self.submit(p)
        return self._analytics_result(p, fut)

    async def execute_async(
        self, sql: str, params: Mapping[str, Any] | None = None, roles: Collection[str] | None = None,
        who: str = "local",
    ) -> Result:
        """The same, for an event loop: serving inline, analytics awaited on its own pool."""
        plan = None
        if not self.is_planned(sql):  # parse off the event loop
            start = time.perf_counter()
            try:
                plan = await asyncio.to_thread(self.plan, sql)
            except QueryError as e:
                self._done(INVALID, start, e.status)
                raise
        p = self.prepare(sql, params, roles, plan)
        plan = p.plan
        if plan.lane == FEATURES:
            return await asyncio.to_thread(self.run_features, p, sql, who)
        if plan.lane == SERVING:
            return await self.off_loop(self.run_serving, p)
        fut = self.submit(p)
        with contextlib.suppress(QueryError):  # raised again, and counted, by _analytics_result
            await asyncio.wrap_future(fut)
        return self._analytics_result(p, fut)

    def explain(self, sql: str, params: Mapping[str, Any] | None = None) -> Explanation:
        """Which lane `sql` takes and which feature or plan answers it (DuckDB plans with the parameters)."""
        p = self.prepare(sql, params, None)
        if p.plan.stmt is None:
            raise QueryError("EXPLAIN explains queries, not feature statements", code="unsupported")
        if p.plan.serving is not None:
            return Explanation(SERVING, ",".join(p.plan.serving.features), p.plan.serving.note)
        assert p.plan.duck_sql is not None
        table = self._lane().submit(p.plan.duck_sql, p.params, explain=True).result()
        return Explanation(ANALYTICS, None, table.rows[0][0])

    async def off_loop(self, read: Callable[..., T], *args: Any) -> T:
        """`read(*args)` for an event loop: inline (a serving read is ~0.1-1 ms of the GIL, less than a
        thread hop), but in a thread while a snapshot captures a section (`FeatureEngine.capturing`): that
        capture holds one unit's lock for up to ~15-25 ms at a million shoppers, and a read of that unit
        inline would stall every request on the loop for as long, although the capture lets the GIL go
        between its chunks."""
        if self.features.capturing:
            return await asyncio.to_thread(read, *args)
        return read(*args)

    def read_features(self, entity: str, key: str | tuple[str, ...] | None) -> tuple[dict[str, Any], dict[str, str]]:
        """Every declared feature of `entity` for `key`, cleaned; and the fallbacks used."""
        if entity not in ENTITIES:
            raise QueryError(f"unknown entity {entity!r}; entities: {', '.join(ENTITIES)}", 404, code="unknown_entity")
        start = time.perf_counter()
        try:
            raw = self.features.read_all(entity, key)
        except ValueError as e:
            raise QueryError(str(e), code="bad_key") from None
        out = self._clean(raw.keys(), raw)
        self._done(SERVING, start, 200)
        return out

    def read_features_many(self, entity: str, keys: list[str | tuple[str, ...] | None],
                           names: list[str] | None = None) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """`read_features` of many keys (only the features `names`, when given) under one lock hold per
        partition: what POST /v1/features answers."""
        if entity not in ENTITIES:
            raise QueryError(f"unknown entity {entity!r}; entities: {', '.join(ENTITIES)}", 404, code="unknown_entity")
        if len(keys) > MAX_KEYS:
            raise QueryError(f"at most {MAX_KEYS} keys per read, not {len(keys)}", 413, code="too_many_keys")
        start = time.perf_counter()
        try:
            raws = self.features.read_all_many(entity, keys, names)
        except KeyError as e:
            raise QueryError(str(e.args[0]), code="unknown_feature") from None
        except ValueError as e:
            raise QueryError(str(e), code="bad_key") from None
        out = [self._clean(raw.keys(), raw) for raw in raws]
        self._done(SERVING, start, 200)
        return out

    def close(self) -> None:
        if self.analytics is not None:
            self.analytics.close()


def _column_position(stmt: Statement, name: str) -> dict[str, int]:
    for col in stmt.tree.find_all(exp.Column):
        if col.name == name or col.name.lower() == name.lower():
            return position_of(col)
    return {}
