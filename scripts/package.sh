#!/usr/bin/env bash
# Builds the Debian packages fulcrum-director and fulcrum-agent into target/debian/ (release build, once for
# both). Installs cargo-deb from crates.io if it is missing. Usage: scripts/package.sh
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v dpkg-shlibdeps >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
}
cargo build --release --locked -p fulcrum-director -p fulcrum-agent --bins
for package in fulcrum-director fulcrum-agent; do
    # Stripped (the debug build keeps the symbols); fast compression keeps the step short.
    cargo deb --no-build --locked --strip --fast -p "$package" -o target/debian/
done
ls -1 target/debian/*.deb
