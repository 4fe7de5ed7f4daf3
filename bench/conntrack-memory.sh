#!/usr/bin/env bash
# Memory per entry and speed of one worker's connection table, filled to a million entries (or ENTRIES):
# bytes per entry from the layout and from this process's VmRSS growth, insert / lookup / packet / expire
# rates, and the longest expire call under a budget. Prints a table; asserts nothing. No root needed.
#   bench/conntrack-memory.sh [ENTRIES]   (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --quiet --release -p fulcrum-director --example conntrack_bench -- "$@"
