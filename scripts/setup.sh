#!/usr/bin/env bash
# Create .venv and install insession into it (with the test tools when called with "test").
# Idempotent: a second run only installs what changed. torch is pinned to the CPU wheel (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import insession, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
