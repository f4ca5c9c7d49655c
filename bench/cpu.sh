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
trap 'kill $(jobs -p) 2>/dev/null || true; { [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true; }; rm -rf "$work"' EXIT
. bench/lib.sh
NGINX=${NGINX:-/usr/sbin/nginx}
start_side_by_side
SY=$SY_PID; NG=$NG_MASTER
cpu_ticks() { local u=0 k=0; for p in $(pids_of "$1"); do u=$((u + $(awk '{print $14}' "/proc/$p/stat"))); k=$((k + $(awk '{print $15}' "/proc/$p/stat"))); done; echo $u $k; }
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
chat_lua "$work/chat.lua"
for p in $PN $PS; do wrk -t1 -c8 -d2s -s "$work/chat.lua" "http://127.0.0.1:$p$path" >/dev/null; done
tp() { local name=$1 p=$2 pid=$3; local b=$(cpu_ticks $pid); perf stat -e context-switches,cpu-migrations,task-clock -p $(pids_of $pid | paste -sd,) -o $work/stat-$name.txt -- sleep ${DUR:-5} & local ps=$!; local out=$(wrk -t2 -c64 -d${DUR:-5}s -s "$work/chat.lua" "http://127.0.0.1:$p$path"); wait $ps; local a=$(cpu_ticks $pid)
  local rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); local n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$name rps=$rps $(python3 -c "b='$b'.split(); a='$a'.split(); u=(int(a[0])-int(b[0]))/$TCK*1e6/$n; k=(int(a[1])-int(b[1]))/$TCK*1e6/$n; print(f'cpu_us={u+k:.1f} user={u:.1f} sys={k:.1f}')") n=$n"; grep -E "context|migr" $work/stat-$name.txt; }
for r in $(seq $ROUNDS); do tp nginx $PN $NG; tp switchyard $PS $SY; done
