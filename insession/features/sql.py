"""The SQL form of a declaration: `CREATE FEATURE name AS SELECT ...`, parsed with sqlglot, and back.

    CREATE FEATURE top_categories_15d AS
    SELECT user_id, distinct_topk(category, 5) FROM events
    WHERE action = 'view' AND ts > now() - INTERVAL '15' DAY
    GROUP BY user_id, time_bucket(INTERVAL '1' HOUR, ts)

- entity: the GROUP BY keys: user_id | user_id, item_id | item_id | none (global);
- aggregation: count(*), sum(properties.<name> | price), last(field), last_n(k), distinct_topk(field, k),
  topk_count(field, k), counts_by_action(), age(), covisit(k, span, INTERVAL gap);
- window: `ts > now() - INTERVAL ...` with `time_bucket(INTERVAL <tile>, ts)` in GROUP BY (sliding),
  `session = current_session()` (session), `session < current_session()` (before_session), else unbounded;
- filter: `action = '...'` or `action IN (...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlglot
import sqlglot.errors
from sqlglot import exp
from sqlglot.tokens import Token, TokenType

from insession.features.declare import (
    BEFORE_SESSION,
    DAY_MS,
    ENTITY_KEYS,
    HOUR_MS,
    MINUTE_MS,
    SESSION,
    UNBOUNDED,
    Feature,
    Window,
    sliding,
)

_UNITS = {"SECOND": 1000, "MINUTE": MINUTE_MS, "HOUR": HOUR_MS, "DAY": DAY_MS, "WEEK": 7 * DAY_MS}
_DIALECT = "duckdb"


class FeatureSQLError(ValueError):
    """A feature statement that cannot be carried out; `line`/`col` (1-based) point at the culprit where
    the parser knows it."""

    def __init__(self, message: str, node: exp.Expression | Token | None = None) -> None:
        super().__init__(message)
        pos = _token_position(node) if isinstance(node, Token) else position_of(node) if node is not None else {}
        self.line: int | None = pos.get("line")
        self.col: int | None = pos.get("col")


def position_of(node: exp.Expression) -> dict[str, int]:
    """Line and column of a node where the parser recorded them (identifiers carry them)."""
    for n in (node, *(node.find_all(exp.Identifier))):
        meta = n.meta if hasattr(n, "meta") else {}
        if "line" in meta:  # sqlglot records the column where the identifier ends; report where it starts
            return {"line": meta["line"], "col": meta["col"] - (meta.get("end", 0) - meta.get("start", 0))}
    return {}


def _token_position(token: Token) -> dict[str, int]:
    return {"line": token.line, "col": token.col - len(token.text) + 1}


def _interval_ms(node: exp.Expression) -> int:
    if not isinstance(node, exp.Interval) or node.unit is None:
        raise FeatureSQLError(f"expected INTERVAL '<n>' <unit>, got {node.sql(_DIALECT)}", node)
    unit = node.unit.name.upper().rstrip("S")
    if unit not in _UNITS:
        raise FeatureSQLError(f"unknown interval unit {node.unit.name!r}; use one of {', '.join(_UNITS)}", node)
    return int(node.this.name) * _UNITS[unit]


def _func_name(node: exp.Expression) -> str:
    return (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()


def _int(node: exp.Expression) -> int:
    if not isinstance(node, exp.Literal) or node.is_string:
        raise FeatureSQLError(f"expected an integer, got {node.sql(_DIALECT)}", node)
    return int(node.this)


def _field(node: exp.Expression) -> str:
    if not isinstance(node, exp.Column):
        raise FeatureSQLError(f"expected a column, got {node.sql(_DIALECT)}", node)
    return f"{node.table}.{node.name}" if node.table else node.name


def _conjuncts(node: exp.Expression | None) -> list[exp.Expression]:
    if node is None:
        return []
    if isinstance(node, exp.Where | exp.Paren):
        return _conjuncts(node.this)
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


def parse_feature(sql: str) -> Feature:
    """Parse one `CREATE FEATURE name AS SELECT ...` statement into a declaration."""
    tokens = sqlglot.Dialect.get_or_raise(_DIALECT).tokenize(sql)
    if (
        len(tokens) < 5
        or tokens[0].token_type != TokenType.CREATE
        or tokens[1].text.upper() != "FEATURE"
        or tokens[3].token_type != TokenType.ALIAS
    ):
        raise FeatureSQLError("expected CREATE FEATURE <name> AS SELECT ...")
    name = tokens[2].text
    if not name.isidentifier():
        raise FeatureSQLError(f"feature name {name!r} must be an identifier", tokens[2])
    # The SELECT, parsed with what precedes it blanked out, so positions are those of the whole statement.
    blank = "".join(c if c == "\n" else " " for c in sql[: tokens[4].start])
    try:
        select = sqlglot.parse_one(blank + sql[tokens[4].start :], read=_DIALECT)
    except sqlglot.errors.ParseError as e:
        err = e.errors[0] if e.errors else {}
        bad = FeatureSQLError(f"invalid SQL: {err.get('description', e)}")
        bad.line, bad.col = err.get("line"), err.get("col")
        raise bad from None
    if not isinstance(select, exp.Select):
        raise FeatureSQLError("expected CREATE FEATURE <name> AS SELECT ...")
    source = select.args.get("from_") or select.args.get("from")
    if source is None or source.this.name != "events":
        raise FeatureSQLError("a feature selects FROM events", source.this if source is not None else None)

    group = select.args.get("group")
    keys: list[str] = []
    tile_ms = 0
    for g in group.expressions if group else []:
        if isinstance(g, exp.Column):
            keys.append(g.name)
        elif isinstance(g, exp.DateBin) or _func_name(g) == "time_bucket":
            tile_ms = _interval_ms(g.this)
        else:
            raise FeatureSQLError(f"GROUP BY takes entity keys and time_bucket(...), got {g.sql(_DIALECT)}", g)
    entity = next((e for e, k in ENTITY_KEYS.items() if list(k) == keys), None)
    if entity is None:
        raise FeatureSQLError(f"GROUP BY {keys} is no entity; use one of {list(ENTITY_KEYS.values())}", group)
    aggs = [e for e in select.expressions if not isinstance(e, exp.Column)]
    if len(aggs) != 1 or [e.name for e in select.expressions if isinstance(e, exp.Column)] != keys:
        raise FeatureSQLError("SELECT lists the GROUP BY keys and exactly one aggregation", select)
    agg = aggs[0].unalias()

    actions: tuple[str, ...] | None = None
    window: Window = UNBOUNDED
    for cond in _conjuncts(select.args.get("where")):
        left = cond.this if isinstance(cond, exp.Binary | exp.In) else None
        if isinstance(left, exp.Column) and left.name == "action":
            values = cond.expressions if isinstance(cond, exp.In) else [cond.expression]
            if not isinstance(cond, exp.In | exp.EQ) or not all(isinstance(v, exp.Literal) for v in values):
                raise FeatureSQLError(f"filter actions with action = '...' or action IN (...), got {cond.sql()}", cond)
            actions = tuple(v.this for v in values)
        elif isinstance(left, exp.Column) and left.name == "ts" and isinstance(cond, exp.GT | exp.GTE):
            if not isinstance(cond.expression, exp.Sub):
                raise FeatureSQLError(f"expected ts > now() - INTERVAL ..., got {cond.sql(_DIALECT)}", cond)
            if not tile_ms:
                raise FeatureSQLError("a sliding window needs GROUP BY ..., time_bucket(INTERVAL <tile>, ts)", cond)
            window = sliding(_interval_ms(cond.expression.expression), tile_ms)
        elif isinstance(left, exp.Column) and left.name == "session" and isinstance(cond, exp.EQ | exp.LT):
            window = SESSION if isinstance(cond, exp.EQ) else BEFORE_SESSION
        else:
            raise FeatureSQLError(f"unsupported condition {cond.sql(_DIALECT)}", cond)
    if tile_ms and window.kind != "sliding":
        raise FeatureSQLError("time_bucket(...) needs a ts > now() - INTERVAL ... window")

    fn, args = _func_name(agg), [a for a in agg.args.values() if isinstance(a, exp.Expression)]
    if isinstance(agg, exp.Anonymous):
        args = list(agg.expressions)
    elif agg.args.get("expressions"):
        args = [agg.this, *agg.expressions]
    common = {"name": name, "entity": entity, "window": window, "actions": actions}
    try:
        if fn == "count" and len(args) == 1 and isinstance(args[0], exp.Star):
            return Feature(agg="count", **common)  # type: ignore[arg-type]
        if fn in ("sum", "last") and len(args) == 1:
            return Feature(agg=fn, field=_field(args[0]), **common)  # type: ignore[arg-type]
        if fn == "last_n" and len(args) == 1:
            return Feature(agg="last_n", k=_int(args[0]), **common)  # type: ignore[arg-type]
        if fn in ("distinct_topk", "topk_count") and len(args) == 2:
            return Feature(agg=fn, field=_field(args[0]), k=_int(args[1]), **common)  # type: ignore[arg-type]
        if fn in ("counts_by_action", "age") and not args:
            return Feature(agg=fn, **common)  # type: ignore[arg-type]
        if fn == "covisit" and len(args) == 3:
            return Feature(agg="covisit", k=_int(args[0]), span=_int(args[1]), gap_ms=_interval_ms(args[2]), **common)  # type: ignore[arg-type]
    except FeatureSQLError:
        raise
    except ValueError as e:  # the declaration's own checks: point at what it reads, else the aggregation
        raise FeatureSQLError(str(e), args[0] if args and isinstance(args[0], exp.Column) else agg) from None
    raise FeatureSQLError(f"unknown aggregation {agg.sql(_DIALECT)}", agg)


@dataclass(frozen=True)
class FeatureStatement:
    """A statement about features: CREATE FEATURE (with its declaration), DROP FEATURE name, SHOW
    FEATURES, DESCRIBE FEATURE name."""

    kind: Literal["create", "drop", "show", "describe"]
    name: str | None = None
    feature: Feature | None = None

    @property
    def changes(self) -> bool:
        """CREATE and DROP change the declarations (the admin role); SHOW and DESCRIBE only read them."""
        return self.kind in ("create", "drop")


def parse_statement(sql: str) -> FeatureStatement | None:
    """The feature statement `sql` is, or None when it is none (a query, left to the query parser)."""
    try:
        tokens = sqlglot.Dialect.get_or_raise(_DIALECT).tokenize(sql)
    except sqlglot.errors.TokenError:
        return None
    words = [t.text.upper() for t in tokens[:3]]
    if words[:2] == ["CREATE", "FEATURE"]:
        return FeatureStatement("create", tokens[2].text if len(tokens) > 2 else None, parse_feature(sql))
    if words[:2] == ["SHOW", "FEATURES"]:
        if len(tokens) > 2 and tokens[2].token_type != TokenType.SEMICOLON:
            raise FeatureSQLError("SHOW FEATURES takes nothing after it", tokens[2])
        return FeatureStatement("show")
    if words[:2] in (["DROP", "FEATURE"], ["DESCRIBE", "FEATURE"]):
        rest = [t for t in tokens[2:] if t.token_type != TokenType.SEMICOLON]
        if len(rest) != 1 or not rest[0].text.isidentifier():
            raise FeatureSQLError(f"expected {words[0]} FEATURE <name>", rest[1] if len(rest) > 1 else None)
        return FeatureStatement("drop" if words[0] == "DROP" else "describe", rest[0].text)
    return None


def name_position(sql: str) -> dict[str, int]:
    """Where the feature's name stands in a CREATE/DROP/DESCRIBE FEATURE statement."""
    tokens = sqlglot.Dialect.get_or_raise(_DIALECT).tokenize(sql)
    return _token_position(tokens[2]) if len(tokens) > 2 else {}


def _interval_sql(ms: int) -> str:
    unit = next(u for u in ("DAY", "HOUR", "MINUTE", "SECOND") if ms % _UNITS[u] == 0)
    return f"INTERVAL '{ms // _UNITS[unit]}' {unit}"


def to_sql(f: Feature) -> str:
    """The CREATE FEATURE statement that `parse_feature` reads back into `f`."""
    args = {
        "count": "*",
        "sum": f.field,
        "last": f.field,
        "last_n": f"{f.k}",
        "distinct_topk": f"{f.field}, {f.k}",
        "topk_count": f"{f.field}, {f.k}",
        "counts_by_action": "",
        "age": "",
        "covisit": f"{f.k}, {f.span}, {_interval_sql(f.gap_ms)}",
    }[f.agg]
    keys = list(f.keys)
    where = []
    if f.actions is not None:
        where.append(
            f"action = '{f.actions[0]}'"
            if len(f.actions) == 1
            else "action IN (" + ", ".join(f"'{a}'" for a in f.actions) + ")"
        )
    if f.window.kind == "sliding":
        where.append(f"ts > now() - {_interval_sql(f.window.length_ms)}")
        keys.append(f"time_bucket({_interval_sql(f.window.tile_ms)}, ts)")
    elif f.window.kind in ("session", "before_session"):
        where.append(f"session {'=' if f.window.kind == 'session' else '<'} current_session()")
    text = f"CREATE FEATURE {f.name} AS SELECT {', '.join([*f.keys, f'{f.agg}({args})'])} FROM events"
    if where:
        text += " WHERE " + " AND ".join(where)
    if keys:
        text += " GROUP BY " + ", ".join(keys)
    return text
