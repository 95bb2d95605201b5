"""Parsing, the sandbox, parameters and errors of the query interface."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insession.query import QueryError
from insession.query.sql import parse
from insession.query.tables import connect
from insession.schema import EVENT_ARROW_SCHEMA, ITEM_ARROW_SCHEMA

from .conftest import World

TABLES = ("events", "items", "features")

ESCAPES = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'history/day=2026-01-01/part-0-1.parquet'",
    "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "SELECT * FROM read_json('/etc/hosts')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/shadow')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM parquet_metadata('/tmp/x.parquet')",
    "SELECT * FROM sqlite_scan('/work/main/data/log.sqlite', 'events')",
    "SELECT getenv('HOME')",
    "SELECT current_setting('enable_external_access')",
    "SELECT * FROM duckdb_settings()",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM query('SELECT 42')",
    "SELECT * FROM query_table('events')",
    "ATTACH '/tmp/evil.db' AS evil",
    "COPY events TO '/tmp/stolen.csv'",
    "COPY (SELECT * FROM events) TO '/tmp/stolen.parquet' (FORMAT PARQUET)",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA enable_external_access",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "CREATE TABLE t AS SELECT * FROM events",
    "CREATE MACRO m() AS 1",
    "INSERT INTO events SELECT * FROM events",
    "DELETE FROM events",
    "DROP VIEW events",
    "SELECT * INTO stolen FROM events",
    "SELECT 1; COPY events TO '/tmp/x.csv'",
    "SELECT * FROM events; ATTACH '/tmp/x.db'",
    "SELECT * FROM main.events",
    "SELECT * FROM memory.main._tail",
    "SELECT * FROM _tail",
    "SELECT * FROM _history",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM pg_catalog.pg_class",
    "SELECT * FROM duckdb_tables",
    "SELECT * FROM events WHERE user_id IN (SELECT * FROM read_csv('/etc/passwd'))",
    "WITH x AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM x",
    "SELECT (SELECT getenv('USER'))",
    "SELECT * FROM events JOIN glob('/etc/*') g ON true",
    "EXPLAIN COPY events TO '/tmp/x.csv'",
    "EXPLAIN ANALYZE SELECT * FROM read_csv('/etc/passwd')",
    "DESCRIBE events",
    "SHOW TABLES",
    "USE memory",
    "CALL pragma_version()",
    "SELECT * FROM events AS e, LATERAL read_csv('/etc/passwd')",
    "SELECT load_extension('httpfs')",
    "SELECT * FROM events WHERE ts > $1",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_escape_attempts_are_refused(world: World, sql: str) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute(sql, {}, None)
    assert info.value.status == 400
    assert info.value.code in {
        "forbidden_statement",
        "forbidden_function",
        "forbidden_table",
        "unknown_table",
        "syntax_error",
        "bad_parameter",
    }, info.value.code


def test_there_are_at_least_twenty_escape_attempts() -> None:
    assert len(set(ESCAPES)) >= 20


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "ATTACH '/tmp/evil.db'",
        "COPY (SELECT 1) TO '/tmp/x.csv'",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "INSTALL httpfs",
    ],
)
def test_duckdb_itself_is_locked_down(sql: str) -> None:
    """Defence in depth: even SQL that got past the sandbox cannot reach files or change settings."""
    con = connect(history_dir=None, tail=EVENT_ARROW_SCHEMA.empty_table(), items=ITEM_ARROW_SCHEMA.empty_table())
    with pytest.raises(duckdb.Error):
        con.execute(sql)


def test_history_is_readable_but_nothing_else(world: World) -> None:
    con = connect(
        history_dir=world.history_dir,
        tail=world.log.tail_arrow(world.log.exported_offset() + 1),
        items=world.catalog.to_arrow(),
    )
    assert con.execute("SELECT count(*) FROM events").fetchone() == (world.log.count(),)
    with pytest.raises(duckdb.Error):
        con.execute(f"SELECT * FROM read_csv('{world.dir / 'catalog.sqlite'}')").fetchall()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT action, count(*) AS n FROM events GROUP BY action ORDER BY n DESC",
        "SELECT e.user_id, i.category, count(*) FROM events e JOIN items i ON e.item_id = i.item_id "
        "WHERE i.available GROUP BY ALL",
        "SELECT date_trunc('hour', ts) AS h, count(*) FILTER (WHERE action = 'add_to_cart') FROM events "
        "GROUP BY 1",
        "SELECT item_id, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC) AS rn FROM events "
        "QUALIFY rn <= 3",
        "WITH s AS (SELECT user_id, min(ts) a, max(ts) b FROM events GROUP BY 1) "
        "SELECT avg(date_diff('second', a, b)) FROM s",
        "SELECT json_extract_string(properties, '$.q') AS q, count(*) FROM events GROUP BY q",
        "SELECT approx_count_distinct(item_id), quantile_cont(price, 0.9) FROM items",
        'SELECT * EXCLUDE (properties) FROM events ORDER BY "offset" DESC LIMIT 10',
        "SELECT epoch_ms(ts), strftime(ts, '%Y-%m-%d'), ts::DATE FROM events LIMIT 1",
        "SELECT count(*) FROM events WHERE ts > now() - INTERVAL '2 hours'",
        "SELECT a.user_id FROM events a UNION SELECT b.item_id FROM events b",
        "SELECT * FROM events WHERE item_id IN (SELECT item_id FROM items WHERE NOT available)",
        "EXPLAIN SELECT count(*) FROM events",
    ],
)
def test_ordinary_analytics_sql_is_allowed(world: World, sql: str) -> None:
    result = world.query.execute(sql)
    assert result.lane == "analytics"
    assert result.columns


def test_syntax_error_has_a_position() -> None:
    with pytest.raises(QueryError) as info:
        parse("SELECT user_id FROM events\nWHERE (ts >", TABLES)
    e = info.value
    assert e.status == 400 and e.code == "syntax_error"
    assert e.line == 2 and e.col is not None

    with pytest.raises(QueryError) as info:
        parse("SELECT FROM WHERE x", TABLES)
    assert (info.value.line, info.value.col) == (1, 13)  # WHERE


def test_unknown_table_names_it_and_its_position() -> None:
    with pytest.raises(QueryError) as info:
        parse("SELECT *\nFROM orders", TABLES)
    assert info.value.code == "unknown_table"
    assert "orders" in info.value.message
    assert (info.value.line, info.value.col) == (2, 6)


def test_unknown_column_names_it_and_its_position(world: World) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute("SELECT user_id,\n  colour FROM events")
    e = info.value
    assert e.status == 400 and e.code == "unknown_column"
    assert "colour" in e.message and (e.line, e.col) == (2, 3)


def test_type_error_from_duckdb_is_a_400(world: World) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute("SELECT sum(user_id) FROM events")
    assert info.value.status == 400


def test_explain_keeps_positions_of_the_users_text() -> None:
    with pytest.raises(QueryError) as info:
        parse("EXPLAIN SELECT * FROM nope", TABLES)
    assert (info.value.line, info.value.col) == (1, 23)


@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        ({}, "missing_parameter", ":user"),
        ({"user": "u1"}, "missing_parameter", ":since"),
        ({"user": "u1", "since": 0, "n": 5, "other": 1}, "bad_parameter", ":other"),
        ({"user": ["u1"], "since": 0, "n": 5}, "bad_parameter", "single value"),
        ({"user": True, "since": 1_700_000_000_000, "n": 5}, "bad_parameter", "VARCHAR"),
        ({"user": "u1", "since": "last tuesday", "n": 5}, "bad_parameter", "ISO-8601"),
        ({"user": "u1", "since": 2.5, "n": 5}, "bad_parameter", "timestamp"),
        ({"user": "u1", "since": 10**30, "n": 5}, "bad_parameter", "64-bit"),
        ({"user": "u1", "since": 0, "n": -1}, "bad_parameter", "non-negative"),
        ({"user": "u1", "since": 0, "n": "5"}, "bad_parameter", "non-negative"),
    ],
)
def test_parameter_errors(world: World, params: dict, code: str, fragment: str) -> None:
    sql = "SELECT * FROM events WHERE user_id = :user AND ts > :since LIMIT :n"
    with pytest.raises(QueryError) as info:
        world.query.execute(sql, params)
    assert info.value.status == 400
    assert info.value.code == code
    assert fragment in info.value.message


def test_parameter_error_points_at_the_parameter(world: World) -> None:
    with pytest.raises(QueryError) as info:
        world.query.execute("SELECT * FROM events\nWHERE ts > :since", {"since": "soon"})
    assert (info.value.line, info.value.col) == (2, 12)


def test_parameters_are_bound_not_spliced(world: World) -> None:
    evil = "u1' OR '1'='1"
    r = world.query.execute("SELECT count(*) FROM events WHERE user_id = :user", {"user": evil})
    assert r.rows == [[0]]
    ok = world.query.execute(
        "SELECT count(*) FROM events WHERE user_id = :user AND ts > :since",
        {"user": "u1", "since": "2000-01-01T00:00:00Z"},
    )
    assert ok.rows[0][0] > 0


def test_integer_ids_are_accepted_as_text(world: World) -> None:
    r = world.query.execute("SELECT count(*) FROM events WHERE user_id = :user", {"user": 7})
    assert r.rows == [[0]]  # users are 'u0'..'u7'; 7 is bound as the text '7', not an error


# -- fuzzing: the parser and the lanes answer or refuse, never crash ---------------------------

FRAGMENTS = [
    "SELECT",
    "DISTINCT",
    "*",
    "count(*)",
    "user_id",
    "item_id",
    "ts",
    "category",
    "price",
    "FROM",
    "events",
    "items",
    "features",
    "WHERE",
    "=",
    ">",
    "<",
    "AND",
    "OR",
    "NOT",
    ":user",
    "$x",
    "?",
    "'u1'",
    "1",
    "-2.5",
    "NULL",
    "now()",
    "-",
    "INTERVAL",
    "15",
    "DAY",
    "ORDER",
    "BY",
    "DESC",
    "LIMIT",
    "GROUP",
    "HAVING",
    "(",
    ")",
    ",",
    ";",
    "JOIN",
    "ON",
    "USING",
    "UNION",
    "WITH",
    "AS",
    "x",
    "IN",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "::",
    "INT",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "--",
    "/*",
    "EXPLAIN",
    "read_csv('/etc/passwd')",
    "ATTACH",
    "COPY",
    "TO",
    "getenv('HOME')",
    "\n",
    "é",
    "\x00",
]
TEMPLATES = [
    "SELECT DISTINCT category FROM events WHERE user_id = :user AND ts > now() - INTERVAL 15 DAY "
    "ORDER BY ts DESC LIMIT 5",
    "SELECT * FROM features WHERE user_id = :user",
    "SELECT action, count(*) FROM events WHERE item_id = :user GROUP BY action",
    "SELECT e.user_id, count(*) FROM events e JOIN items i USING (item_id) GROUP BY 1 "
    "ORDER BY 2 DESC LIMIT 3",
]


@st.composite
def sql_text(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        words = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=25))
        return " ".join(words)
    base = draw(st.sampled_from(TEMPLATES))
    i = draw(st.integers(0, len(base)))
    j = draw(st.integers(i, min(len(base), i + 12)))
    insert = draw(st.sampled_from(FRAGMENTS) | st.text(max_size=4))
    return base[:i] + insert + base[j:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sql=sql_text(), user=st.one_of(st.text(max_size=5), st.integers(), st.none(), st.floats(), st.booleans())
)
def test_fuzzed_sql_answers_or_is_refused(world: World, sql: str, user: object) -> None:
    try:
        result = world.query.execute(sql, {"user": user} if ":user" in sql else {})
    except QueryError as e:
        assert 400 <= e.status < 500
    else:
        assert result.lane in ("serving", "analytics")
        assert all(len(row) == len(result.columns) for row in result.rows)
