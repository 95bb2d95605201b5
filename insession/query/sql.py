"""User SQL to a checked sqlglot tree: one read-only SELECT over the declared tables, named parameters.

The sandbox is an allow-list over the parsed tree, never a string match: the statement must be a query
(SELECT / set operation, optionally prefixed by EXPLAIN); every table it names must be a declared table
or one of its own CTEs, unqualified (no `db.schema.table`, no file paths, no table functions such as
`read_csv` or `glob`); every function must be on the allow-list below (so no `getenv`, `read_text`,
`query`, `current_setting`, ...); statement nodes (ATTACH, COPY, INSTALL, LOAD, PRAGMA, SET, CREATE,
INSERT, SELECT INTO, ...) are refused wherever they appear. DuckDB is locked down as well
(`insession.query.tables.connect`), so a gap in one layer is not an escape.

Parameters are `:name` or `$name`; their values are bound by DuckDB, never spliced into the text, and
checked against the column they are compared with (`bind_params`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import Token, TokenType

from insession.features.sql import position_of
from insession.query.errors import QueryError

DIALECT = sqlglot.Dialect.get_or_raise("duckdb")
MAX_SQL_CHARS = 100_000
INT64_MAX = 2**63 - 1

_F = exp  # short alias for the allow-list below
ALLOWED_FUNCTIONS: frozenset[type[exp.Func]] = frozenset(
    {
        # aggregates
        _F.Count,
        _F.Sum,
        _F.Avg,
        _F.Min,
        _F.Max,
        _F.ArgMax,
        _F.ArgMin,
        _F.ApproxDistinct,
        _F.CountIf,
        _F.Stddev,
        _F.StddevPop,
        _F.StddevSamp,
        _F.Variance,
        _F.VariancePop,
        _F.PercentileCont,
        _F.PercentileDisc,
        _F.Median,
        _F.First,
        _F.Last,
        _F.AnyValue,
        _F.ArrayAgg,
        _F.GroupConcat,
        _F.LogicalAnd,
        _F.LogicalOr,
        _F.Mode,
        _F.ApproxQuantile,
        _F.Quantile,
        _F.Corr,
        _F.CovarPop,
        _F.CovarSamp,
        _F.RegrSlope,
        # scalars
        _F.Abs,
        _F.Round,
        _F.Floor,
        _F.Ceil,
        _F.Coalesce,
        _F.Nullif,
        _F.If,
        _F.Case,
        _F.Greatest,
        _F.Least,
        _F.Ln,
        _F.Log,
        _F.Exp,
        _F.Pow,
        _F.Sqrt,
        _F.Sign,
        _F.Cast,
        _F.TryCast,
        _F.Lower,
        _F.Upper,
        _F.Length,
        _F.Substring,
        _F.Concat,
        _F.ConcatWs,
        _F.Trim,
        _F.Replace,
        _F.SplitPart,
        _F.Split,
        _F.StrPosition,
        _F.Left,
        _F.Right,
        _F.Pad,
        _F.StartsWith,
        _F.EndsWith,
        _F.Contains,
        _F.RegexpLike,
        _F.RegexpExtract,
        _F.RegexpReplace,
        _F.MD5,
        _F.Reverse,
        _F.Initcap,
        _F.Levenshtein,
        _F.Format,
        _F.Typeof,
        _F.Exists,
        # time
        _F.DateTrunc,
        _F.TimestampTrunc,
        _F.Extract,
        _F.UnixToTime,
        _F.TimeToUnix,
        _F.TimeToStr,
        _F.StrToTime,
        _F.CurrentTimestamp,
        _F.CurrentDate,
        _F.DateDiff,
        _F.DateAdd,
        _F.DateSub,
        _F.DayOfWeek,
        _F.DayOfMonth,
        _F.DayOfYear,
        _F.Hour,
        _F.Minute,
        _F.Second,
        _F.Day,
        _F.Month,
        _F.Year,
        _F.Week,
        _F.Quarter,
        _F.DateBin,
        _F.ToDays,
        _F.TsOrDsToDate,
        _F.Date,
        _F.TimestampAdd,
        _F.TimestampDiff,
        _F.TimestampSub,
        _F.StrToDate,
        _F.DateFromParts,
        _F.Dayname,
        _F.MakeInterval,
        # JSON (the events' `properties` column is JSON text)
        _F.JSONExtract,
        _F.JSONExtractScalar,
        _F.JSONKeys,
        _F.ParseJSON,
        # window functions
        _F.RowNumber,
        _F.Rank,
        _F.DenseRank,
        _F.Ntile,
        _F.Lag,
        _F.Lead,
        _F.FirstValue,
        _F.LastValue,
        _F.PercentRank,
        _F.CumeDist,
        _F.NthValue,
        # lists and structs
        _F.ArrayContains,
        _F.ArraySize,
        _F.Explode,
        _F.ArraySort,
        _F.ArraySlice,
        _F.ArrayDistinct,
        _F.Array,
        _F.Struct,
        _F.ArrayToString,
        _F.ArrayConcat,
        _F.Unnest,
        _F.ArrayOverlaps,
        _F.ArrayContainsAll,
        _F.ArrayContainedBy,
        _F.ArrayPosition,
        # operators that sqlglot models as functions
        _F.And,
        _F.Or,
        _F.Xor,
        _F.Collate,
        _F.RegexpILike,
        _F.RegexpFullMatch,
    }
)
# Functions sqlglot does not model (exp.Anonymous), by lower-case name.
ALLOWED_ANONYMOUS: frozenset[str] = frozenset(
    {
        "now",
        "date_part",
        "datepart",
        "age",
        "epoch_us",
        "epoch_ns",
        "to_hours",
        "to_minutes",
        "to_seconds",
        "to_weeks",
        "to_months",
        "to_years",
        "histogram",
        "hash",
        "prefix",
        "suffix",
        "json_value",
        "json_array_length",
        "list_has_any",
        "list_has_all",
        "strip_accents",
        "monthname",
        "bit_count",
    }
)
# Statement kinds refused wherever they appear in the tree.
FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = (
    exp.DDL,
    exp.DML,
    exp.Command,
    exp.Pragma,
    exp.Set,
    exp.Copy,
    exp.Attach,
    exp.Detach,
    exp.Install,
    exp.Use,
    exp.Describe,
    exp.Show,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Into,
    exp.Parameter,
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Is, exp.Like, exp.ILike)


@dataclass(frozen=True)
class Statement:
    """A checked query: the tree (read-only SELECT), whether it was EXPLAINed, its named parameters."""

    sql: str
    tree: exp.Query
    explain: bool
    params: tuple[str, ...]
    param_positions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def position(self, name: str) -> dict[str, int]:
        line, col = self.param_positions.get(name, (None, None))
        return {} if line is None else {"line": line, "col": col}


def _tokenize(sql: str) -> list[Token]:
    try:
        return DIALECT.tokenize(sql)
    except TokenError as e:
        raise QueryError(f"invalid SQL: {e}", code="syntax_error") from None


def parse(sql: str, tables: Collection[str]) -> Statement:
    """Parse and sandbox one statement; raises QueryError (400) with a position where the parser has one."""
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("empty query: send one SELECT statement", code="syntax_error")
    if len(sql) > MAX_SQL_CHARS:
        raise QueryError(f"query of {len(sql)} characters exceeds {MAX_SQL_CHARS}", code="syntax_error")
    tokens = _tokenize(sql)
    explain = bool(tokens) and tokens[0].token_type == TokenType.COMMAND and tokens[0].text.upper() == "EXPLAIN"
    if explain:
        # Blank out the keyword so that positions in the rest stay those of the user's text.
        sql_body = " " * (tokens[0].end + 1) + sql[tokens[0].end + 1 :]
        tokens = _tokenize(sql_body)
    else:
        sql_body = sql
    try:
        trees = [t for t in DIALECT.parser().parse(tokens, sql_body) if t is not None]
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        col = err.get("col")
        if col is not None:  # the column where the offending token ends; report where it starts
            col = max(1, col - len(err.get("highlight") or "x") + 1)
        raise QueryError(
            f"invalid SQL: {err.get('description', str(e))}",
            line=err.get("line"),
            col=col,
            code="syntax_error",
        ) from None
    except (RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        # sqlglot raises these on some malformed input; it is still the input's fault.
        raise QueryError(f"invalid SQL: {type(e).__name__}: {e}", code="syntax_error") from None
    if len(trees) != 1:
        raise QueryError(f"send exactly one statement (got {len(trees)})", code="syntax_error")
    tree = trees[0]
    if not isinstance(tree, exp.Query):
        raise QueryError(
            f"only SELECT queries are allowed, not {tree.key.upper()}",
            code="forbidden_statement",
            **position_of(tree),
        )
    params = _check_tree(tree, {t.lower() for t in tables})
    positions: dict[str, tuple[int, int]] = {}
    for prev, tok in zip(tokens, tokens[1:], strict=False):
        if prev.token_type in (TokenType.COLON, TokenType.PARAMETER) and tok.text in params:
            positions.setdefault(tok.text, (prev.line, prev.col))
    ordered = tuple(sorted(params, key=lambda p: positions.get(p, (1 << 30, 0))))  # in order of the text
    return Statement(sql=sql, tree=tree, explain=explain, params=ordered, param_positions=positions)


def _check_tree(tree: exp.Query, tables: set[str]) -> tuple[str, ...]:
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    params: dict[str, None] = {}
    for node in tree.walk():
        if isinstance(node, FORBIDDEN_NODES):
            raise QueryError(
                f"{node.key.upper()} is not allowed: queries are read-only SELECTs",
                code="forbidden_statement",
                **position_of(node),
            )
        if isinstance(node, exp.Table):
            _check_table(node, tables, ctes)
        elif isinstance(node, exp.Anonymous):
            if node.name.lower() not in ALLOWED_ANONYMOUS:
                raise QueryError(
                    f"function {node.name}() is not available in queries",
                    code="forbidden_function",
                    **position_of(node),
                )
        elif isinstance(node, exp.Func) and type(node) not in ALLOWED_FUNCTIONS:
            name = node.sql_name() if hasattr(node, "sql_name") else node.key
            raise QueryError(
                f"function {name}() is not available in queries", code="forbidden_function", **position_of(node)
            )
        elif isinstance(node, exp.Placeholder):
            name = node.name
            if not name or not _IDENT.match(name):
                raise QueryError(
                    "only named parameters (:name) are supported, not positional ones (? or $1)",
                    code="bad_parameter",
                )
            params[name] = None
    return tuple(params)


def _check_table(node: exp.Table, tables: set[str], ctes: set[str]) -> None:
    if not isinstance(node.this, exp.Identifier):
        raise QueryError(
            "table functions are not allowed; read the declared tables: " + ", ".join(sorted(tables)),
            code="forbidden_table",
            **position_of(node),
        )
    if node.args.get("db") or node.args.get("catalog"):
        raise QueryError(
            f"qualified table {node.sql(dialect=DIALECT)} is not allowed; use a declared table: "
            + ", ".join(sorted(tables)),
            code="unknown_table",
            **position_of(node),
        )
    name = node.name.lower()
    if name not in tables and name not in ctes:
        raise QueryError(
            f"unknown table {node.name!r}; tables: {', '.join(sorted(tables))}",
            code="unknown_table",
            **position_of(node),
        )


# -- parameters ---------------------------------------------------------------------------------


def param_contexts(tree: exp.Query, columns: Mapping[str, str]) -> dict[str, str | None]:
    """For each placeholder, the SQL type it must have: the type of the column it is compared with,
    "LIMIT" for a LIMIT/OFFSET value, or None where the context does not say."""
    out: dict[str, str | None] = {}
    for ph in tree.find_all(exp.Placeholder):
        kind: str | None = None
        parent = ph.parent
        if isinstance(parent, exp.Limit | exp.Offset):
            kind = "LIMIT"
        else:
            if isinstance(parent, exp.Neg | exp.Paren):
                parent = parent.parent
            col = None
            if isinstance(parent, _COMPARISONS):
                other = parent.expression if parent.this is ph else parent.this
                col = other if isinstance(other, exp.Column) else None
            elif isinstance(parent, exp.In | exp.Between):
                col = parent.this if isinstance(parent.this, exp.Column) else None
            if col is not None:
                kind = columns.get(col.name.lower())
        if out.get(ph.name) is None:
            out[ph.name] = kind
    return out


def _to_timestamp(name: str, value: Any) -> datetime:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            raise QueryError(
                f"parameter :{name}={value} is out of range for a timestamp (epoch ms)", code="bad_parameter"
            ) from None
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise QueryError(
                f"parameter :{name}={value!r} is not an ISO-8601 timestamp", code="bad_parameter"
            ) from None
        return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt
    raise QueryError(
        f"parameter :{name} must be a timestamp (epoch milliseconds or ISO-8601 text), got {type(value).__name__}",
        code="bad_parameter",
    )


def convert_param(name: str, value: Any, sql_type: str | None) -> Any:
    """One parameter value checked against its context type; raises QueryError (400) when it cannot fit."""
    if isinstance(value, list | dict | tuple | set | bytes):
        raise QueryError(
            f"parameter :{name} must be a single value (string, number, boolean or null)",
            code="bad_parameter",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise QueryError(f"parameter :{name} must be a finite number", code="bad_parameter")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise QueryError(f"parameter :{name}={value} does not fit a 64-bit integer", code="bad_parameter")
    if sql_type is None or value is None:
        return value
    if sql_type == "VARCHAR":
        if isinstance(value, str):
            return value
        if is_int:  # ids may be sent as integers; they are stored as text
            return str(value)
    elif sql_type == "TIMESTAMP":
        return _to_timestamp(name, value)
    elif sql_type == "BIGINT":
        if is_int:
            return value
    elif sql_type == "DOUBLE":
        if is_int or isinstance(value, float):
            return value
    elif sql_type == "BOOLEAN":
        if isinstance(value, bool):
            return value
    elif sql_type == "LIMIT":
        if is_int and value >= 0:
            return value
        raise QueryError(
            f"parameter :{name} is a LIMIT/OFFSET and must be a non-negative integer, got {value!r}",
            code="bad_parameter",
        )
    raise QueryError(
        f"parameter :{name} is compared with a {sql_type} column and cannot be {type(value).__name__} {value!r}",
        code="bad_parameter",
    )


def bind_params(stmt: Statement, params: Mapping[str, Any], types: Mapping[str, str | None]) -> dict[str, Any]:
    """Check that every named parameter is given (and nothing else), with a value of the right type."""
    if not isinstance(params, Mapping):
        raise QueryError("params must be an object of name -> value", code="bad_parameter")
    missing = [p for p in stmt.params if p not in params]
    if missing:
        raise QueryError(
            f"missing parameter :{missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""),
            code="missing_parameter",
            **stmt.position(missing[0]),
        )
    extra = sorted(set(params) - set(stmt.params))
    if extra:
        uses = ", ".join(":" + p for p in stmt.params) or "none"
        raise QueryError(f"unknown parameter :{extra[0]} (the query uses {uses})", code="bad_parameter")
    out = {}
    for name in stmt.params:
        try:
            out[name] = convert_param(name, params[name], types.get(name))
        except QueryError as e:
            pos = stmt.position(name)
            e.line, e.col = pos.get("line"), pos.get("col")
            raise
    return out
