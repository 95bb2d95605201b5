#!/usr/bin/env bash
# Command 2 of the README: install the test tools, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/setup_browser.sh
scripts/setup_java.sh
.venv/bin/ruff check insession tests bench
.venv/bin/python -m pytest "$@"
