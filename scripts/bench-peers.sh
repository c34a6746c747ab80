#!/usr/bin/env bash
# Kept for old notes and habits: the peers comparison is `scripts/bench.sh peers`.
exec "$(dirname "$0")/bench.sh" peers "$@"
