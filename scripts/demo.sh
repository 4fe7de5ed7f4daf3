#!/usr/bin/env bash
# Fulcrum's demo, from a fresh Debian machine: builds the workspace, creates a cluster CA and certificates,
# and runs a director and an agent that reports a local nginx's load and response time over QUIC. Prints the
# director's live view of the agent for DEMO_SECONDS (default 20), then cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${DEMO_SECONDS:-20}

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { echo "demo: please install ${need[*]} (or run as root)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --workspace --bins
bin=target/release
work=$(mktemp -d /tmp/fulcrum-demo.XXXXXX)
chmod 755 "$work"   # nginx's workers run unprivileged and must read the document root
pids=()
cleanup() {
    # Newest first: the load and the agent (which says goodbye) stop before the director they talk to.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== certificates (no openssl needed)"
$bin/fulcrum-director certs ca --dir "$work/pki"
$bin/fulcrum-director certs issue --dir "$work/pki" --role director --name d1 --ip 127.0.0.1
$bin/fulcrum-director certs issue --dir "$work/pki" --role agent --name web1

echo "== a local web service: nginx on 127.0.0.1:18080"
mkdir -p "$work/www"
echo "hello from the demo real server" > "$work/www/index.html"
cat > "$work/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    fastcgi_temp_path $work/tmp;
    uwsgi_temp_path $work/tmp;
    scgi_temp_path $work/tmp;
    server { listen 127.0.0.1:18080; root $work/www; }
}
NGINX
mkdir -p "$work/tmp"
"$nginx_bin" -c "$work/nginx.conf" -e "$work/nginx-error.log" & pids+=($!)

cat > "$work/director.toml" <<TOML
name = "d1"

[agents]
listen = "127.0.0.1:17946"
ca = "$work/pki/ca.pem"
cert = "$work/pki/d1.pem"
key = "$work/pki/d1.key"

[control]
socket = "$work/director.sock"

[metrics]
listen = "127.0.0.1:19469"

[[service]]
vip = "192.0.2.10"
port = 18080

[[service.server]]
address = "127.0.0.1"
TOML
cat > "$work/agent.toml" <<TOML
name = "web1"
real_server = "127.0.0.1"
ports = [18080]

[[director]]
name = "d1"
address = "127.0.0.1:17946"

[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/web1.pem"
key = "$work/pki/web1.key"

[probe]
kind = "http"
path = "/"

[metrics]
listen = "127.0.0.1:19470"
TOML
$bin/fulcrum-director check-config --config "$work/director.toml"
$bin/fulcrum-agent check-config --config "$work/agent.toml"

echo "== director and agent"
RUST_LOG=warn $bin/fulcrum-director run --config "$work/director.toml" & pids+=($!)
RUST_LOG=warn $bin/fulcrum-agent --config "$work/agent.toml" & pids+=($!)
echo "director metrics: http://127.0.0.1:19469/metrics   agent metrics: http://127.0.0.1:19470/metrics"

# Some load on the service, so that the numbers move.
( end=$((SECONDS + seconds)); while [ $SECONDS -lt $end ]; do curl -s -o /dev/null http://127.0.0.1:18080/ || true; done ) & pids+=($!)

for ((i = 0; i < seconds; i++)); do
    sleep 1
    printf '\n== t=%ss  fulcrumctl agents\n' "$((i + 1))"
    $bin/fulcrumctl --socket "$work/director.sock" agents || true
done
echo
echo "== director metrics (excerpt)"
curl -s http://127.0.0.1:19469/metrics | grep -E '^fulcrum_server_(cpu_ratio|response_time_seconds|report_age_seconds)' || true
