#!/usr/bin/env bash
# Runs one of the benchmarks, on this machine, in one go; both print every
# figure in the one report format of benches/common (ratios against the raw
# `bash -c true` loop measured in the same run).
#
#   scripts/bench.sh [throughput] [--quick] [--no-ext4]
#       The worker alone (benches/throughput.rs): throughput, the contract
#       loop and the CPU ceiling at P=1/P=2, latency, idle cost, with the
#       spool in the temp dir, on tmpfs (/dev/shm) and, as root with
#       mkfs.ext4, on a fresh journaled ext4 on a loop device (a sparse
#       32 GiB image under /var/tmp, as a stock /var/lib; removed at exit;
#       --no-ext4 skips it). BENCH_SPOOLS=label=dir;... overrides the places.
#   scripts/bench.sh peers [--quick]
#       Against pueue and systemd-run (benches/peers.rs). pueue is installed
#       from crates.io into target/peers when missing (cargo install --locked
#       --root target/peers pueue; skipped with a notice if that fails);
#       systemd-run runs in the tier-3 sandbox (systemd-nspawn), which needs
#       root: without it that peer is skipped with a notice. Prints the
#       table BENCHMARKS.md carries, in Markdown.
#
#   --quick  smoke run: BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_ROUNDS=1
#            BENCH_LATENCY_SAMPLES=20 BENCH_BURST=1000
#
# The environment is passed through: BENCH_JOBS (1000), BENCH_IDLE_SECS (30,
# peers 60), BENCH_LATENCY_SAMPLES (200), BENCH_ROUNDS (5), BENCH_BURST (the
# idle section's burst, 20000), BENCH_SECTIONS,
# BENCH_SPOOLS, BENCH_TOOLS, BENCH_WORKER, RUST_BACKTRACE (the daemons get
# the shell's). Build and run hold /var/tmp/bench.lock, so that they never
# overlap another measurement. Writes nothing outside target/ and temp dirs.
set -euo pipefail

usage() { echo "usage: $0 [throughput|peers] [--quick] [--no-ext4]" >&2; }

bench=throughput
quick=0
ext4=1
for arg in "$@"; do
    case "$arg" in
        throughput|peers) bench="$arg" ;;
        --quick) quick=1 ;;
        --no-ext4) ext4=0 ;;
        --markdown) ;; # the peers table is always Markdown now
        -h|--help) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done
if [ "$quick" = 1 ]; then
    export BENCH_JOBS=100 BENCH_IDLE_SECS=5 BENCH_ROUNDS=1 BENCH_LATENCY_SAMPLES=20 BENCH_BURST=1000
fi

cd "$(dirname "$0")/.."
lock=/var/tmp/bench.lock
command -v flock >/dev/null || { echo "flock is missing (apt-get install util-linux)" >&2; exit 1; }

if [ "$bench" = peers ]; then
    peers=target/peers
    if ! [ -x "$peers/bin/pueue" ] || ! [ -x "$peers/bin/pueued" ]; then
        echo "pueue: not in $peers; installing it (cargo install --locked --root $peers pueue)"
        flock "$lock" cargo install --locked --root "$peers" pueue ||
            echo "NOTICE: pueue will be SKIPPED: cargo install pueue failed (see above)" >&2
    fi
    if [ -x "$peers/bin/pueue" ]; then
        export BENCH_PUEUE="$PWD/$peers/bin/pueue"
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "NOTICE: systemd-run will be SKIPPED: not root (the tier-3 sandbox needs root)" >&2
    elif ! command -v systemd-nspawn >/dev/null; then
        echo "NOTICE: systemd-run will be SKIPPED: no systemd-nspawn (apt-get install systemd-container)" >&2
    fi
    echo "RUST_BACKTRACE=${RUST_BACKTRACE-<unset>} (the daemons run with the shell's environment)"
elif [ -z "${BENCH_SPOOLS:-}" ]; then
    spools="disk=${TMPDIR:-/tmp}"
    if [ "$ext4" = 1 ] && { [ "$(id -u)" != 0 ] || ! command -v mkfs.ext4 >/dev/null; }; then
        echo "bench.sh: skipping the journaled ext4 spool (needs root and mkfs.ext4)" >&2
    elif [ "$ext4" = 1 ]; then
        work="$(mktemp -d /var/tmp/ai-cmd-bench-ext4.XXXXXX)"
        # mkfs gives a 32 GiB image the 256 MiB journal of a server's root
        # (a 1 GiB one gets 32 MiB, which fills every ~1500 fsynced results
        # and stalls the worker on checkpoints). Sparse, lazily initialised.
        truncate -s 32G "$work/image"
        mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$work/image"
        mkdir "$work/mnt"
        mount -o loop "$work/image" "$work/mnt"
        spools="$spools;ext4 with journal, loop device=$work/mnt"
    fi
    [ -d /dev/shm ] && spools="$spools;tmpfs=/dev/shm"
    export BENCH_SPOOLS="$spools"
fi
if [ "$bench" = throughput ] && [ "$(id -u)" = 0 ] && [ -z "${BENCH_FULL_BASE:-}" ]; then
    # isolation = "full" needs a spool whose parents the worker's user
    # cannot write, as the package's: a tmpfs of root's (mode 0755) under
    # /run, where the section runs the worker as nobody.
    full="$(mktemp -d /run/ai-cmd-bench-full.XXXXXX)"
    mount -t tmpfs -o mode=0755,size=2g tmpfs "$full"
    export BENCH_FULL_BASE="$full"
fi
if [ "$bench" = throughput ] && [ "$(id -u)" = 0 ] && [ -z "${BENCH_CGROUP:-}" ] &&
    mnt="$(findmnt -n -t cgroup2 -o TARGET | head -n1)" && [ -n "$mnt" ]; then
    # A cgroup per job needs a delegated cgroup v2 subtree, as Delegate=yes
    # gives the packaged unit: one made here (marked as systemd marks it),
    # handed to nobody, who runs the worker at isolation = "full".
    cg="$mnt/ai-cmd-bench.$$"
    mkdir "$cg"
    chown 65534:65534 "$cg" "$cg/cgroup.procs" "$cg/cgroup.subtree_control" "$cg/cgroup.threads"
    python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.delegate", b"1")' "$cg"
    export BENCH_CGROUP="$cg"
fi
cleanup() {
    if [ -n "${work:-}" ]; then umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; fi
    if [ -n "${full:-}" ]; then umount "$full" 2>/dev/null || true; rmdir "$full" 2>/dev/null || true; fi
    if [ -n "${cg:-}" ]; then
        for d in "$cg"/*/ "$cg"; do
            echo 1 > "$d/cgroup.kill" 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do rmdir "$d" 2>/dev/null && break; sleep 0.2; done
        done
    fi
}
trap cleanup EXIT

# Not exec: the trap removes the loop device and the tmpfs afterwards.
flock "$lock" cargo bench --bench "$bench"
