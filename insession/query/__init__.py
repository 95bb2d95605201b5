"""The SQL-friendly query interface: sqlglot-parsed, sandboxed, routed to the serving or analytics lane."""

from insession.query.analytics import AnalyticsLane, Limits, Sources
from insession.query.errors import QueryError
from insession.query.service import Explanation, QueryListener, QueryService, Result

__all__ = [
    "AnalyticsLane",
    "Explanation",
    "Limits",
    "QueryError",
    "QueryListener",
    "QueryService",
    "Result",
    "Sources",
]
