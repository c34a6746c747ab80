#!/usr/bin/env bash
# Runs the worker benchmark (benches/throughput.rs); the environment is passed
# through (BENCH_JOBS, BENCH_IDLE_SECS, BENCH_LATENCY_SAMPLES, RUST_LOG, ...).
#
# Usage: scripts/bench.sh [--quick]
#   --quick   smoke run: BENCH_JOBS=100 BENCH_IDLE_SECS=5
set -euo pipefail

usage() { echo "usage: $0 [--quick]" >&2; }

quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done

if [ "$quick" = 1 ]; then
    export BENCH_JOBS=100 BENCH_IDLE_SECS=5
fi

cd "$(dirname "$0")/.."
exec cargo bench --bench throughput
