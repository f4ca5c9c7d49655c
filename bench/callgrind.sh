#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable for the same
# binary and inputs whatever else the machine is doing, so small changes can be compared.
# Three instant simulators, the gateway under callgrind, 200 warm-up requests, then N requests
# (default 3,000) at concurrency 4 with `switchyard probe`; prints the gateway's instructions per
# request over those N.
#
#   bash bench/callgrind.sh                 # the binary in target/release
#   BIN=/path/to/switchyard bash bench/callgrind.sh   # another build, e.g. an older commit
#   TARGET=nginx bash bench/callgrind.sh    # nginx (one worker, no master) over the same three
#   SDK=1 bash bench/callgrind.sh           # requests with the headers the OpenAI Python SDK adds
#                                           # (user-agent, accept, accept-encoding, x-stainless-*)
#   N=1000 STREAM=1 bash bench/callgrind.sh # streamed answers, the client asking for usage
#   N=1000 SDK_STREAM=1 bash bench/callgrind.sh  # streamed, not asking (the SDKs' default): the
#                                           # gateway asks for the usage chunk and strips it
#   EXTRA=$'[metrics]\notlp_endpoint = "http://127.0.0.1:9"\nexport_interval = "1h"' \
#     bash bench/callgrind.sh               # with more config (here: OTLP metrics recorded,
#                                           # never exported within the run)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
cargo build --release -q --bin switchyard
B=target/release/switchyard
GW=${BIN:-$B}
N=${N:-3000}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
. bench/lib.sh
S=($(port) $(port) $(port)); PG=$(port)
{
  printf '[server]\nlisten = "127.0.0.1:%s"\n' "$PG"
  for i in 0 1 2; do
    printf '[[backends]]\nname = "s%s"\nurl = "http://127.0.0.1:%s"\nauth = { type = "none" }\n' "$i" "${S[$i]}"
  done
  printf '%s\n' "${EXTRA:-}"
} > "$work/gw.toml"
for p in "${S[@]}"; do RUST_LOG=warn $B simulate --listen 127.0.0.1:$p >/dev/null 2>&1 & done
if [ "${TARGET:-switchyard}" = nginx ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
  GW=${NGINX:-/usr/sbin/nginx}
  nginx_conf "$work/nginx.conf" "$PG" "worker_processes 1; master_process off;" "${S[@]}"
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$GW" -c "$work/nginx.conf" -p "$work" >/dev/null 2>"$work/vg.log" &
else
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$GW" serve --config "$work/gw.toml" >/dev/null 2>"$work/vg.log" &
fi
VG=$!
extra=()
if [ -n "${SDK:-}" ]; then
  for h in 'Accept: application/json' 'Accept-Encoding: gzip, deflate' \
    'User-Agent: AzureOpenAI/Python 1.54.0' 'X-Stainless-Lang: python' \
    'X-Stainless-Package-Version: 1.54.0' 'X-Stainless-OS: Linux' 'X-Stainless-Arch: x64' \
    'X-Stainless-Runtime: CPython' 'X-Stainless-Runtime-Version: 3.12.3' \
    'X-Stainless-Async: false' 'x-stainless-retry-count: 0' 'x-stainless-read-timeout: 600'; do
    extra+=(--header "$h")
  done
fi
for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/$PG) 2>/dev/null && break; sleep 0.2; done
$B probe --url "http://127.0.0.1:$PG" --deployment gpt-4o --requests 200 --concurrency 4 --json ${STREAM:+--stream} ${SDK_STREAM:+--without-include-usage} "${extra[@]}" >/dev/null 2>&1
callgrind_control -z $VG >/dev/null
$B probe --url "http://127.0.0.1:$PG" --deployment gpt-4o --requests "$N" --concurrency 4 --json ${STREAM:+--stream} ${SDK_STREAM:+--without-include-usage} "${extra[@]}" 2>/dev/null >"$work/probe.json"
callgrind_control -d $VG >/dev/null
sleep 1
kill -INT $VG; wait $VG 2>/dev/null || true
[ -n "${KEEP:-}" ] && cp "$work/cg.out.1" "$KEEP"
total=$(callgrind_annotate "$work/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
python3 -c "import json,sys; r=json.load(open('$work/probe.json')); sys.exit(0 if r['succeeded']==$N else 1)" \
  || { echo "not every request succeeded" >&2; exit 1; }
echo "$GW: $((total / N)) instructions per request ($total over $N requests)"
