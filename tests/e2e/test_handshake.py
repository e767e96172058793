"""Initialization through the gateway with the official Python SDK client: the legacy handshake,
and mode="auto", whose server/discover probe the gateway must refuse fast so the SDK falls back."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from e2e_support import EV_HTTP, EV_STDIO, EXAMPLE, Gateway, name, text_of

pytestmark = pytest.mark.anyio


async def test_legacy_initialize_merges_all_upstreams(gateway: Gateway) -> None:
    async with gateway.client(mode="legacy") as c:
        assert c.protocol_version == "2025-11-25"
        assert c.server_info is not None and c.server_info.name == "gatehouse"
        caps = c.server_capabilities
        assert caps.tools is not None and caps.prompts is not None and caps.resources is not None
        # Each upstream's instructions, tagged with its name.
        instructions = c.instructions or ""
        assert "[example] Example server shipped with Gatehouse" in instructions
        assert f"[{EV_STDIO}] " in instructions and f"[{EV_HTTP}] " in instructions
        r = await c.call_tool(name(EXAMPLE, "echo"), {"text": "legacy handshake"})
        assert text_of(r) == "legacy handshake"


def test_server_discover_is_refused_with_method_not_found(gateway: Gateway) -> None:
    """The probe SDK 2.x sends first in mode="auto": HTTP 200 with a JSON-RPC -32601 error."""
    started = time.monotonic()
    r = httpx.post(
        gateway.url,
        json={"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {}},
        headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"},
        timeout=10,
    )
    assert time.monotonic() - started < 1.0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == 7 and "result" not in body
    assert body["error"]["code"] == -32601
    assert "mcp-session-id" not in r.headers  # a refused probe opens no session


async def test_auto_mode_falls_back_to_initialize_quickly(gateway: Gateway) -> None:
    posts: list[dict] = []  # one entry per POST: JSON-RPC method, when sent, status, when answered

    async def on_request(req: httpx2.Request) -> None:
        if req.method == "POST":
            msg = json.loads(req.content or b"{}")
            posts.append({"method": msg.get("method", "<response>"), "sent": time.monotonic(), "req": req})

    async def on_response(resp: httpx2.Response) -> None:
        for p in posts:
            if p["req"] is resp.request:
                p["status"] = resp.status_code
                p["answered"] = time.monotonic()

    http = create_mcp_http_client()
    http.event_hooks["request"].append(on_request)
    http.event_hooks["response"].append(on_response)
    async with http:
        started = time.monotonic()
        async with Client(streamable_http_client(gateway.url, http_client=http), mode="auto", read_timeout_seconds=30) as c:
            connect_time = time.monotonic() - started
            methods = [p["method"] for p in posts]
            assert methods[:2] == ["server/discover", "initialize"], methods
            probe = posts[0]
            assert probe["status"] == 200
            assert probe["answered"] - probe["sent"] < 1.0, "the discover probe was not answered quickly"
            # initialize follows at once: the SDK treated the answer as "legacy server".
            assert posts[1]["sent"] - probe["answered"] < 1.0
            assert connect_time < 10.0
            assert c.protocol_version == "2025-11-25"
            assert c.server_info is not None and c.server_info.name == "gatehouse"
            r = await c.call_tool(name(EXAMPLE, "add"), {"a": 20, "b": 22})
            assert text_of(r) == "42"
            assert "notifications/initialized" in [p["method"] for p in posts]
