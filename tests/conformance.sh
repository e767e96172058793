#!/usr/bin/env bash
# Runs the official MCP conformance suite (server scenarios) against the gateway, with the
# project's fixture server (tests/fixtures/conformance_server.py, a 2025-11-25 server) as its one
# stdio upstream: the scenarios 2025-11-25 requires (sessions), then those 2026-07-28 requires
# (stateless), the latter against tests/conformance-2026-expected-failures.yaml.
#
#   tests/conformance.sh                          # both; exits non-zero on any unexpected result
#   tests/conformance.sh --scenario caching       # extra args: one run of `conformance server`
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tests/tools/install.sh" >/dev/null
# shellcheck disable=SC1091
. "$REPO/target/tools/env.sh"
BIN="${GATEHOUSE_BIN:-$REPO/target/debug/gatehouse}"
[[ -x "$BIN" ]] || (cd "$REPO" && cargo build --quiet)

port="$("$GATEHOUSE_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
work="$(mktemp -d)"
cat > "$work/gatehouse.yaml" <<YAML
listen: 127.0.0.1:$port
upstreams:
  - name: fixture
    stdio: { command: "$GATEHOUSE_PYTHON", args: ["$REPO/tests/fixtures/conformance_server.py"] }
YAML
"$BIN" serve --config "$work/gatehouse.yaml" >"$work/gateway.log" 2>&1 &
gw=$!
trap 'kill "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
    "$GATEHOUSE_PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null && break
    kill -0 "$gw" 2>/dev/null || { cat "$work/gateway.log" >&2; echo "gateway exited" >&2; exit 1; }
    sleep 0.1
done
run() {
    local label="$1"
    shift
    set +e
    $GATEHOUSE_CONFORMANCE server --url "http://127.0.0.1:$port/mcp" "$@" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >"$work/out.txt"
    local status=${PIPESTATUS[0]}
    set -e
    echo "== $label"
    grep -E '^(✓|✗|Total:)|FAIL|^  [~✗✓] ' "$work/out.txt" || true
    echo
    if [[ $status -ne 0 ]]; then
        cat "$work/out.txt" >&2
        echo "--- gateway log ---" >&2
        tail -50 "$work/gateway.log" >&2
    fi
    return "$status"
}
if [[ $# -gt 0 ]]; then
    run "conformance server $*" "$@"
    exit
fi
status=0
run "requirements 2025-11-25" --requirements 2025-11-25 || status=1
run "requirements 2026-07-28" --requirements 2026-07-28 \
    --expected-failures "$REPO/tests/conformance-2026-expected-failures.yaml" || status=1
exit "$status"
