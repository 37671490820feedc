#!/usr/bin/env bash
# `make bench`: runs `python -m bench`, which starts its own throwaway Nexus
# (a server on 127.0.0.1 over an embedded PostgreSQL in a temporary directory,
# and for BENCH_SUITE=cluster also a 3-node Citus cluster; all removed
# afterwards) and exits non-zero, printing no figures, if a server cannot be
# reached or any call fails. Bounded: each scenario runs BENCH_DURATION seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
exec "$BIN/python" -m bench --duration "${BENCH_DURATION:-10}" --concurrency "${BENCH_CONCURRENCY:-64}" \
    --suite "${BENCH_SUITE:-all}" --scale "${BENCH_SCALE:-1}" "$@"
