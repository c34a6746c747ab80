#!/usr/bin/env bash
# Builds the Debian package: the release binary, the man page and shell
# completions generated from the clap definitions, then cargo-deb.
#
# Usage: scripts/build-deb.sh [cargo-deb options, e.g. --deb-version 0.1.1-1 -o out.deb]
# Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked
rm -rf target/assets
"$target/release/ai-cmd-executor" generate-assets target/assets >/dev/null
gzip -9n target/assets/man/ai-cmd-executor.1
cargo deb --no-build --locked "$@" | tail -n 1
