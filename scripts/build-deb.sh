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
gzip -9n target/assets/man/ai-cmd-executor.1 target/assets/man/ai-cmd-executor-mcp.1 \
    target/assets/man/ai-cmd-executor-protocol.7
deb=$(cargo deb --no-build --locked "$@" | tail -n 1)
# cargo-deb writes no md5sums control file; dpkg --verify and debsums read
# it from the package. Add one, for every file but the conffiles, as
# dh_md5sums does, and rebuild the archive with the same contents.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$deb" "$work/pkg"
(
    cd "$work/pkg"
    find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
        grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles 2>/dev/null) |
        xargs -r -d '\n' md5sum >DEBIAN/md5sums
)
chmod 0644 "$work/pkg/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz --build "$work/pkg" "$deb" >/dev/null
echo "$deb"
