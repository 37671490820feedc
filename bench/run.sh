#!/usr/bin/env bash
# Runs `nexus bench`, which starts its own throwaway Nexus (embedded PostgreSQL
# in a temporary directory, removed afterwards) on 127.0.0.1 and exits non-zero
# if the server cannot be reached or any call fails. Bounded: each scenario runs
# BENCH_DURATION seconds (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
exec "$BIN/nexus" bench --duration "${BENCH_DURATION:-10}" --concurrency "${BENCH_CONCURRENCY:-64}" \
    --suite "${BENCH_SUITE:-all}"
