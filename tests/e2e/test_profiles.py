"""Profiles through the official Python SDK client: connected to `/mcp/dev` with a bearer token,
with a session (legacy handshake) and statelessly (mode="auto" discovers 2026-07-28), the client
sees only the profile's tools, renamed and described as configured, and a call to a tool outside
the profile fails as unknown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from e2e_support import Gateway, Tools, example_argv, start_gateway, text_of

pytestmark = pytest.mark.anyio

ALICE = "alice-profile-token-0123456789"


@pytest.fixture(scope="module")
def profiled(tools: Tools, workdir: Path) -> Iterator[Gateway]:
    upstreams = [
        {"name": n, "stdio": {"command": tools.gatehouse, "args": example_argv(tools, "--name", n)[1:]}}
        for n in ("a", "b")
    ]
    extra = {
        "auth": {"tokens": [{"principal": "alice", "token": ALICE}]},
        "profiles": [
            {
                "name": "dev",
                "grant": {"principals": ["alice"]},
                "servers": [{"name": "a", "tools": [{"name": "echo", "rename": "say", "description": "Says it back"}]}],
            }
        ],
    }
    gw = start_gateway(tools, workdir, "profiles", upstreams, extra=extra)
    try:
        yield gw
    finally:
        gw.proc.stop()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_sees_and_calls_only_its_profile(profiled: Gateway, mode: str) -> None:
    http = create_mcp_http_client()
    http.headers["authorization"] = f"Bearer {ALICE}"
    async with http:
        url = f"http://127.0.0.1:{profiled.port}/mcp/dev"
        async with Client(streamable_http_client(url, http_client=http), mode=mode, read_timeout_seconds=30) as c:
            listed = await c.list_tools()
            assert [t.name for t in listed.tools] == ["say"]
            assert listed.tools[0].description == "Says it back"
            assert text_of(await c.call_tool("say", {"text": f"hi over {mode}"})) == f"hi over {mode}"
            for outside in ("b__echo", "a__echo", "echo"):
                with pytest.raises(MCPError) as e:
                    await c.call_tool(outside, {"text": "x"})
                assert e.value.code == -32602, outside
