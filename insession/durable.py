"""Files that are either absent or complete and on disk: the one definition of fsync-then-rename.

A file is written beside its target under a temporary name, fsynced, renamed over the target, and the
directory is fsynced so the rename itself survives a power loss. Used by the log's Parquet export, the
feature registry and the feature snapshots.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync the written file `tmp`, rename it over `path`, fsync the directory."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically and durably (a temporary file beside it, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    replace_durably(tmp, path)
