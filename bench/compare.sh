#!/usr/bin/env bash
# Switchyard against nginx, side by side, in one run, on loopback (about 8 minutes after the builds).
#
#   bash bench/compare.sh            # writes bench/results/compare-<date>.md and prints it
#   PGO=0 bash bench/compare.sh      # the plain `cargo build --release` instead of the PGO build
#   BIN=/path/to/switchyard bash bench/compare.sh   # another build (the simulators stay this one)
#
# Switchyard is measured as built for production: profile-guided, by bench/pgo.sh (5 to 8 more
# minutes of building first, once for the same sources). The simulators and the client are the
# plain release build.
#
# Three simulated Azure OpenAI backends in instant mode; nginx as a round-robin reverse proxy over
# them (keep-alive upstream pool, no buffering: the practical limit for a proxy here); Switchyard
# over the same three (round_robin). Both with their access logs off. Measured per target:
#   - throughput: wrk, 2 threads, 64 keep-alive connections, plain chat completions; five 6 s
#     rounds with the targets taking turns (the order rotating each round); each target's median
#     req/s, and against nginx the median of the five rounds' Switchyard / nginx ratios (each
#     round measures both within seconds of each other, so a slow stretch of the machine that
#     lasts longer than a round moves both sides of its ratio), with each round's ratio beside it;
#   - CPU per request of the proxy's processes (utime + stime from /proc over each throughput
#     run; the median, and the median of the rounds' ratios against nginx);
#   - latency at one request at a time: 40,000 plain requests per target, one at a time, the
#     three targets taking turns 250 requests at a time (so a noisy moment hits all alike),
#     p50 and p99 of the whole exchange, and the added part against the backend direct (the
#     client, bench/compare/main.rs, runs on one thread for this and for the streams);
#   - streaming: 2,000 streamed chat completions per target, one at a time (10 chunks, 2 ms
#     apart), the targets taking turns 100 at a time: time to first byte and the gap between
#     chunks, p50 and p99, and the added part against direct;
#   - memory: RSS idle (after start and warm-up), at the peak of 2,000 concurrent open streams,
#     and 90 s after they ended (past the 30 s idle timeout of Switchyard's backend connections
#     and the pool's eviction round; for nginx, whose streams are held first, about 100 s).
# Everything shares this machine's cores: load generator, proxies and backends.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release -q --bin switchyard --example compare
if [ -n "${BIN:-}" ]; then
  B=$BIN BUILD="the build at \`$BIN\`"
elif [ "${PGO:-1}" = 0 ]; then
  B=target/release/switchyard BUILD="the plain release build"
else
  B=$(bash bench/pgo.sh) BUILD="the profile-guided release build (\`bench/pgo.sh\`)"
fi
export BUILD
C=target/release/examples/compare
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; { [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true; }; rm -rf "$work"' EXIT

. bench/lib.sh
start_side_by_side

cpu_ticks() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
rss_kb() { local t=0; for p in $(pids_of "$1"); do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }
TCK=$(getconf CLK_TCK)

path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
chat_lua "$work/chat.lua"

# Warm-up: connections, pools and caches on every path, with as many connections as the
# throughput rounds, so that the idle RSS is that of a proxy which has served this load. With 8,
# what 64 connections add (buffers, pooled backend connections, allocator caches) showed in
# "RSS after" as if the burst of streams had left it: see bench/results/profile-2026-11-26.md.
for p in $S1 $PN $PS; do wrk -t2 -c64 -d2s -s "$work/chat.lua" "http://127.0.0.1:$p$path" >/dev/null; done
sleep 1
IDLE_SY=$(rss_kb $SY_PID); IDLE_NG=$(rss_kb $NG_MASTER)

declare -A R
throughput() { # name port pid(or -): one 6 s wrk run; appends "req/s cpu_us non2xx" to a file
  local name=$1 p=$2 pid=$3 before=0 after=0 out rps n bad cpu=nan
  [ "$pid" != - ] && before=$(cpu_ticks "$pid")
  out=$(wrk -t2 -c64 -d6s -s "$work/chat.lua" "http://127.0.0.1:$p$path")
  [ "$pid" != - ] && after=$(cpu_ticks "$pid")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  bad=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  [ "$pid" != - ] && cpu=$(python3 -c "print(f'{($after-$before)/$TCK*1e6/$n:.1f}')")
  echo "$rps $cpu ${bad:-0}" >> "$work/tp-$name"
}
# Five rounds with the targets taking turns, so a noisy stretch on a shared machine does not
# land on one target only: each round starts one target later than the one before, so none
# always runs right after another. Single rounds on this machine move by up to ±15 %; the
# medians are reported.
ROUNDS=5
TARGETS=("direct $S1 -" "nginx $PN $NG_MASTER" "switchyard $PS $SY_PID")
for round in $(seq $ROUNDS); do
  echo "throughput, round $round of $ROUNDS" >&2
  for i in 0 1 2; do
    # shellcheck disable=SC2086
    throughput ${TARGETS[$(( (i + round - 1) % 3 ))]}
  done
done
mid=$(( (ROUNDS + 1) / 2 ))
for name in direct nginx switchyard; do
  R[$name.rps]=$(sort -n -k1 "$work/tp-$name" | awk -v m=$mid 'NR==m {print $1}')
  R[$name.non2xx]=$(awk '{s+=$3} END {print s}' "$work/tp-$name")
  [ $name != direct ] && R[$name.cpu_us]=$(sort -n -k2 "$work/tp-$name" | awk -v m=$mid 'NR==m {print $2}')
done
# Each round's ratios, in round order (the files are appended to in round order).
R[rounds]=$(paste -d' ' "$work/tp-nginx" "$work/tp-switchyard" | awk '{printf "%s%.4f/%.4f", (NR>1?",":""), $4/$1, $5/$2}')
echo "streams, targets in turns" >&2
$C stream 20 100 10 2 "http://127.0.0.1:$S1" "http://127.0.0.1:$PN" "http://127.0.0.1:$PS" > "$work/stream.json"
i=0
for name in direct nginx switchyard; do
  R[$name.stream]=$(python3 -c "import json; print(json.dumps(json.load(open('$work/stream.json'))[$i]))")
  i=$((i + 1))
done
echo "latency, one request at a time, targets in turns" >&2
$C latency 160 250 "http://127.0.0.1:$S1" "http://127.0.0.1:$PN" "http://127.0.0.1:$PS" > "$work/latency.json"
i=0
for name in direct nginx switchyard; do
  R[$name.p50]=$(python3 -c "import json; print(json.load(open('$work/latency.json'))[$i]['p50_us'])")
  R[$name.p99]=$(python3 -c "import json; print(json.load(open('$work/latency.json'))[$i]['p99_us'])")
  i=$((i + 1))
done

hold() { # name port pid
  local name=$1 p=$2 pid=$3 peak=0 r
  rm -f "$work/ready"
  $C hold "http://127.0.0.1:$p" 2000 20 400 "$work/ready" > "$work/hold-$name.json" &
  local hp=$!
  while kill -0 $hp 2>/dev/null; do
    r=$(rss_kb "$pid"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  wait $hp
  R[$name.hold]=$(cat "$work/hold-$name.json")
  R[$name.peak]=$peak
}
echo "holding 2,000 streams: nginx" >&2; hold nginx $PN $NG_MASTER
echo "holding 2,000 streams: switchyard" >&2; hold switchyard $PS $SY_PID
# Past Switchyard's 30 s idle timeout for pooled backend connections and the pool's 30 s
# eviction round (nginx keeps its 256 connections): 90 s after Switchyard's streams ended, and
# the length of one hold (about 10 s) more after nginx's. One wait for both saves 90 s.
echo "90 s after the streams" >&2
sleep 90
R[nginx.after]=$(rss_kb $NG_MASTER)
R[switchyard.after]=$(rss_kb $SY_PID)

date=$(date -u +%Y-%m-%d)
out="bench/results/compare-$date.md"
export IDLE_SY IDLE_NG
for k in "${!R[@]}"; do printf '%s\t%s\n' "$k" "${R[$k]}"; done > "$work/results.tsv"
python3 - "$work/results.tsv" "$out" "$(nproc)" "$(uname -r)" "$($NGINX -v 2>&1)" <<'PY'
import json, os, sys
r = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip("\n").partition("\t")
    r[k] = v
out, cores, kernel, ngv = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def us(s):  # microseconds, as the latency run prints them
    return float(s)
st = {n: json.loads(r[f"{n}.stream"]) for n in ("direct", "nginx", "switchyard")}
rps = {n: float(r[f"{n}.rps"]) for n in st}
lat = {n: (us(r[f"{n}.p50"]), us(r[f"{n}.p99"])) for n in st}
mb = lambda kb: f"{int(kb) / 1024:.1f} MB"
rows = []
def row(name, *cells):
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
for n in st:
    added = "–" if n == "direct" else f"{lat[n][0] - lat['direct'][0]:+.0f} / {lat[n][1] - lat['direct'][1]:+.0f} µs"
    s, d = st[n], st["direct"]
    sadded = "–" if n == "direct" else f"{s['ttfb_p50_us'] - d['ttfb_p50_us']:+.0f} / {s['ttfb_p99_us'] - d['ttfb_p99_us']:+.0f} µs"
    gadded = "–" if n == "direct" else f"{s['gap_p99_us'] - d['gap_p99_us']:+.0f} µs"
    row(n, f"{rps[n]:,.0f}", r.get(f"{n}.cpu_us", "–") + (" µs" if f"{n}.cpu_us" in r else ""),
        f"{lat[n][0]:.0f} / {lat[n][1]:.0f} µs", added,
        f"{s['ttfb_p50_us']:.0f} / {s['ttfb_p99_us']:.0f} µs", sadded, gadded,
        r.get(f"{n}.non2xx", "") or "0")
mem = []
for n, idle in (("nginx", os.environ["IDLE_NG"]), ("switchyard", os.environ["IDLE_SY"])):
    h = json.loads(r[f"{n}.hold"])
    mem.append(f"| {n} | {mb(idle)} | {mb(r[f'{n}.peak'])} | {mb(r[f'{n}.after'])} | {h['complete']}/{h['streams']} complete, all open after {h['all_open_after_ms']} ms |")
sy, ng = "switchyard", "nginx"
rounds = [tuple(float(v) for v in x.split("/")) for x in r["rounds"].split(",")]
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
ratios = [
    ("throughput, Switchyard / nginx (≥ 1.0): median of the rounds' ratios",
     f"{median(t for t, _ in rounds):.2f}× (of the medians: {rps[sy] / rps[ng]:.2f}×)"),
    ("CPU per request, Switchyard / nginx (≤ 1.0): median of the rounds' ratios",
     f"{median(c for _, c in rounds):.2f}× (of the medians: {float(r[sy + '.cpu_us']) / float(r[ng + '.cpu_us']):.2f}×)"),
    ("added p99 at one request at a time (≤ 100 µs)", f"{lat[sy][1] - lat['direct'][1]:.0f} µs"),
    ("added stream time to first byte p99 (≤ 300 µs)", f"{st[sy]['ttfb_p99_us'] - st['direct']['ttfb_p99_us']:.0f} µs"),
    ("RSS idle (≤ 15 MB)", mb(os.environ["IDLE_SY"])),
    ("RSS with 2,000 open streams (≤ 100 MB)", mb(r[sy + ".peak"])),
    ("RSS after, against idle (within 10 %)", f"{int(r[sy + '.after']) / int(os.environ['IDLE_SY']) * 100 - 100:+.0f} %"),
]
text = f"""# Switchyard against nginx

`bash bench/compare.sh`, {cores} cores, Linux {kernel}, {ngv}. Load generator, proxies and the
three simulated backends share the machine. Plain requests: chat completions with wrk
(throughput: 2 threads, 64 connections, median of five 6 s rounds taken in turns); latency one
request at a time, 40,000 per target, the targets taking turns. Streams: 2,000 streamed chat
completions per target of 10 chunks 2 ms apart, one at a time, the targets taking turns 100 at
a time. The latency and stream client runs on one
thread. Switchyard: {os.environ['BUILD']}.

| target | req/s | CPU / req | p50 / p99 (1 conn) | added | stream TTFB p50 / p99 | added | added chunk gap p99 | non-2xx |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + """

| proxy | RSS idle | RSS, 2,000 open streams | RSS 90 s after | streams |
|---|---:|---:|---:|---|
""" + "\n".join(mem) + """

RSS after: 90 s after Switchyard's 2,000 streams ended; nginx's were held first, about 100 s
before.

| target | this run |
|---|---:|
""" + "\n".join(f"| {k} | {v} |" for k, v in ratios) + "\n" + f"""
The throughput rounds one by one, Switchyard / nginx (throughput, then CPU per request):
{", ".join(f"{t:.2f}× / {c:.2f}×" for t, c in rounds)}. Each round measures the targets within
seconds of each other; the medians of each target's rounds can come from different rounds.
"""
open(out, "w").write(text)
print(text)
PY
echo "written to $out" >&2
