#!/usr/bin/env bash
# Command 2 of the README: install the test tools, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/setup_browser.sh
scripts/setup_java.sh
.venv/bin/ruff check insession tests bench
# two workers, one group of tests each at a time (a file; the Spark files together: one JVM; the console's
# files: one server), the longest groups first (tests/conftest.py); INSESSION_TEST_WORKERS=0 runs the suite
# in this process
.venv/bin/python -m pytest -n "${INSESSION_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
