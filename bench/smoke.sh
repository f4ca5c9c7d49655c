#!/usr/bin/env bash
# A first throughput check, loopback only, about a minute: one simulator measured directly,
# then the gateway over two simulators, then the same gateway with a consumer key and limits
# (key check, tiktoken estimate, reserve and settle on usage) kept in memory, then in Redis:
# plain, over TLS (a CA made here with openssl, trusted through server.ca_file), and on a
# three-node Redis Cluster; with wrk (64 connections, plain chat completions, instant simulated
# backends). The side-by-side benchmark against nginx is bench/compare.sh.
#
#   bash bench/smoke.sh            (BIN=path/to/switchyard to measure a build of your own)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v redis-cli >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server redis-tools; }
if [ -z "${BIN:-}" ]; then cargo build --release -q; fi
B=${BIN:-target/release/switchyard}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

. bench/lib.sh
P1=$(port); P2=$(port); PG=$(port); PL=$(port); PR=$(port); RP=$(port)
PT=$(port); RT=$(port); PC=$(port); C1=$(port); C2=$(port); C3=$(port)
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
# TLS: a CA and a certificate for localhost it issued.
(cd "$work" &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 1 -subj "/CN=smoke CA" &&
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout redis.key -out redis.csr -subj "/CN=localhost" &&
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext &&
  openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out redis.crt -days 1 -extfile ext) >/dev/null 2>&1
redis-server --port 0 --tls-port $RT --bind 127.0.0.1 --save "" --appendonly no \
  --tls-cert-file "$work/redis.crt" --tls-key-file "$work/redis.key" --tls-ca-cert-file "$work/ca.crt" \
  --tls-auth-clients no >/dev/null 2>&1 &
for p in $C1 $C2 $C3; do
  mkdir -p "$work/c$p"
  redis-server --port $p --bind 127.0.0.1 --save "" --appendonly no --dir "$work/c$p" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port $(port) >/dev/null 2>&1 &
done
K=bench-consumer-key-0
$B simulate --listen 127.0.0.1:$P1 --name s1 --api-key $K >/dev/null 2>&1 &
$B simulate --listen 127.0.0.1:$P2 --name s2 --api-key $K >/dev/null 2>&1 &
config() {
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[[backends]]
name = "s1"
url = "http://127.0.0.1:$P1"
auth = { type = "api_key", key = "$K" }
[[backends]]
name = "s2"
url = "http://127.0.0.1:$P2"
auth = { type = "api_key", key = "$K" }
TOML
}
config $PG > "$work/gw.toml"
consumer() { printf '[[consumers]]\nname = "bench"\nkey = "%s"\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000\n' $K; }
{ config $PL; consumer; } > "$work/limited.toml"
{ config $PR; consumer; printf '[limits]\nstore = "redis"\nfail_closed = true\nredis_url = "redis://127.0.0.1:%s"\n' $RP; } > "$work/redis.toml"
{ config $PT; consumer; printf '[limits]\nstore = "redis"\nfail_closed = true\nredis_url = "rediss://localhost:%s"\n' $RT; } > "$work/tls.toml"
sed -i "s|^\[server\]|[server]\nca_file = \"$work/ca.crt\"|" "$work/tls.toml"
{ config $PC; consumer; printf '[limits]\nstore = "redis"\nfail_closed = true\nredis_url = "redis://127.0.0.1:%s"\nredis_cluster = true\n' $C1; } > "$work/cluster.toml"
for p in $RP $RT $C1 $C2 $C3; do
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
redis-cli --cluster create 127.0.0.1:$C1 127.0.0.1:$C2 127.0.0.1:$C3 --cluster-replicas 0 --cluster-yes >/dev/null
for p in $C1 $C2 $C3; do
  for _ in $(seq 100); do redis-cli -p $p cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
done
RUST_LOG=warn $B serve --config "$work/gw.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/limited.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/redis.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/tls.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/cluster.toml" >/dev/null 2>&1 &
cat > "$work/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "bench-consumer-key-0"
LUA
for p in $P1 $P2 $PG $PL $PR $PT $PC; do
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
run() { wrk -t2 -c64 -d8s -s "$work/chat.lua" "http://127.0.0.1:$1$path" | awk '/Requests\/sec/ {rps=$2} /Latency/ {lat=$2} /Non-2xx/ {bad=$NF} END {printf "%s req/s, mean latency %s, non-2xx %s\n", rps, lat, (bad==""?0:bad)}'; }
echo "simulator direct:        $(run $P1)"
echo "gateway over 2 sims:     $(run $PG)"
echo "  + key, limits (memory): $(run $PL)"
echo "  + key, limits (Redis):  $(run $PR)"
echo "    Redis over TLS:       $(run $PT)"
echo "    3-node Redis Cluster: $(run $PC)"
