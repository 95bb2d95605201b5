"""One local Spark engine for every Spark test of the session (the JVM starts once: ~10 s)."""

from __future__ import annotations

import functools
import shutil

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from insession.offline.spark_engine import SparkEngine, spark_session

# Small on purpose: 2 local cores at most, one shuffle partition per stage (the test data is tiny; every
# extra partition is a task's overhead), a driver heap that holds a whole session of Spark tests. No code
# generation: on rows by the dozen compiling each stage's Java costs more than it saves (one parity
# computation of every kind: 23 s of JVM CPU interpreted against 28-38 s compiled, 14:16 UTC); the results
# are Spark's either way (it falls back to the same interpreted operators wherever code generation fails).
TEST_CONF = {
    "spark.sql.shuffle.partitions": "1",
    "spark.default.parallelism": "1",
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
    "spark.driver.memory": "2g",  # 1g: a clean-clone suite hung in test_spark_top, the JVM at 190% CPU
}


@functools.cache
def _engine() -> SparkEngine:
    return SparkEngine(session=spark_session("local[2]", ui=False, conf=TEST_CONF))


def shared_spark_engine() -> SparkEngine:
    """The session's Spark engine; skips only when no Java runtime is installed (scripts/test.sh installs
    one through scripts/setup_java.sh, so CI runs these tests)."""
    if shutil.which("java") is None:
        pytest.skip("no Java runtime on PATH: Spark needs Java 17+ (scripts/setup_java.sh installs it)")
    return _engine()


def spark_settings(max_examples: int) -> settings:
    """Hypothesis settings of the Spark property tests: a few examples (each one a Spark job), no shrinking,
    fixed examples (derandomize: a clean-clone suite sees the developer's), no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def several_events(streams: st.SearchStrategy[list]) -> st.SearchStrategy[list]:
    """`streams` without its one-event streams. Hypothesis tries the simplest example first (a stream of one
    event, read once), which costs a Spark computation (~10-20 s) and checks less than each test's explicit
    examples; with it filtered out (no randomness drawn) the random examples that follow are the same."""
    return streams.filter(lambda events: len(events) > 1)
