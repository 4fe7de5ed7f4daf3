#!/usr/bin/env bash
# The director holding 1,000,000 tracked connections: its memory, and its CPU while filling and while idle.
# Builds a throw-away network-namespace testbed; needs root. Prints a table.
#   bench/million.sh [FLOWS]   (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "million: needs root (network namespaces)" >&2; exit 1; }
cargo build --release --workspace --bins
exec target/release/bench_million "$@"
