#!/usr/bin/env bash
# Director-pair failover: detection time and outage after kill -9 of the MASTER (medians of N runs, under
# load and idle), the idle heartbeat rate, compared on paper with keepalived and heartbeat defaults.
# Builds throw-away network-namespace testbeds; needs root. Prints a table. About 4 s per loaded run and
# 8 s per idle run.
#   bench/failover.sh [--runs 5] [--idle-runs 2] [--idle-seconds 5]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "failover: needs root (network namespaces)" >&2; exit 1; }
cargo build --release --workspace --bins
exec target/release/bench_failover "$@"
