#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 20: the CI smoke run).
# A long run: SECS=3600 bash fuzz/run.sh   (or one target: SECS=3600 bash fuzz/run.sh config)
# Needs the nightly toolchain (libFuzzer's sanitizer flags) and cargo-fuzz, installed if missing.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run; each one found
# becomes a regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${SECS:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
cargo +nightly --version
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sse retry_hint route config response_head request_head)
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== fuzz $t for ${SECS}s"
  # Only the summary: libFuzzer prints a line per new input otherwise.
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$SECS" 2>&1 \
    | grep -E '^(#[0-9]+ +DONE|Done|==[0-9]+==|SUMMARY|thread|panicked|artifact_prefix|Test unit written)' || true
  # grep hides the status; a crash leaves an artifact.
  if compgen -G "artifacts/$t/*" >/dev/null; then
    echo "fuzz $t: crash inputs in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
