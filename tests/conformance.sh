#!/usr/bin/env bash
# Runs the official MCP conformance suite (server scenarios) against the gateway, with the
# project's fixture server (tests/fixtures/conformance_server.py) as its one upstream, for each
# pairing of eras: the scenarios 2025-11-25 requires (sessions) and those 2026-07-28 requires
# (stateless), first with the fixture over stdio (where it speaks 2025-11-25), then over
# Streamable HTTP (where it speaks 2026-07-28 too, and the gateway talks that to it). 2026 runs
# are held to tests/conformance-2026-expected-failures.yaml and
# tests/conformance-2026-modern-expected-failures.yaml.
#
#   tests/conformance.sh                          # all four; non-zero on any unexpected result
#   tests/conformance.sh --scenario caching       # extra args: one run of `conformance server`
#                                                 # (stdio upstream)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/tests/tools/install.sh" >/dev/null
# shellcheck disable=SC1091
. "$REPO/target/tools/env.sh"
BIN="${GATEHOUSE_BIN:-$REPO/target/debug/gatehouse}"
[[ -x "$BIN" ]] || (cd "$REPO" && cargo build --quiet)

free_port() { "$GATEHOUSE_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
pids=()
# Gateways start in command substitutions (subshells): their pids are kept in files, not in
# `pids`, or they would outlive the run.
trap 'for f in "$work"/*.pid; do [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true; done; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT

# Starts a gateway named $1 whose one upstream is the YAML mapping $2; prints its port.
start_gateway() {
    local name="$1" upstream="$2" port
    port="$(free_port)"
    printf 'listen: 127.0.0.1:%s\nupstreams:\n  - name: fixture\n    %s\n' "$port" "$upstream" >"$work/$name.yaml"
    "$BIN" serve --config "$work/$name.yaml" >"$work/$name.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$work/$name.pid"
    for _ in $(seq 1 100); do
        "$GATEHOUSE_PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/$name.log" >&2; echo "gateway $name exited" >&2; exit 1; }
        sleep 0.1
    done
    echo "$port"
}

# The fixture as a stdio upstream: it speaks 2025-11-25 (sessions).
legacy_port="$(start_gateway legacy "stdio: { command: \"$GATEHOUSE_PYTHON\", args: [\"$REPO/tests/fixtures/conformance_server.py\"] }")"
log_of_port() { [[ "$1" == "$legacy_port" ]] && echo "$work/legacy.log" || echo "$work/modern.log"; }

run() {
    local label="$1" port="$2"
    shift 2
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
        tail -50 "$(log_of_port "$port")" >&2
    fi
    return "$status"
}
if [[ $# -gt 0 ]]; then
    run "conformance server $*" "$legacy_port" "$@"
    exit
fi

# The fixture over Streamable HTTP: it speaks 2026-07-28 too, so the gateway talks that to it.
"$GATEHOUSE_PYTHON" "$REPO/tests/fixtures/conformance_server.py" --http 0 >"$work/fixture.out" 2>"$work/fixture.err" &
pids+=($!)
fixture_url=""
for _ in $(seq 1 100); do
    fixture_url="$(sed -n 's/^LISTENING //p' "$work/fixture.out")"
    [[ -n "$fixture_url" ]] && break
    sleep 0.1
done
[[ -n "$fixture_url" ]] || { cat "$work/fixture.err" >&2; echo "the HTTP fixture did not start" >&2; exit 1; }
modern_port="$(start_gateway modern "http: { url: \"$fixture_url\" }")"

status=0
run "requirements 2025-11-25, 2025-11-25 upstream" "$legacy_port" --requirements 2025-11-25 || status=1
run "requirements 2026-07-28, 2025-11-25 upstream" "$legacy_port" --requirements 2026-07-28 \
    --expected-failures "$REPO/tests/conformance-2026-expected-failures.yaml" || status=1
run "requirements 2025-11-25, 2026-07-28 upstream" "$modern_port" --requirements 2025-11-25 || status=1
run "requirements 2026-07-28, 2026-07-28 upstream" "$modern_port" --requirements 2026-07-28 \
    --expected-failures "$REPO/tests/conformance-2026-modern-expected-failures.yaml" || status=1
exit "$status"
