"""Query errors: every refusal carries an HTTP status, a readable message and, where known, a position."""

from __future__ import annotations

import re
from typing import Any

# An absolute filesystem path (two or more segments) inside a message: an engine's error about a file
# it read. Clients are told what failed, never where the server keeps its files.
_PATH = re.compile(r"""(?<![\w.])/(?:[^/\s'"]+/)+[^/\s'"]*""")


def without_paths(text: str) -> str:
    """`text` with absolute filesystem paths replaced by `<server file>`."""
    return _PATH.sub("<server file>", text)


class QueryError(Exception):
    """A query was refused or failed because of its input or the lane's limits (never a server fault).

    `status` is the HTTP status the server answers with (400 bad SQL or params, 403 role, 408 timeout,
    413 too much memory, 429 analytics queue full); `line`/`col` are 1-based where the parser knows them.
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        line: int | None = None,
        col: int | None = None,
        code: str = "invalid_query",
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.line = line
        self.col = col
        self.code = code
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the error answer (without filesystem paths: `str(e)` keeps them for logs)."""
        doc: dict[str, Any] = {"error": without_paths(self.message), "code": self.code}
        if self.line is not None:
            doc["position"] = {"line": self.line, "col": self.col}
        if self.retry_after_s is not None:
            doc["retry_after_s"] = self.retry_after_s
        return doc

    def __str__(self) -> str:
        where = f" (line {self.line}, col {self.col})" if self.line is not None else ""
        return f"{self.message}{where}"
