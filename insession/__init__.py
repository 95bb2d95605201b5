"""insession: real-time in-session personalisation — a feature store and the Dual Sequence ReRanker.

`insession.open(data_dir)` gives the embedded handle, `insession.Client(url, api_key=None)` the remote
one; both have `insert(table, rows)`, `select(sql, **params)`, `rank(user_id, ...)` and `close()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from insession.client import Client
    from insession.embedded import Insession, open

__all__ = ["Client", "Insession", "open"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import insession.schema` stays light and free of import cycles.
    if name == "Client":
        from insession.client import Client

        return Client
    if name in ("open", "Insession"):
        from insession import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'insession' has no attribute {name!r}")
