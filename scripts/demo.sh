#!/usr/bin/env bash
# Fulcrum's demo, from a fresh Debian machine, as root: builds the release binaries and runs
# `fulcrum-director demo`, a throw-away playground of network namespaces (a client, two directors, three real
# servers of unequal capacity with their agents) with a live table; the active director is killed half-way.
# Arguments go to `fulcrum-director demo` (e.g. `--seconds 30`; `--help` lists them). Ctrl-C stops it and
# removes everything it made.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: run me as root (the demo creates network namespaces)" >&2; exit 1; }
if ! command -v ip >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi

cargo build --release --bin fulcrum-director --bin fulcrum-agent --bin fulcrumctl
exec target/release/fulcrum-director demo "$@"
