#!/usr/bin/env bash
# Installs the browser the console tests (tests/console/) drive, idempotently: Debian's chromium (Playwright,
# from the test extra, cannot download its own browsers here; the tests launch /usr/bin/chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi

