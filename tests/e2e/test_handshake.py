"""Initialization through the gateway with the official Python SDK client: the legacy handshake,
and mode="auto", whose server/discover probe finds 2026-07-28 and needs no handshake at all."""

from __future__ import annotations

import json

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


def test_server_discover_without_meta_is_invalid_params(gateway: Gateway) -> None:
    """A discover probe must carry the 2026-07-28 `_meta`: without it, HTTP 400 and -32602."""
    r = httpx.post(
        gateway.url,
        json={"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {}},
        headers={"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["id"] == 7 and "result" not in body
    assert body["error"]["code"] == -32602
    assert "mcp-session-id" not in r.headers  # a probe opens no session


async def test_auto_mode_discovers_and_never_initializes(gateway: Gateway) -> None:
    posts: list[str] = []  # the JSON-RPC method of each POST

    async def on_request(req: httpx2.Request) -> None:
        if req.method == "POST":
            posts.append(json.loads(req.content or b"{}").get("method", "<response>"))

    http = create_mcp_http_client()
    http.event_hooks["request"].append(on_request)
    async with http:
        async with Client(streamable_http_client(gateway.url, http_client=http), mode="auto", read_timeout_seconds=30) as c:
            assert posts[0] == "server/discover", posts
            assert c.protocol_version == "2026-07-28"
            assert c.server_info is not None and c.server_info.name == "gatehouse"
            r = await c.call_tool(name(EXAMPLE, "add"), {"a": 20, "b": 22})
            assert text_of(r) == "42"
    assert "initialize" not in posts and "notifications/initialized" not in posts, posts
