#!/usr/bin/env bash
# A profile-guided (PGO) release build of the gateway. An instrumented build serves a training
# load through the built-in simulator and probe, and the release build is then optimised with
# the profile it recorded: hot paths laid out together and inlined by measured use, cold ones
# moved aside. What it saves is measured in bench/results/profile-2026-11-26.md and
# docs/performance.md.
#
#   bash bench/pgo.sh           # prints the binary's path: target/pgo/release/switchyard
#   PGO_REBUILD=1 bash bench/pgo.sh   # build even if the binary there is of these sources
#
# 5 to 8 minutes on 2 cores (two builds of the whole tree, 40 s of training); a binary built
# from the same sources and compiler (see `from` below) is reused, so reruns of bench/compare.sh
# skip it.
# Needs rustup's llvm-tools for llvm-profdata (added if missing). The build trees are target/pgo-gen
# (instrumented) and target/pgo, so the plain `cargo build --release` tree is left alone.
#
# The training covers what production traffic does, not only the benchmark: plain and streamed
# chat completions, with and without the usage chunk, the headers the OpenAI SDKs send, a
# consumer key and token limits, a wrong key, and a backend answering 429s (retries, cooldown)
# and cutting connections. A path the training never takes is treated as cold, not left out.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  rustup component add llvm-tools >&2
fi
out=$root/target/pgo/release/switchyard
stamp=$root/target/pgo/built-from
# What the binary is built from: the committed sources, manifest, lock file and this script (by
# their git hashes) and the compiler, when none of them is changed or added in the work tree. A
# commit that changes only docs or other benchmarks reuses the build.
from=$( { git rev-parse HEAD:src HEAD:Cargo.toml HEAD:Cargo.lock HEAD:bench/pgo.sh && rustc -V; } 2>/dev/null | sha1sum | cut -c1-40 || true)
if ! git rev-parse HEAD:src >/dev/null 2>&1 || [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock bench/pgo.sh)" ]; then
  from=
fi
if [ -z "${PGO_REBUILD:-}" ] && [ -n "$from" ] && [ -x "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$from" ]; then
  echo "pgo: reusing the build of $from" >&2
  echo "$out"
  exit 0
fi
rm -f "$stamp"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
. bench/lib.sh

echo "pgo: instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$work/build-profiles" \
  cargo build --release --locked -q --bin switchyard --target-dir "$root/target/pgo-gen"
gen=$root/target/pgo-gen/release/switchyard

echo "pgo: training" >&2
S=($(port) $(port) $(port)); PG=$(port)
# The simulators run the same binary; their profiles go elsewhere and are not used.
sim() { LLVM_PROFILE_FILE="$work/sims/%p.profraw" RUST_LOG=warn "$gen" simulate --listen "127.0.0.1:$1" "${@:2}" >/dev/null 2>&1 & }
sim "${S[0]}"
sim "${S[1]}"
sim "${S[2]}" --error-rate 0.05 --error-status 429 --drop-rate 0.01
KEY=pgo-training-key-0123456789
{
  printf '[server]\nlisten = "127.0.0.1:%s"\n[routing]\nstrategy = "round_robin"\n' "$PG"
  for i in 0 1 2; do
    printf '[[backends]]\nname = "s%s"\nurl = "http://127.0.0.1:%s"\nauth = { type = "none" }\n' "$i" "${S[$i]}"
  done
} > "$work/gw.toml"
# The same gateway once more with a consumer key and token limits, on its own port.
PK=$(port)
sed "s/127.0.0.1:$PG/127.0.0.1:$PK/" "$work/gw.toml" > "$work/keyed.toml"
cat >> "$work/keyed.toml" <<TOML
[[consumers]]
name = "trainer"
key = "$KEY"
tokens_per_minute = 100000000
TOML
LLVM_PROFILE_FILE="$work/gw/%p.profraw" RUST_LOG=warn "$gen" serve --config "$work/gw.toml" >/dev/null 2>&1 &
GW=$!
LLVM_PROFILE_FILE="$work/gw/%p.profraw" RUST_LOG=warn "$gen" serve --config "$work/keyed.toml" >/dev/null 2>&1 &
GK=$!
for p in "${S[@]}" "$PG" "$PK"; do wait_port "$p"; done
sdk=(--header 'Accept: application/json' --header 'User-Agent: AzureOpenAI/Python 1.54.0'
  --header 'X-Stainless-Lang: python' --header 'X-Stainless-Package-Version: 1.54.0'
  --header 'x-stainless-retry-count: 0' --header 'x-stainless-read-timeout: 600')
probe() { "$gen" probe --deployment gpt-4o --json "$@" >/dev/null 2>&1 || true; }
# Probe's own profile is not used either.
export LLVM_PROFILE_FILE="$work/probe/%p.profraw"
probe --url "http://127.0.0.1:$PG" --requests 20000 --concurrency 64
probe --url "http://127.0.0.1:$PG" --requests 3000 --concurrency 1
probe --url "http://127.0.0.1:$PG" --requests 5000 --concurrency 16 "${sdk[@]}"
probe --url "http://127.0.0.1:$PG" --requests 1500 --concurrency 8 --stream
probe --url "http://127.0.0.1:$PG" --requests 1500 --concurrency 8 --stream --without-include-usage "${sdk[@]}"
probe --url "http://127.0.0.1:$PK" --requests 5000 --concurrency 16 --key "$KEY" "${sdk[@]}"
probe --url "http://127.0.0.1:$PK" --requests 1500 --concurrency 8 --key "$KEY" --stream --without-include-usage
probe --url "http://127.0.0.1:$PK" --requests 200 --concurrency 4 --key wrong-key-0123456789
unset LLVM_PROFILE_FILE
# The profiles are written as the gateways exit.
kill -TERM $GW $GK
wait $GW $GK || true
ls "$work"/gw/*.profraw >/dev/null

"$profdata" merge -o "$work/switchyard.profdata" "$work"/gw/*.profraw
echo "pgo: optimised build" >&2
RUSTFLAGS="-Cprofile-use=$work/switchyard.profdata" \
  cargo build --release --locked -q --bin switchyard --target-dir "$root/target/pgo"
[ -n "$from" ] && echo "$from" > "$stamp"
echo "$out"
