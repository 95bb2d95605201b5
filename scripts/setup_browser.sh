#!/usr/bin/env bash
# Installs what the browser tests (tests/console/) need, idempotently: Debian's chromium (Playwright cannot
# download its own browsers here; the tests launch /usr/bin/chromium) and Playwright for Python into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi

if ! .venv/bin/python -c "import playwright" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "playwright>=1.40"
fi
