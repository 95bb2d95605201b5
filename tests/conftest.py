"""The suite on several pytest workers (pytest-xdist: `scripts/test.sh` passes `-n 2 --dist loadscope
--no-loadscope-reorder`).

A worker runs a whole group at a time, and a group is a test file, so a module's fixtures (a NATS cluster,
a server) start once, on one worker. Two groups span files: the Spark files share one JVM
(`tests/features/spark_helpers.py`), and the console's files one server (a package fixture,
`tests/console/conftest.py`); a second worker would start either again, and two console servers starting
at once on 2 cores missed their 60 s readiness limit. The groups are made by the scheduler below, not by
`xdist_group` marks: with pytest 9.2, xdist 3.8's `loadgroup` no longer renames the test ids it groups by.
The two longest groups start first (Spark ~4 min, the console ~2 min on 2 workers): xdist's own order, by
number of tests, put Spark's dozen tests among the last groups, and the run of 21:08 UTC kept 1.25 of its 2
cores busy over 9.6 min. A worker's torch uses one thread: two workers' OpenMP pools on 2 cores made the
torch tests many times slower than one worker alone.
"""

from __future__ import annotations

import os

import pytest
from xdist.scheduler import LoadScopeScheduling

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def group(nodeid: str) -> str:
    """The group of a test id: "spark", "console" or the test's file."""
    path = nodeid.split("::", 1)[0]
    if "spark" in path.rsplit("/", 1)[-1]:
        return "spark"
    return "console" if path.startswith("tests/console/") else path


FIRST = ("spark", "console")  # the longest groups, started first


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The groups of FIRST ahead of the rest; otherwise the collection's order (a stable sort)."""
    items.sort(key=lambda item: FIRST.index(g) if (g := group(item.nodeid)) in FIRST else len(FIRST))


class _ByGroup(LoadScopeScheduling):
    """xdist's scope scheduling with `group` as the scope."""

    def _split_scope(self, nodeid: str) -> str:
        return group(nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> LoadScopeScheduling | None:
    return _ByGroup(config, log) if config.getvalue("dist") == "loadscope" else None
