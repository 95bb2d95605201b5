"""The serving-lane matcher: recognises a query that asks for a declared feature, from its parsed tree.

Two forms are answered from online state:

1. A query over `events` whose shape is a declaration's: the same entity key (`user_id = :user`,
   `item_id = :item`, both, or none for global), the same aggregation, field and window
   (`ts > now() - INTERVAL 15 DAY`; no time condition means an unbounded window), and a LIMIT no larger
   than the declared k. The shapes, per aggregation:

   - distinct_topk(f, k): `SELECT DISTINCT f ... ORDER BY ts DESC LIMIT n`        (n <= k)
   - last(f):             `SELECT f ... ORDER BY ts DESC LIMIT 1`
   - last_n(k):           `SELECT <item_id|action|ts|category>, ... ORDER BY ts DESC LIMIT n` (n <= k)
   - count:               `SELECT count(*) ...`
   - counts_by_action:    `SELECT action, count(*) ... GROUP BY action`
   - topk_count(f, k):    `SELECT f, count(*) AS n ... GROUP BY f ORDER BY n DESC LIMIT m` (m <= k)

   An action filter (`action = 'view'`, `action IN (...)`) must equal the declaration's; a query
   without one means "as declared" and matches the declaration of that shape with no action filter,
   or else the only declaration of that shape. `now()` is the feature engine's watermark (the newest
   event time it applied) and windows move by whole tiles (see docs/features.md); EXPLAIN says so.
   Anything else (another condition, a join, a different shape) is not a feature and goes to the
   analytics lane, which computes it exactly over the history.

2. The virtual table `features`: `SELECT * | f1, f2 FROM features WHERE user_id = :user [AND item_id =
   :item]` reads every (or the named) declared features of that entity for one key; no WHERE reads the
   global features; `WHERE user_id IN (:a, :b, ...)` (or item_id) reads up to MAX_KEYS keys at once, one
   row per key, under one lock hold per partition. Nothing else may read `features`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from insession.features.declare import ENTITY_KEYS, SEQUENCE_FIELDS, VALUE_FIELDS
from insession.query.errors import QueryError
from insession.query.sql import DIALECT, Statement, position_of

FEATURES_TABLE = "features"
MAX_KEYS = 1_000  # keys one read of the features table (IN list) or one POST /v1/features may ask for
KEY_COLUMNS = ENTITY_KEYS["user_item"]
_ENTITIES = {keys: entity for entity, keys in ENTITY_KEYS.items()}
_UNIT_MS = {"SECOND": 1000, "MINUTE": 60_000, "HOUR": 3_600_000, "DAY": 86_400_000, "WEEK": 7 * 86_400_000}
_NOW = (exp.CurrentTimestamp,)


@dataclass(frozen=True)
class KeyRef:
    """Where a key value comes from: a named parameter or a literal in the SQL."""

    column: str
    param: str | None = None
    literal: str | None = None

    def value(self, params: Mapping[str, Any]) -> str:
        return str(params[self.param]) if self.param is not None else str(self.literal)


@dataclass(frozen=True)
class FeaturePlan:
    """A query the serving lane answers: which features, for which key, and how values become rows."""

    entity: str
    keys: tuple[KeyRef, ...]  # in the entity's key order
    features: tuple[str, ...]  # one for an events-shaped query; the selected ones for `features`
    columns: tuple[str, ...]  # output column names
    agg: str | None  # the aggregation an events-shaped query asked for; None for the features table
    limit: int | None = None
    projection: tuple[str, ...] = ()  # per output column: a value field, "count", or "value"
    note: str = ""
    many: tuple[KeyRef, ...] = ()  # `features` read for many keys (`<key> IN (...)`): one row per key

    def key(self, params: Mapping[str, Any]) -> str | tuple[str, ...] | None:
        values = tuple(k.value(params) for k in self.keys)
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def many_keys(self, params: Mapping[str, Any]) -> list[str]:
        """The keys of an IN list, each once, in the order given."""
        return list(dict.fromkeys(k.value(params) for k in self.many))

    def rows(self, values: Mapping[str, Any], params: Mapping[str, Any]) -> list[list[Any]]:
        """The answer rows from the features' (already cleaned) values."""
        if self.agg is None:
            return [[k.value(params) for k in self.keys] + [values[f] for f in self.features]]
        value = values[self.features[0]]
        return _rows(self.agg, value, self.projection, self.limit)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def _rows(agg: str, value: Any, projection: tuple[str, ...], limit: int | None) -> list[list[Any]]:
    if agg == "distinct_topk":
        return [[v] for v in value[:limit]]
    if agg == "last":
        return [] if value is None else [[value]]
    if agg == "count":
        return [[value]]
    if agg == "counts_by_action":
        return [[a if p == "action" else n for p in projection] for a, n in value.items() if n]
    if agg == "topk_count":
        return [[d["count"] if p == "count" else d[p] for p in projection] for d in value[:limit]]
    if agg == "last_n":
        recent = list(reversed(value))[:limit]
        return [[_ts(e["ts"]) if p == "ts" else e[p] for p in projection] for e in recent]
    raise ValueError(f"no row shape for aggregation {agg!r}")


# -- reading the tree ---------------------------------------------------------------------------


def _column(e: exp.Expression, table: str) -> str | None:
    e = e.unnest()
    if isinstance(e, exp.Column) and (not e.table or e.table.lower() == table):
        return e.name.lower()
    return None


def _value(e: exp.Expression) -> tuple[str | None, str | None] | None:
    e = e.unnest()
    if isinstance(e, exp.Placeholder):
        return e.name, None
    if isinstance(e, exp.Literal):
        return None, e.this
    return None


def _is_count_star(e: exp.Expression) -> bool:
    e = e.unalias() if isinstance(e, exp.Alias) else e
    return isinstance(e, exp.Count) and isinstance(e.this, exp.Star) and not e.args.get("distinct")


def _interval_ms(e: exp.Expression) -> int | None:
    if not isinstance(e, exp.Interval) or not isinstance(e.this, exp.Literal):
        return None
    unit = e.unit.name.upper().rstrip("S") if e.unit is not None else ""
    try:
        n = int(str(e.this.this).strip())
    except ValueError:
        return None
    return n * _UNIT_MS[unit] if unit in _UNIT_MS and n > 0 else None


def _window_ms(cond: exp.Expression, table: str) -> int | None:
    """`ts > now() - INTERVAL n unit` (or >=, or mirrored) -> n in ms; None if it is not that."""
    if isinstance(cond, exp.GT | exp.GTE):
        col, bound = cond.this, cond.expression
    elif isinstance(cond, exp.LT | exp.LTE):
        col, bound = cond.expression, cond.this
    else:
        return None
    bound = bound.unnest()
    if _column(col, table) != "ts" or not isinstance(bound, exp.Sub):
        return None
    now = bound.this.unnest()
    is_now = isinstance(now, _NOW) or (
        isinstance(now, exp.Anonymous) and now.name.lower() == "now" and not now.expressions
    )
    return _interval_ms(bound.expression.unnest()) if is_now else None


@dataclass
class _Where:
    keys: dict[str, KeyRef]
    actions: frozenset[str] | None
    window_ms: int | None
    many: tuple[KeyRef, ...] = ()  # the keys of `<key column> IN (...)` (the features table only)


def _conjuncts(where: exp.Where | None) -> list[exp.Expression]:
    if where is None:
        return []
    cond = where.this.unnest()
    return [c.unnest() for c in cond.flatten()] if isinstance(cond, exp.And) else [cond]


def _read_where(select: exp.Select, table: str, key_columns: tuple[str, ...], allow_filters: bool) -> _Where | None:
    """Key equalities, plus (allow_filters) an action filter and a window; or (not allow_filters, the
    features table) one `<key column> IN (:a, :b, ...)` over many keys. None: another condition."""
    keys: dict[str, KeyRef] = {}
    actions: frozenset[str] | None = None
    window: int | None = None
    many: tuple[KeyRef, ...] = ()
    for cond in _conjuncts(select.args.get("where")):
        if not allow_filters and isinstance(cond, exp.In) and not many and not cond.args.get("query"):
            col = _column(cond.this, table)
            vals = [_value(v) for v in cond.expressions]
            if col not in key_columns or col in keys or not vals or any(v is None for v in vals):
                return None
            keys[col] = KeyRef(col)  # a placeholder: the key's values are `many`
            many = tuple(KeyRef(col, *v) for v in vals if v is not None)
            continue
        if isinstance(cond, exp.EQ):
            for col_side, val_side in ((cond.this, cond.expression), (cond.expression, cond.this)):
                col, val = _column(col_side, table), _value(val_side)
                if col is not None and val is not None:
                    break
            else:
                return None
            if col in key_columns and col not in keys:
                keys[col] = KeyRef(col, *val)
            elif allow_filters and col == "action" and val[1] is not None and actions is None:
                actions = frozenset({val[1]})
            else:
                return None
        elif allow_filters and isinstance(cond, exp.In) and _column(cond.this, table) == "action" and actions is None:
            vals = [_value(v) for v in cond.expressions]
            if not vals or any(v is None or v[1] is None for v in vals):
                return None
            actions = frozenset(v[1] for v in vals if v is not None and v[1] is not None)
        elif allow_filters and window is None and (w := _window_ms(cond, table)) is not None:
            window = w
        else:
            return None
    return _Where(keys, actions, window, many)


def _plain_select(tree: exp.Expression) -> exp.Select | None:
    """A single-table SELECT with no joins, CTEs, subqueries, HAVING, windows or OFFSET; else None."""
    if not isinstance(tree, exp.Select):
        return None
    if any(
        tree.args.get(a)
        for a in (
            "joins",
            "with_",
            "with",
            "having",
            "offset",
            "qualify",
            "laterals",
            "windows",
            "sample",
            "pivots",
        )
    ):
        return None
    src = tree.args.get("from_")
    if src is None or not isinstance(src.this, exp.Table):
        return None
    if any(True for _ in tree.find_all(exp.Subquery, exp.Window)):
        return None
    return tree


def _limit(select: exp.Select) -> int | None:
    lim = select.args.get("limit")
    if lim is None:
        return None
    e = lim.expression
    return int(e.this) if isinstance(e, exp.Literal) and not e.is_string and str(e.this).isdigit() else -1


def _order_is_ts_desc(select: exp.Select, table: str) -> bool:
    order = select.args.get("order")
    if order is None or len(order.expressions) != 1:
        return False
    o = order.expressions[0]
    return bool(o.args.get("desc")) and _column(o.this, table) == "ts"


def _group(select: exp.Select, table: str) -> list[str | None]:
    group = select.args.get("group")
    return [] if group is None else [_column(g, table) for g in group.expressions]


def _shapes(select: exp.Select, table: str) -> list[tuple[str, str | None, int | None, tuple[str, ...]]]:
    """The aggregations the SELECT list could be asking for: (agg, field, n, projection)."""
    sel = select.expressions
    cols = [_column(e.unalias() if isinstance(e, exp.Alias) else e, table) for e in sel]
    distinct = select.args.get("distinct") is not None
    group = _group(select, table)
    limit = _limit(select)
    by_ts = _order_is_ts_desc(select, table)
    out: list[tuple[str, str | None, int | None, tuple[str, ...]]] = []
    if distinct:
        if len(sel) == 1 and cols[0] in VALUE_FIELDS and by_ts and not group and limit and limit > 0:
            out.append(("distinct_topk", cols[0], limit, ("value",)))
        return out
    if not group and by_ts and limit and limit > 0 and all(cols):
        if len(cols) == 1 and limit == 1 and cols[0] in VALUE_FIELDS:
            out.append(("last", cols[0], None, ("value",)))
        if all(c in SEQUENCE_FIELDS for c in cols):
            out.append(("last_n", None, limit, tuple(c for c in cols if c)))
    if len(sel) == 1 and _is_count_star(sel[0]) and not group and limit is None and select.args.get("order") is None:
        out.append(("count", None, None, ("count",)))
    if len(sel) == 2 and len(group) == 1 and group[0] is not None:
        counts = [_is_count_star(e) for e in sel]
        if sum(counts) == 1 and cols[counts.index(False)] == group[0]:
            proj = tuple("count" if c else group[0] for c in counts)
            if group[0] == "action" and limit is None and select.args.get("order") is None:
                out.append(("counts_by_action", None, None, proj))
            elif (
                group[0] in VALUE_FIELDS
                and limit
                and limit > 0
                and _order_by_count_desc(select, sel[counts.index(True)])
            ):
                out.append(("topk_count", group[0], limit, proj))
    return out


def _order_by_count_desc(select: exp.Select, count_expr: exp.Expression) -> bool:
    order = select.args.get("order")
    if order is None or len(order.expressions) != 1 or not order.expressions[0].args.get("desc"):
        return False
    o = order.expressions[0].this
    if _is_count_star(o):
        return True
    alias = count_expr.alias if isinstance(count_expr, exp.Alias) else ""
    return bool(alias) and isinstance(o, exp.Column) and not o.table and o.name.lower() == alias.lower()


def _output_names(select: exp.Select) -> tuple[str, ...]:
    return tuple(
        e.alias_or_name if isinstance(e, exp.Column | exp.Alias) else e.sql(dialect=DIALECT) for e in select.expressions
    )


# -- matching -----------------------------------------------------------------------------------


class Matcher:
    """Finds the declared feature a parsed query asks for. `features()` returns the live declarations
    (objects with name, entity, agg, window (kind, length_ms), field, k, actions), so a feature added
    at run time is matched from then on."""

    def __init__(self, features: Callable[[], list[Any]], all_actions: tuple[str, ...]) -> None:
        self._features = features
        self._all_actions = frozenset(all_actions)

    def match(self, stmt: Statement) -> FeaturePlan | None:
        tables = {t.name.lower() for t in stmt.tree.find_all(exp.Table)}
        if FEATURES_TABLE in tables:
            return self._features_table(stmt)
        select = _plain_select(stmt.tree)
        if select is None or tables != {"events"}:
            return None
        table = select.args["from_"].this.alias_or_name.lower()
        where = _read_where(select, table, KEY_COLUMNS, allow_filters=True)
        if where is None:
            return None
        entity = _ENTITIES.get(tuple(c for c in KEY_COLUMNS if c in where.keys))
        if entity is None:
            return None
        actions = None if where.actions == self._all_actions else where.actions
        for agg, field, n, projection in _shapes(select, table):
            feature = self._pick(entity, agg, field, n, where.window_ms, actions)
            if feature is not None:
                keys = tuple(where.keys[c] for c in KEY_COLUMNS if c in where.keys)
                note = (
                    "answered from online state at the feature engine's watermark "
                    "(newest applied event time); "
                    f"window {feature.window.kind}"
                    + (
                        f" of {feature.window.length_ms} ms in tiles of {feature.window.tile_ms} ms"
                        if feature.window.kind == "sliding"
                        else ""
                    )
                    + (f"; declared action filter {sorted(feature.actions)}" if feature.actions else "")
                )
                return FeaturePlan(entity, keys, (feature.name,), _output_names(select), agg, n, projection, note)
        return None

    def _pick(
        self,
        entity: str,
        agg: str,
        field: str | None,
        n: int | None,
        window_ms: int | None,
        actions: frozenset[str] | None,
    ) -> Any:
        def same_shape(f: Any) -> bool:
            if f.entity != entity or f.agg != agg or (f.field or None) != field:
                return False
            if window_ms is None:
                if f.window.kind != "unbounded":
                    return False
            elif f.window.kind != "sliding" or f.window.length_ms != window_ms:
                return False
            return n is None or n <= f.k

        shaped = [f for f in self._features() if same_shape(f)]
        if actions is not None:
            exact = [f for f in shaped if f.actions is not None and frozenset(f.actions) == actions]
            return exact[0] if exact else None
        unfiltered = [f for f in shaped if f.actions is None]
        if unfiltered:
            return unfiltered[0]
        return shaped[0] if len(shaped) == 1 else None

    def _features_table(self, stmt: Statement) -> FeaturePlan:
        usage = (
            "the features table is read by key only: SELECT * FROM features WHERE user_id = :user "
            "(or item_id = :item, or both; no WHERE for global features)"
        )
        select = _plain_select(stmt.tree)
        if select is None or {t.name.lower() for t in stmt.tree.find_all(exp.Table)} != {FEATURES_TABLE}:
            raise QueryError(usage, code="bad_features_query", **position_of(stmt.tree))
        if any(select.args.get(a) for a in ("group", "order", "limit", "distinct")):
            raise QueryError(usage, code="bad_features_query", **position_of(stmt.tree))
        table = select.args["from_"].this.alias_or_name.lower()
        where = _read_where(select, table, KEY_COLUMNS, allow_filters=False)
        if where is None:
            raise QueryError(usage, code="bad_features_query", **position_of(select.args.get("where") or select))
        key_cols = tuple(c for c in KEY_COLUMNS if c in where.keys)
        entity = _ENTITIES[key_cols]
        declared = [f.name for f in self._features() if f.entity == entity]
        names: list[str] = []
        for e in select.expressions:
            if isinstance(e, exp.Star):
                names.extend(declared)
                continue
            col = _column(e, table)
            if col is None:
                raise QueryError(usage, code="bad_features_query", **position_of(e))
            if col in key_cols:
                continue
            if col not in declared:
                raise QueryError(
                    f"unknown {entity} feature {e.sql(dialect=DIALECT)}; declared: {', '.join(declared)}",
                    code="unknown_column",
                    **position_of(e),
                )
            names.append(col)  # type: ignore[arg-type]
        keys = tuple(where.keys[c] for c in key_cols)
        if where.many and (entity not in ("user", "item") or len(where.many) > MAX_KEYS):
            raise QueryError(f"an IN list reads up to {MAX_KEYS} user or item keys; a user_item read takes one "
                             "user_id and one item_id", code="bad_features_query",
                             **position_of(select.args.get("where") or select))
        return FeaturePlan(
            entity,
            keys,
            tuple(names),
            key_cols + tuple(names),
            None,
            note=f"every selected {entity} feature read at one watermark"
            + (f", {len(where.many)} keys under one lock hold per partition" if where.many else ""),
            many=where.many,
        )
