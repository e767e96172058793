#!/usr/bin/env bash
# Fuzzes the parsers (fuzz/fuzz_targets: JSON-RPC envelope, SSE decoder, list cursors, Host/Origin
# checks, config loading) with cargo-fuzz: installs a pinned cargo-fuzz into target/tools/cargo if
# missing, builds every target once, runs each for FUZZ_SECONDS (default 10) and fails on a crash.
# A long run: FUZZ_SECONDS=600 tests/fuzz.sh [TARGET...]. Crashing inputs land in
# target/fuzz/artifacts/TARGET/; replay one with
# `cd fuzz && cargo fuzz run -s none --codegen-units 16 TARGET FILE` (same environment as below).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-10}"
tools="$REPO/target/tools/cargo"
if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    CARGO_TARGET_DIR="$REPO/target/tools/cargo-fuzz-build" \
        cargo install --quiet --locked --root "$tools" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
    rm -rf "$REPO/target/tools/cargo-fuzz-build"
fi
export PATH="$tools/bin:$PATH"

# Only the stable toolchain exists here: RUSTC_BOOTSTRAP lets it take the unstable flags cargo fuzz
# passes. No sanitizer (`-s none`): the crate forbids unsafe code, so AddressSanitizer would cost
# build time for little; libFuzzer still catches panics (overflow checks and debug assertions are
# on), aborts, timeouts and memory blow-ups. 16 codegen units: cargo fuzz defaults to 1,
# which makes the one-off build of the whole library several times longer.
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0 CARGO_TARGET_DIR="$REPO/target/fuzz"
flags=(-s none --codegen-units 16)
cd fuzz

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s; $(du -sh "$CARGO_TARGET_DIR" | cut -f1) in target/fuzz"

failed=()
for t in "${targets[@]}"; do
    corpus="$CARGO_TARGET_DIR/corpus/$t"
    artifacts="$CARGO_TARGET_DIR/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="$CARGO_TARGET_DIR/$t.log"
    if cargo fuzz run "${flags[@]}" "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
        echo "fuzz: $t: $runs executions in ${seconds} s, no crash"
    else
        echo "fuzz: $t: CRASH (input in $artifacts/)"
        grep -E -A12 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -40 || tail -40 "$log"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds} s each, no crash"
