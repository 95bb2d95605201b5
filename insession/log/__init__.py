"""The crash-safe embedded event log, its Parquet history export, and the item catalogue."""

from insession.log.catalog import Catalog
from insession.log.eventlog import AppendResult, EventLog

__all__ = ["AppendResult", "Catalog", "EventLog"]
