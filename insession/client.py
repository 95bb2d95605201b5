"""The remote SDK (`insession.Client`): the embedded handle's verbs over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from insession.embedded import InsertResult
from insession.query import Result
from insession.rank import RankResponse
from insession.schema import TABLES, BatchRejected, FieldError

API_KEY_HEADER = "X-API-Key"


class RemoteError(RuntimeError):
    """The server answered with an error that is not a validation error of the sent rows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """`Client("http://127.0.0.1:8000", api_key=...)`: insert, select, rank, close; keeps one connection."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, body: Any) -> Any:
        resp = self._http.request(method, path, content=msgspec.json.encode(body),
                                  headers={"content-type": "application/json"})
        if resp.status_code >= 400:
            try:
                doc = resp.json()
            except ValueError:
                raise RemoteError(resp.status_code, resp.text) from None
            if isinstance(doc, dict) and "errors" in doc:
                errors = [msgspec.convert(e, FieldError) for e in doc["errors"]]
                raise BatchRejected(errors, resp.status_code)
            detail = doc.get("error") or doc.get("detail") if isinstance(doc, dict) else doc
            raise RemoteError(resp.status_code, str(detail))
        return resp.json()

    def insert(self, table: str, rows: list[dict[str, Any]]) -> InsertResult:
        """Insert rows into `events` or `items`; returns once the server stored them durably."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        method = "PUT" if table == "items" else "POST"
        return msgspec.convert(self._call(method, f"/v1/{table}", rows), InsertResult)

    def select(self, sql: str, **params: Any) -> Result:
        """Run a SQL-friendly query; the server routes it to the serving or the analytics lane."""
        return msgspec.convert(self._call("POST", "/v1/query", {"sql": sql, "params": params}), Result)

    def execute(self, sql: str, **params: Any) -> Result:
        """`select` under the name statements read better with: `CREATE FEATURE name AS SELECT ...`, `DROP
        FEATURE name`, `SHOW FEATURES`, `DESCRIBE FEATURE name` (see docs/features.md)."""
        return self.select(sql, **params)

    def rank(self, user_id: str, **request: Any) -> RankResponse:
        """Rank candidates (or the built-in candidate stage's ~60) for a shopper right now; see RankRequest."""
        return msgspec.convert(self._call("POST", "/v1/rank", {"user_id": user_id, **request}), RankResponse)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
