#!/usr/bin/env bash
# Where the proxies' CPU goes: user and system time per request, for nginx and Switchyard, from
# /proc, over the same wrk load as compare.sh's throughput rounds (2 threads, 64 keep-alive
# connections, plain chat completions to three instant simulators), plus perf's context
# switches. About 30 s per round; the targets take turns.
#
#   bash bench/cpu.sh                # 2 rounds
#   ROUNDS=3 DUR=6 bash bench/cpu.sh
#   BIN=/path/to/switchyard bash bench/cpu.sh   # another build
#   BASE=/path/to/switchyard ROUNDS=6 bash bench/cpu.sh   # and a second build, in the same turns
#   SDK=1 bash bench/cpu.sh          # requests with the headers the OpenAI Python SDK adds
#
# Rounds on this shared machine move by ±10-15 %: the targets take turns (their order rotating
# each round) and the medians over all rounds are printed at the end.
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
targets="nginx:$PN:$NG switchyard:$PS:$SY"
if [ -n "${BASE:-}" ]; then
  PB=$(port)
  sed "s/127.0.0.1:$PS\"/127.0.0.1:$PB\"/" "$work/switchyard.toml" > "$work/base.toml"
  RUST_LOG=warn "$BASE" serve --config "$work/base.toml" >/dev/null 2>&1 &
  BP=$!
  wait_port $PB
  targets="$targets base:$PB:$BP"
fi
for t in $targets; do wrk -t1 -c8 -d2s -s "$work/chat.lua" "http://127.0.0.1:$(echo $t | cut -d: -f2)$path" >/dev/null; done
tp() { local name=$1 p=$2 pid=$3; local b=$(cpu_ticks $pid); perf stat -e context-switches,cpu-migrations,task-clock -p $(pids_of $pid | paste -sd,) -o $work/stat-$name.txt -- sleep ${DUR:-5} & local ps=$!; local out=$(wrk -t2 -c64 -d${DUR:-5}s -s "$work/chat.lua" "http://127.0.0.1:$p$path"); wait $ps; local a=$(cpu_ticks $pid)
  local rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}'); local n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$name rps=$rps $(python3 -c "b='$b'.split(); a='$a'.split(); u=(int(a[0])-int(b[0]))/$TCK*1e6/$n; k=(int(a[1])-int(b[1]))/$TCK*1e6/$n; print(f'cpu_us={u+k:.1f} user={u:.1f} sys={k:.1f}')") n=$n"; grep -E "context|migr" $work/stat-$name.txt; }
for r in $(seq $ROUNDS); do
  # Each round starts one target later than the one before.
  set -- $targets
  for _ in $(seq $(( (r - 1) % $# ))); do set -- "${@:2}" "$1"; done
  for t in "$@"; do IFS=: read -r name p pid <<<"$t"; tp "$name" "$p" "$pid"; done
done | tee "$work/rounds.txt"
python3 - "$work/rounds.txt" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) rps=([\d.]+) cpu_us=([\d.]+) user=([\d.]+) sys=([\d.]+)", line)
    if m:
        rows.setdefault(m.group(1), []).append([float(x) for x in m.groups()[1:]])
print("\nmedians over the rounds: target, req/s, CPU / request, user, system (µs)")
for name, r in rows.items():
    med = [statistics.median(c) for c in zip(*r)]
    print(f"{name:10} {med[0]:8.0f} {med[1]:6.1f} {med[2]:6.1f} {med[3]:6.1f}  ({len(r)} rounds)")
PY
