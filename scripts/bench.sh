#!/usr/bin/env bash
# Runs the worker benchmark (benches/throughput.rs); the environment is passed
# through (BENCH_JOBS, BENCH_IDLE_SECS, BENCH_LATENCY_SAMPLES, BENCH_SECTIONS,
# BENCH_SPOOLS, RUST_LOG, ...).
#
# Spools are measured in three places unless BENCH_SPOOLS says otherwise:
# the temp dir (the machine's own disk), a fresh ext4 with a journal on a
# loop device (what a stock Debian /var/lib is: a sparse 32 GiB image with
# mkfs's default 256 MiB journal for that size; needs root and mkfs.ext4;
# made under /var/tmp and removed at exit), and tmpfs (/dev/shm).
#
# Usage: scripts/bench.sh [--quick] [--no-ext4]
#   --quick    smoke run: BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_LATENCY_SAMPLES=50
#   --no-ext4  skip the loop-device ext4
set -euo pipefail

usage() { echo "usage: $0 [--quick] [--no-ext4]" >&2; }

quick=0
ext4=1
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --no-ext4) ext4=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done

if [ "$quick" = 1 ]; then
    export BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_LATENCY_SAMPLES=50
fi

cd "$(dirname "$0")/.."

if [ -z "${BENCH_SPOOLS:-}" ]; then
    tmp="${TMPDIR:-/tmp}"
    spools="disk=$tmp"
    if [ "$ext4" = 1 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v mkfs.ext4 >/dev/null; then
            echo "bench.sh: skipping the journaled ext4 spool (needs root and mkfs.ext4)" >&2
        else
            work="$(mktemp -d /var/tmp/ai-cmd-bench-ext4.XXXXXX)"
            cleanup() {
                umount "$work/mnt" 2>/dev/null || true
                rm -rf "$work"
            }
            trap cleanup EXIT
            # A sparse image the size of a server's root file system, so
            # mkfs gives it the journal such a disk gets (256 MiB at 32 GiB;
            # a 1 GiB image gets 32 MiB, and every ~1500 fsynced results a
            # full journal stalls the worker for a checkpoint that a stock
            # /var/lib would not need). Lazy init: only what is written
            # takes space.
            truncate -s 32G "$work/image"
            mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$work/image"
            mkdir "$work/mnt"
            mount -o loop "$work/image" "$work/mnt"
            spools="$spools;ext4 with journal, loop device=$work/mnt"
        fi
    fi
    [ -d /dev/shm ] && spools="$spools;tmpfs=/dev/shm"
    export BENCH_SPOOLS="$spools"
fi

# Not exec: the trap removes the loop device afterwards.
cargo bench --bench throughput
