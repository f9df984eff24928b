#!/usr/bin/env bash
# Bounded fuzzing for CI: builds every target once (stable toolchain, no
# sanitizer) and runs each for SECONDS_PER_TARGET (default 12) from a
# temporary copy of its committed corpus, so the corpus is never rewritten.
# Exits non-zero if any target finds a crash, and prints the input's path.
#
# Usage: fuzz/run.sh [SECONDS_PER_TARGET]
# FUZZ_TARGETS="chunked split" picks targets (default: all of them); FUZZ_SEED picks the seed.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-12}
# A fixed seed by default, so CI replays the same inputs each run and fails only on a change
# of serin's; FUZZ_SEED=0 lets libFuzzer pick one (exploration).
seed=${FUZZ_SEED:-1}
read -r -a targets <<<"${FUZZ_TARGETS:-request_head response_head chunked split config hpack}"

if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
cargo fuzz build -s none

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
for target in "${targets[@]}"; do
    mkdir -p "$work/$target" "artifacts/$target"
    cp corpus/"$target"/* "$work/$target/"
    log="$work/$target.log"
    if cargo fuzz run "$target" -s none "$work/$target" -- \
        -max_total_time="$seconds" -seed="$seed" -timeout=10 -rss_limit_mb=2048 \
        -dict=dict/http.dict -artifact_prefix="$PWD/artifacts/$target/" \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
        cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1)
        echo "fuzz $target: ok, ${runs:-?} runs in ${seconds}s, $cov"
        passed=$((passed + 1))
    else
        echo "fuzz $target: FAILED"
        # The panic (or libFuzzer's own verdict: timeout, out of memory).
        grep -m 1 -A 12 'panicked at\|ERROR: libFuzzer\|^ALARM' "$log" || tail -n 40 "$log"
        crash=$(grep -o 'Test unit written to .*' "$log" | sed 's/Test unit written to //' || true)
        echo "fuzz $target: crash input: ${crash:-none written (see the log above)}"
        echo "reproduce: cargo fuzz run $target -s none ${crash:-}"
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
