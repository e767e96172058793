#!/usr/bin/env bash
# Run the MCP conformance suite (server scenarios) against tests/fixtures/conformance_server.py
# served directly over Streamable HTTP: a check of the fixture itself, without the gateway.
#
#   tests/tools/conformance_fixture.sh                     # active suite (the default)
#   tests/tools/conformance_fixture.sh --suite all         # also the pending scenarios
#   tests/tools/conformance_fixture.sh --scenario tools-call-sampling
#
# Extra arguments go to `conformance server`. Exit code is the suite's: 0 when no check
# failed (WARNING checks do not fail a plain run; they do fail an --expected-failures run).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$REPO/tests/tools/install.sh" >/dev/null 2>&1 || bash "$REPO/tests/tools/install.sh"
# shellcheck disable=SC1091
. "$REPO/target/tools/env.sh"

log="$(mktemp)"
"$GATEHOUSE_PYTHON" "$REPO/tests/fixtures/conformance_server.py" --http 0 >"$log" 2>&1 &
fixture_pid=$!
trap 'kill "$fixture_pid" 2>/dev/null || true; wait "$fixture_pid" 2>/dev/null || true; rm -f "$log"' EXIT

url=""
for _ in $(seq 1 200); do  # up to 20 s
    url="$(sed -n 's/^LISTENING //p' "$log" | head -n1)"
    [[ -n "$url" ]] && break
    kill -0 "$fixture_pid" 2>/dev/null || { cat "$log" >&2; echo "fixture exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$url" ]] || { cat "$log" >&2; echo "fixture did not start" >&2; exit 1; }

cd "$REPO/target/tools"  # conformance writes nothing unless -o is given; keep cwd harmless anyway
$GATEHOUSE_CONFORMANCE server --url "$url" "$@"
