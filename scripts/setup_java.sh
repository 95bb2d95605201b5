#!/usr/bin/env bash
# Installs the Java runtime the Spark offline engine (insession/offline/spark_engine.py) and its tests need,
# idempotently: Debian's openjdk-17-jre-headless when no Java 17 or newer is on PATH (PySpark 4 needs 17+;
# Spark cannot fetch anything at run time here, and needs no more than the runtime).
set -euo pipefail
cd "$(dirname "$0")/.."

java_major() {
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1
}

if [ "$(java_major)" -lt 17 ] 2>/dev/null || [ -z "$(java_major)" ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends openjdk-17-jre-headless
fi
java -version 2>&1 | head -n 1
