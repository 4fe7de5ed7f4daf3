#!/usr/bin/env bash
# Fulcrum's whole test suite, from a fresh Debian machine: installs what the tests need, then runs the format
# and lint checks and every test. Needs root (the end-to-end tests build network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the end-to-end tests build network namespaces and need root" >&2
    exit 1
fi

# Debian packages the tests use: iproute2 (namespaces, veth, bridges), nginx (real servers), curl, tcpdump
# (tunnel mode is checked by capturing its frames: this kernel cannot decapsulate IP-in-IP).
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ss >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v sha256sum >/dev/null || need+=(coreutils)
# Operators' tooling: real Prometheus and promtool (dashboard and scrape-config tests), systemd-analyze (unit
# files), dpkg-dev (cargo-deb's dependency computation for the package test).
command -v prometheus >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# A stock nginx package starts a system-wide nginx; the tests run their own per namespace.
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The package test builds .deb files with cargo-deb.
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run the workspace's binaries.
cargo build --workspace --bins
cargo test --workspace
