#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs the test tools into target/tools,
# builds the Wasm plugins, then lints, unit and integration tests (cargo), the MCP conformance
# suite through the gateway, the end-to-end suite with the official Python SDK against the
# reference servers, and a short fuzz run of the parsers.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
logs="$REPO/target/test-logs"
mkdir -p "$logs"

step() { printf '\n=== %s ===\n' "$*"; }

# A one-shot build gains nothing from incremental caches, which would double target/'s size.
export CARGO_INCREMENTAL=0
df -h "$REPO" | tail -1 | awk '{print "disk: " $4 " free on " $6}'

step "install test tools (target/tools)"
bash tests/tools/install.sh

step "build the Wasm plugins (target/plugins)"
bash plugins/build.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test"
cargo build --quiet
cargo test 2>&1 | tee "$logs/cargo.txt"
# The plugins' own unit tests (their workspace, on the host target).
cargo test --manifest-path plugins/Cargo.toml 2>&1 | tee -a "$logs/cargo.txt"
cargo_passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$logs/cargo.txt" | awk '{s+=$4} END {print s+0}')

step "deploy/ manifests render and validate"
bash tests/deploy.sh | tee "$logs/deploy.txt"
deploy_passed=$(grep -Eo '^deploy: [0-9]+ passed' "$logs/deploy.txt" | awk '{print $2}')

step "MCP conformance suite through the gateway"
bash tests/conformance.sh | tee "$logs/conformance.txt"
conf_passed=$(grep -Eo '^Total: [0-9]+ passed' "$logs/conformance.txt" | awk '{s+=$2} END {print s+0}')

step "end-to-end with the official Python SDK and reference servers"
# shellcheck disable=SC1091
. target/tools/env.sh
"$GATEHOUSE_PYTHON" -m pytest tests/e2e -q -p no:cacheprovider 2>&1 | tee "$logs/e2e.txt"
e2e_passed=$(grep -Eo '[0-9]+ passed' "$logs/e2e.txt" | tail -1 | awk '{print $1}')

step "fuzz the parsers briefly (cargo-fuzz, 5 s per target)"
FUZZ_SECONDS=5 bash tests/fuzz.sh 2>&1 | tee "$logs/fuzz.txt"
fuzz_passed=$(grep -Eo '^fuzz: [a-z_]+: [0-9]+ executions' "$logs/fuzz.txt" | wc -l)

total=$((cargo_passed + ${deploy_passed:-0} + conf_passed + ${e2e_passed:-0} + fuzz_passed))
printf '\ncargo: %s passed; deploy: %s; conformance: %s checks passed; e2e: %s passed; fuzz: %s targets without a crash\n' "$cargo_passed" "${deploy_passed:-0}" "$conf_passed" "${e2e_passed:-0}" "$fuzz_passed"
echo "all: $total passed, 0 failed"
