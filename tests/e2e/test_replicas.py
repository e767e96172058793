"""Sessions that survive any replica: two gateway processes sharing a session key (a file, as a
mounted Secret would be), in front of one Streamable HTTP server (the project's fixture, spoken
to with sessions), and the official Python SDK client whose every HTTP request goes to the
other replica than the one before: handshake, calls, a sampling request answered through the
other replica, and DELETE when the client leaves.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client

from e2e_support import START_TIMEOUT, Gateway, Proc, Tools, start_gateway, text_of, wait_until

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "conformance_server.py"


class Alternating(httpx.AsyncBaseTransport):
    """Sends each request to the next replica in turn (a load balancer without stickiness)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.turn = 0
        self.seen: list[tuple[str, int]] = []
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        port = self.ports[self.turn % len(self.ports)]
        self.turn += 1
        request.url = request.url.copy_with(port=port)
        self.seen.append((request.method, port))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def shared_upstream(tools: Tools, workdir: Path) -> Iterator[str]:
    proc = Proc("replicas-fixture", [tools.python, str(FIXTURE), "--http", "0"], workdir / "replicas-fixture.log")
    found = wait_until(lambda: re.search(r"LISTENING (\S+)", proc.log_text()), START_TIMEOUT, "the HTTP fixture to listen", proc)
    try:
        yield found.group(1)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def replicas(tools: Tools, workdir: Path, shared_upstream: str) -> Iterator[list[Gateway]]:
    key = workdir / "session-key"
    key.write_text(secrets.token_hex(32) + "\n")
    gateways = [
        start_gateway(
            tools,
            workdir,
            f"replica-{i}",
            [{"name": "shared", "http": {"url": shared_upstream}, "protocol": "sessions", "call_timeout": "30s"}],
            mcp={"session_keys": [{"id": 1, "file": str(key)}]},
        )
        for i in range(2)
    ]
    try:
        yield gateways
    finally:
        for gw in gateways:
            gw.proc.stop()


async def test_a_client_alternating_between_replicas_keeps_its_session(replicas: list[Gateway]) -> None:
    transport = Alternating([gw.port for gw in replicas])
    asked: list[str] = []

    async def sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris."), model="m")

    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30, read=60)) as http:
        async with Client(
            streamable_http_client(replicas[0].url, http_client=http),
            mode="legacy",
            read_timeout_seconds=30,
            sampling_callback=sample,
        ) as c:
            assert c.protocol_version == "2025-11-25"
            for i in range(4):
                assert text_of(await c.call_tool("echo", {"text": f"call {i}"})) == f"call {i}"
            r = await c.call_tool("test_sampling", {"prompt": "capital of France?"})
            assert "Paris." in text_of(r)
            assert asked and "capital of France?" in asked[0]
            assert "test_sampling" in {t.name for t in (await c.list_tools()).tools}
        # Both replicas served the session, and the client's POSTs went to both.
        posts = {port for method, port in transport.seen if method == "POST"}
        assert posts == {gw.port for gw in replicas}, transport.seen
        # The client's DELETE reached one replica, which ended the session there.
        deleted_at = [port for method, port in transport.seen if method == "DELETE"]
        assert deleted_at, transport.seen
        replica = next(gw for gw in replicas if gw.port == deleted_at[-1])
        assert replica.sessions() == 0
