#!/usr/bin/env bash
# A first throughput check, loopback only, about 40 seconds: one simulator measured directly,
# then the gateway over two simulators, then the same gateway with a consumer key and limits
# (key check, tiktoken estimate, reserve and settle on usage) kept in memory, then in Redis,
# with wrk (64 connections, plain chat completions, instant simulated backends). The
# side-by-side benchmark against nginx is bench/compare.sh.
#
#   bash bench/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
cargo build --release -q
B=target/release/switchyard
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

. bench/lib.sh
P1=$(port); P2=$(port); PG=$(port); PL=$(port); PR=$(port); RP=$(port)
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
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
{ config $PR; consumer; printf '[limits]\nstore = "redis"\nredis_url = "redis://127.0.0.1:%s"\n' $RP; } > "$work/redis.toml"
for p in $RP; do
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
RUST_LOG=warn $B serve --config "$work/gw.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/limited.toml" >/dev/null 2>&1 &
RUST_LOG=warn $B serve --config "$work/redis.toml" >/dev/null 2>&1 &
cat > "$work/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "bench-consumer-key-0"
LUA
for p in $P1 $P2 $PG $PL $PR; do
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
run() { wrk -t2 -c64 -d8s -s "$work/chat.lua" "http://127.0.0.1:$1$path" | awk '/Requests\/sec/ {rps=$2} /Latency/ {lat=$2} /Non-2xx/ {bad=$NF} END {printf "%s req/s, mean latency %s, non-2xx %s\n", rps, lat, (bad==""?0:bad)}'; }
echo "simulator direct:        $(run $P1)"
echo "gateway over 2 sims:     $(run $PG)"
echo "  + key, limits (memory): $(run $PL)"
echo "  + key, limits (Redis):  $(run $PR)"
