#!/usr/bin/env bash
# Where the proxies' CPU goes: user and system time per request, for nginx and Switchyard, from
# /proc, over the same wrk load as compare.sh's throughput rounds (2 threads, 64 keep-alive
# connections, plain chat completions to three instant simulators), plus perf's context
# switches. About 30 s per round; the targets take turns.
#
#   bash bench/cpu.sh                # 2 rounds
#   ROUNDS=3 DUR=6 bash bench/cpu.sh
#   BIN=/path/to/switchyard bash bench/cpu.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
TCK=$(getconf CLK_TCK)
cargo build --release -q --bin switchyard
B=${BIN:-target/release/switchyard}
ROUNDS=${ROUNDS:-2}
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; rm -rf "$work"' EXIT
. bench/lib.sh
S1=$(port); S2=$(port); S3=$(port); PN=$(port); PS=$(port)
for p in $S1 $S2 $S3; do RUST_LOG=warn target/release/switchyard simulate --listen 127.0.0.1:$p --name "s$p" >/dev/null 2>&1 & done
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
daemon off;
worker_rlimit_nofile 16384;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy; fastcgi_temp_path $work/fastcgi; uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
  upstream sims { server 127.0.0.1:$S1; server 127.0.0.1:$S2; server 127.0.0.1:$S3; keepalive 256; }
  server { listen 127.0.0.1:$PN; location / { proxy_pass http://sims; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 300s; } }
}
CONF
${NGINX:-/usr/sbin/nginx} -c "$work/nginx.conf" -p "$work" &
cat > "$work/s.toml" <<TOML
[server]
listen = "127.0.0.1:$PS"
[routing]
strategy = "round_robin"
[[backends]]
name = "s1"
url = "http://127.0.0.1:$S1"
auth = { type = "none" }
[[backends]]
name = "s2"
url = "http://127.0.0.1:$S2"
auth = { type = "none" }
[[backends]]
name = "s3"
url = "http://127.0.0.1:$S3"
auth = { type = "none" }
TOML
RUST_LOG=warn $B serve --config "$work/s.toml" >/dev/null 2>&1 &
SY=$!
for p in $S1 $S2 $S3 $PN $PS; do wait_port $p; done
for _ in $(seq 100); do [ -s "$work/nginx.pid" ] && break; sleep 0.05; done
NG=$(cat "$work/nginx.pid")
pids_of() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() { local u=0 k=0; for p in $(pids_of "$1"); do u=$((u + $(awk '{print $14}' "/proc/$p/stat"))); k=$((k + $(awk '{print $15}' "/proc/$p/stat"))); done; echo $u $k; }
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
cat > "$work/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
LUA
for p in $PN $PS; do wrk -t1 -c8 -d2s -s "$work/chat.lua" "http://127.0.0.1:$p$path" >/dev/null; done
tp() { local name=$1 p=$2 pid=$3; local b=$(cpu_ticks $pid); perf stat -e context-switches,cpu-migrations,task-clock -p $(pids_of $pid | paste -sd,) -o $work/stat-$name.txt -- sleep ${DUR:-5} & local ps=$!; local out=$(wrk -t2 -c64 -d${DUR:-5}s -s "$work/chat.lua" "http://127.0.0.1:$p$path"); wait $ps; local a=$(cpu_ticks $pid)
  local rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); local n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$name rps=$rps $(python3 -c "b='$b'.split(); a='$a'.split(); u=(int(a[0])-int(b[0]))/$TCK*1e6/$n; k=(int(a[1])-int(b[1]))/$TCK*1e6/$n; print(f'cpu_us={u+k:.1f} user={u:.1f} sys={k:.1f}')") n=$n"; grep -E "context|migr" $work/stat-$name.txt; }
for r in $(seq $ROUNDS); do tp nginx $PN $NG; tp switchyard $PS $SY; done
