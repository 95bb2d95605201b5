#!/usr/bin/env bash
# Command 1 of the README: install, then run the whole story on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/insession demo "$@"
