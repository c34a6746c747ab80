#!/usr/bin/env bash
# Compares ai-cmd-executor with pueue and systemd-run (benches/peers.rs), in
# one run on this machine. Writes nothing outside target/ and the temp dir.
#
#   - pueue: installed from crates.io into target/peers when missing
#     (cargo install --locked --root target/peers pueue); nothing committed.
#   - systemd-run: runs in the tier-3 sandbox (systemd-nspawn), which needs
#     root; without root, or without systemd-nspawn, it is skipped with a
#     notice. Everything else runs as any user.
#
# The environment is passed through (RUST_BACKTRACE as the shell has it,
# BENCH_JOBS, BENCH_IDLE_SECS, BENCH_LATENCY_SAMPLES, ...). Builds and the
# run hold /var/tmp/bench.lock, so they never overlap other measurements.
#
# Usage: scripts/bench-peers.sh [--quick] [--markdown]
#   --quick     smoke run: BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_LATENCY_SAMPLES=20
#   --markdown  also print the table as Markdown (for BENCHMARKS.md)
set -euo pipefail

usage() { echo "usage: $0 [--quick] [--markdown]" >&2; }

quick=0
bench_args=()
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --markdown) bench_args+=(--markdown) ;;
        -h|--help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done
if [ "$quick" = 1 ]; then
    export BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_LATENCY_SAMPLES=20
fi

cd "$(dirname "$0")/.."
lock=/var/tmp/bench.lock
command -v flock >/dev/null || { echo "flock is missing (apt-get install util-linux)" >&2; exit 1; }

# pueue, for the benchmark only.
peers=target/peers
if [ -x "$peers/bin/pueue" ] && [ -x "$peers/bin/pueued" ]; then
    echo "pueue: using $peers/bin/pueue ($("$peers/bin/pueue" --version))"
    export BENCH_PUEUE="$PWD/$peers/bin/pueue"
else
    echo "pueue: not in $peers; installing it from crates.io (cargo install --locked --root $peers pueue)"
    if flock "$lock" cargo install --locked --root "$peers" pueue; then
        export BENCH_PUEUE="$PWD/$peers/bin/pueue"
    else
        echo "NOTICE: pueue will be SKIPPED: cargo install pueue failed (see above)" >&2
        unset BENCH_PUEUE
    fi
fi

# systemd-run, in the tier-3 sandbox.
if [ "$(id -u)" != 0 ]; then
    echo "NOTICE: systemd-run will be SKIPPED: not running as root (the tier-3 sandbox, systemd-nspawn, needs root)" >&2
elif ! command -v systemd-nspawn >/dev/null; then
    echo "NOTICE: systemd-run will be SKIPPED: systemd-nspawn is missing (apt-get install systemd-container)" >&2
else
    echo "systemd-run: in a sandbox booted with $(systemd-nspawn --version | head -n 1)"
fi

echo "RUST_BACKTRACE=${RUST_BACKTRACE-<unset>} (the daemons run with the shell's environment)"
exec flock "$lock" cargo bench --bench peers -- "${bench_args[@]}"
