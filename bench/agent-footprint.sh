#!/usr/bin/env bash
# The agent's own cost: CPU time and resident memory of one fulcrum-agent reporting every 500 ms (HTTP probe
# of a real nginx) to a director, each in its own network namespace. Prints a table. Needs root.
#   bench/agent-footprint.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
[ "$(id -u)" -eq 0 ] || { echo "agent-footprint: needs root (network namespaces)" >&2; exit 1; }
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --workspace --bins >/dev/null
bin=$PWD/target/release

tag=fb$$
work=$(mktemp -d /tmp/fulcrum-footprint.XXXXXX)
chmod 755 "$work"   # nginx's workers run unprivileged and must read the document root
cleanup() {
    for ns in ${tag}d ${tag}r; do
        for pid in $(ip netns pids $ns 2>/dev/null); do kill -9 $pid 2>/dev/null || true; done
        ip netns del $ns 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip netns add ${tag}d; ip netns add ${tag}r
ip link add ${tag}a type veth peer name ${tag}b
ip link set ${tag}a netns ${tag}d; ip link set ${tag}b netns ${tag}r
ip -n ${tag}d addr add 10.77.0.2/24 dev ${tag}a; ip -n ${tag}r addr add 10.77.0.11/24 dev ${tag}b
for ns in ${tag}d ${tag}r; do ip -n $ns link set lo up; done
ip -n ${tag}d link set ${tag}a up; ip -n ${tag}r link set ${tag}b up

$bin/fulcrum-director certs ca --dir "$work/pki" >/dev/null
$bin/fulcrum-director certs issue --dir "$work/pki" --role director --name d1 >/dev/null
$bin/fulcrum-director certs issue --dir "$work/pki" --role agent --name web1 >/dev/null
cat > "$work/director.toml" <<TOML
name = "d1"
[agents]
listen = "10.77.0.2:7946"
ca = "$work/pki/ca.pem"
cert = "$work/pki/d1.pem"
key = "$work/pki/d1.key"
[control]
socket = "$work/director.sock"
[[service]]
vip = "10.77.0.100"
port = 80
[[service.server]]
address = "10.77.0.11"
TOML
mkdir -p "$work/www" "$work/tmp"; echo ok > "$work/www/index.html"
cat > "$work/nginx.conf" <<NGINX
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.log;
events { worker_connections 64; }
http { access_log off; client_body_temp_path $work/tmp; proxy_temp_path $work/tmp; fastcgi_temp_path $work/tmp;
       uwsgi_temp_path $work/tmp; scgi_temp_path $work/tmp; server { listen 80; root $work/www; } }
NGINX
ip netns exec ${tag}r "$nginx_bin" -c "$work/nginx.conf" -e "$work/nginx.log" & disown
RUST_LOG=warn ip netns exec ${tag}d $bin/fulcrum-director run --config "$work/director.toml" & disown
for _ in $(seq 100); do [ -S "$work/director.sock" ] && break; sleep 0.1; done
RUST_LOG=warn ip netns exec ${tag}r $bin/fulcrum-agent --name web1 --real-server 10.77.0.11 --port 80 \
    --director d1@10.77.0.2:7946 --ca "$work/pki/ca.pem" --cert "$work/pki/web1.pem" --key "$work/pki/web1.key" \
    --probe-kind http --interval-ms 500 & disown
agent=$!
# Wait until the director has the agent's reports, then measure a steady state.
for _ in $(seq 100); do
    $bin/fulcrumctl --socket "$work/director.sock" agents --json 2>/dev/null | grep -q '"reports": [1-9]' && break
    sleep 0.1
done
pid=$(pgrep -f -n "fulcrum-agent --name web1 --real-server 10.77.0.11") || pid=$agent
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' /proc/$pid/stat; }
start_cpu=$(cpu); start_reports=$($bin/fulcrumctl --socket "$work/director.sock" agents --json | awk -F': ' '/"reports"/ {gsub(",","",$2); print $2}')
sleep "$seconds"
end_cpu=$(cpu); end_reports=$($bin/fulcrumctl --socket "$work/director.sock" agents --json | awk -F': ' '/"reports"/ {gsub(",","",$2); print $2}')
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status); hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
threads=$(awk '/Threads/ {print $2}' /proc/$pid/status)
cpu_pct=$(awk -v d=$((end_cpu - start_cpu)) -v t=$ticks -v s=$seconds 'BEGIN { printf "%.3f", 100 * d / t / s }')
cpu_ms_per_report=$(awk -v d=$((end_cpu - start_cpu)) -v t=$ticks -v r=$((end_reports - start_reports)) 'BEGIN { if (r > 0) printf "%.3f", 1000 * d / t / r; else print "-" }')

echo
echo "fulcrum-agent footprint: 1 director, HTTP probe, 500 ms interval, ${seconds} s steady state"
echo "machine: $(nproc) cores, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//'), kernel $(uname -r)"
printf '| %-28s | %12s |\n' "measure" "value"
printf '| %-28s | %12s |\n' "----------------------------" "------------"
printf '| %-28s | %12s |\n' "reports received" "$((end_reports - start_reports))"
printf '| %-28s | %11s%% |\n' "CPU (of one core)" "$cpu_pct"
printf '| %-28s | %12s |\n' "CPU per report (ms)" "$cpu_ms_per_report"
printf '| %-28s | %9s KiB |\n' "RSS at end" "$rss"
printf '| %-28s | %9s KiB |\n' "peak RSS (VmHWM)" "$hwm"
printf '| %-28s | %12s |\n' "threads" "$threads"
