#!/usr/bin/env bash
# Starts a throwaway Nexus (embedded PostgreSQL in a temporary directory) on
# 127.0.0.1, runs `nexus bench` against it, and stops it. Bounded: each
# scenario runs BENCH_DURATION seconds (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export NEXUS_DATA_DIR=${NEXUS_DATA_DIR:-$(mktemp -d /tmp/nexus-bench.XXXXXX)}
export NEXUS_HOST=127.0.0.1 NEXUS_PORT=${NEXUS_PORT:-50061} NEXUS_LOG_LEVEL=${NEXUS_LOG_LEVEL:-warning}
"$BIN/nexus" serve &
SERVER=$!
trap 'kill -TERM $SERVER; wait $SERVER' EXIT
for _ in $(seq 1 60); do "$BIN/nexus" health >/dev/null 2>&1 && break; sleep 0.5; done
"$BIN/nexus" bench --duration "${BENCH_DURATION:-10}" --concurrency "${BENCH_CONCURRENCY:-64}" \
    --suite "${BENCH_SUITE:-all}" --server-pid "$SERVER"
