#!/usr/bin/env bash
# Soak: DUR seconds (default 600) of mixed load through the gateway: plain chat completions and
# paced streams (16 tokens, 5 ms apart) over three simulated backends, 1 in 7 streams cut by
# the backend mid-way (a stream-error path), RSS and open file descriptors of the gateway
# sampled every 10 s. After the load, it waits out the backend pool's 30 s idle timeout and
# samples again.
# Pass: RSS drift < 5 % between the first sample after warm-up (WARM s, default 60) and the
# last sample under load, and descriptors back to their idle baseline after the load.
#
#   bash bench/soak.sh                 # 10 minutes
#   DUR=120 WARM=30 bash bench/soak.sh # a short look
#
# Writes bench/results/soak-<date>.md. Loopback only; installs wrk if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-600}
WARM=${WARM:-60}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q --bin switchyard
B=target/release/switchyard
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

. bench/lib.sh
S=($(port) $(port) $(port)); PG=$(port)
for i in 0 1 2; do
  # The third backend cuts 1 in 7 of its answers: drops mid-stream and before plain answers.
  extra=(); [ $i = 2 ] && extra=(--drop-rate 0.14)
  RUST_LOG=warn $B simulate --listen "127.0.0.1:${S[$i]}" --name "s$i" "${extra[@]}" >/dev/null 2>&1 &
done
{
  printf '[server]\nlisten = "127.0.0.1:%s"\n' "$PG"
  for i in 0 1 2; do
    printf '[[backends]]\nname = "s%s"\nurl = "http://127.0.0.1:%s"\nauth = { type = "none" }\n' "$i" "${S[$i]}"
  done
} > "$work/gw.toml"
RUST_LOG=warn $B serve --config "$work/gw.toml" >/dev/null 2>&1 &
GW=$!
for p in "${S[@]}" "$PG"; do wait_port "$p"; done
sleep 1

rss() { awk '/^VmRSS/ {print $2}' "/proc/$GW/status"; }
fds() { ls "/proc/$GW/fd" | wc -l; }
IDLE_RSS=$(rss); IDLE_FDS=$(fds)

path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
cat > "$work/plain.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
LUA
cat > "$work/stream.lua" <<'LUA'
wrk.method = "POST"
wrk.body   = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":16,"stream":true}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-sim-token-ms"] = "5"
LUA
echo "soak: ${DUR}s of load, sampling every 10 s" >&2
wrk -t1 -c16 -d"${DUR}s" -s "$work/plain.lua" "http://127.0.0.1:$PG$path" > "$work/wrk-plain.txt" &
W1=$!
wrk -t1 -c64 -d"${DUR}s" -s "$work/stream.lua" "http://127.0.0.1:$PG$path" > "$work/wrk-stream.txt" &
W2=$!
start=$(date +%s)
: > "$work/samples.tsv"
while kill -0 $W1 2>/dev/null || kill -0 $W2 2>/dev/null; do
  sleep 10
  printf '%s\t%s\t%s\n' "$(( $(date +%s) - start ))" "$(rss)" "$(fds)" >> "$work/samples.tsv"
done
wait $W1 $W2 || true
# Past the pool's 30 s idle timeout and its 5 s sweep.
sleep 40
AFTER_RSS=$(rss); AFTER_FDS=$(fds)

date=$(date -u +%Y-%m-%d)
out="bench/results/soak-$date.md"
python3 - "$work" "$out" "$DUR" "$WARM" "$IDLE_RSS" "$IDLE_FDS" "$AFTER_RSS" "$AFTER_FDS" <<'PY'
import re, sys
work, out, dur, warm, idle_rss, idle_fds, after_rss, after_fds = sys.argv[1:]
dur, warm = int(dur), int(warm)
rows = [tuple(map(int, l.split())) for l in open(f"{work}/samples.tsv") if l.strip()]
under_load = [r for r in rows if r[0] <= dur]
steady = [r for r in under_load if r[0] >= warm]
first, last = steady[0], steady[-1]
drift = (last[1] - first[1]) / first[1] * 100
peak = max(r[1] for r in steady)
def wrk(name):
    t = open(f"{work}/wrk-{name}.txt").read()
    n = int(re.search(r"(\d+) requests in", t).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    errs = re.search(r"Socket errors: (.*)", t)
    return n, int(bad.group(1)) if bad else 0, errs.group(1) if errs else "none"
pn, pbad, perr = wrk("plain")
sn, sbad, serr = wrk("stream")
mb = lambda kb: f"{int(kb) / 1024:.1f} MB"
ok_rss = abs(drift) < 5
ok_fds = int(after_fds) <= int(idle_fds)
lines = [
    f"# Soak, {out.split('soak-')[1][:-3]}",
    "",
    f"`DUR={dur} WARM={warm} bash bench/soak.sh`: plain completions (16 connections) and paced streams",
    "(64 connections, 16 tokens 5 ms apart) through the gateway over three simulators, one of which",
    "cuts 1 in 7 answers; RSS and open descriptors of the gateway every 10 s.",
    "",
    "| | value | target | |",
    "|---|---:|---:|---|",
    f"| RSS idle, before the load | {mb(idle_rss)} | | |",
    f"| RSS at {first[0]} s (first sample after warm-up) | {mb(first[1])} | | |",
    f"| RSS at {last[0]} s (last sample under load) | {mb(last[1])} | | |",
    f"| RSS drift after warm-up | {drift:+.1f} % | < 5 % | {'met' if ok_rss else 'NOT met'} |",
    f"| RSS peak after warm-up | {mb(peak)} | | |",
    f"| RSS 40 s after the load | {mb(after_rss)} | | |",
    f"| open descriptors idle / after | {idle_fds} / {after_fds} | back to idle | {'met' if ok_fds else 'NOT met'} |",
    f"| plain requests (non-2xx) | {pn} ({pbad}) | | socket errors: {perr} |",
    f"| streams (non-2xx) | {sn} ({sbad}) | | socket errors: {serr} |",
    "",
    "Samples (seconds, RSS kB, descriptors):",
    "",
    "```",
    *[f"{t}\t{r}\t{f}" for t, r, f in rows],
    "```",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:19]))
sys.exit(0 if ok_rss and ok_fds else 1)
PY
