#!/usr/bin/env bash
# Create .venv and install insession into it (with the test tools and the Spark offline engine when called
# with "test").
# Idempotent: a second run only installs what changed. torch is pinned to the CPU wheel (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test,spark]"
# (the registry mirror's "Location ... is ignored" warnings are noise; every other line stays)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import insession, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
