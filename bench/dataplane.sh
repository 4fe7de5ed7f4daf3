#!/usr/bin/env bash
# The data-plane benchmark (not a test). On one network-namespace testbed (client, director, three real servers
# running nginx; VIP 10.0.0.100), in one run: bulk throughput (iperf3, 1 and 4 streams), requests/s with
# keep-alive and new connections/s (wrk, `Connection: close`), and p50/p99 latency at a fixed rate of new
# connections (open loop), for
#   direct        the client to one real server (the ceiling)
#   nft-fwd       nftables netdev `ether daddr set ... fwd` on the director (the DR ceiling)
#   nft-dnat      nftables DNAT + numgen with conntrack (the IPVS-NAT stand-in)
#   haproxy       HAProxy mode tcp, as many threads as Fulcrum workers
#   fulcrum-dr    fulcrum-director's AF_PACKET data plane, forward = "dr"
#   fulcrum-nat   the same, forward = "nat"
# plus the director's CPU and memory. Prints Markdown: medians, ratios against the targets (dr >= 0.8x nft-fwd
# throughput, dr >= 1.0x nft-dnat new conn/s, every Fulcrum mode >= 2x HAProxy new conn/s), every run, notes and
# the machine; keeps a copy in bench/results/dataplane-<UTC date>.md. A mode that does not work is reported as
# "failed: <reason>" and the others still run. Needs root; installs what it needs with apt-get.
#
#   bench/dataplane.sh [--seconds 10] [--repeat 3] [--rate 2000] [--connections 64] [--wrk-threads CPUS] [--workers 2]
#                      [--modes direct,nft-fwd,nft-dnat,haproxy,fulcrum-dr,fulcrum-nat]
#
# Takes about (6 x 5 measurements x seconds + setup) x repeat: some 15 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "dataplane: needs root (network namespaces)" >&2; exit 1; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need=()
have iperf3 || need+=(iperf3)
have wrk || need+=(wrk)
have haproxy || need+=(haproxy)
have nft || need+=(nftables)
have nginx || need+=(nginx-light)
have curl || need+=(curl)
have ip || need+=(iproute2)
have ss || need+=(iproute2)
have ping || need+=(iputils-ping)
have git || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
    echo "dataplane: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cargo build --release --workspace --bins
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
mkdir -p bench/results
out="bench/results/dataplane-$(date -u +%Y%m%d-%H%M%S).md"
FULCRUM_BIN_DIR="$bin" "$bin/bench_dataplane" "$@" | tee "$out"
echo "dataplane: kept in $out" >&2
