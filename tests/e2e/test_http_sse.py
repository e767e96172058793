"""The 2024-11-05 HTTP+SSE transport on both sides of the gateway, with the official Python SDK's
own HTTP+SSE client (`mcp.client.sse.sse_client`) and server transport (`SseServerTransport`,
serving the project's fixture server):

- an HTTP+SSE client in front of every upstream of the main gateway (stdio and Streamable HTTP);
- an HTTP+SSE upstream behind the gateway, for a Streamable HTTP client, a 2026-07-28 client and
  an HTTP+SSE client;
- the upstream restarting: the next call reconnects.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, MCPError, types
from mcp.client.sse import sse_client

from e2e_support import (
    EV_HTTP,
    EV_STDIO,
    EXAMPLE,
    START_TIMEOUT,
    Gateway,
    Proc,
    Tools,
    canned_elicitation,
    canned_sampling,
    example_argv,
    name,
    prompt_text,
    start_gateway,
    text_of,
    wait_until,
)

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "conformance_server.py"
OLD = "old"


def sse_url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.port}/sse"


@asynccontextmanager
async def sse_session(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    """An SDK client over HTTP+SSE (the 2024-11-05 transport)."""
    kwargs.setdefault("read_timeout_seconds", 30)
    async with Client(sse_client(url), mode="legacy", **kwargs) as c:
        yield c


def start_sse_fixture(tools: Tools, workdir: Path, port: int = 0) -> tuple[Proc, str]:
    proc = Proc(f"sse-fixture:{port}", [tools.python, str(FIXTURE), "--sse", str(port)], workdir / f"sse-fixture-{port}.log")
    found = wait_until(lambda: re.search(r"LISTENING (\S+)", proc.log_text()), START_TIMEOUT, "the HTTP+SSE fixture to listen", proc)
    return proc, found.group(1)


@pytest.fixture(scope="module")
def sse_upstream(tools: Tools, workdir: Path) -> Iterator[str]:
    proc, url = start_sse_fixture(tools, workdir)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sse_gateway(tools: Tools, workdir: Path, sse_upstream: str) -> Iterator[Gateway]:
    """A gateway in front of the HTTP+SSE fixture and the example server."""
    gw = start_gateway(
        tools,
        workdir,
        "http-sse",
        [
            {"name": OLD, "sse": {"url": sse_upstream}, "call_timeout": "30s"},
            {"name": EXAMPLE, "stdio": {"command": example_argv(tools)[0], "args": example_argv(tools)[1:]}},
        ],
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


async def test_an_http_sse_client_uses_every_upstream(gateway: Gateway) -> None:
    before = gateway.sessions()
    asked: list[str] = []

    async def sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return await canned_sampling(ctx, params)

    async with sse_session(sse_url(gateway), sampling_callback=sample, elicitation_callback=canned_elicitation) as c:
        assert gateway.sessions() == before + 1
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {name(EXAMPLE, "echo"), name(EV_STDIO, "echo"), name(EV_HTTP, "echo")} <= tools
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "over sse"})) == "over sse"
        assert "via http" in text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": "via http"}))
        p = await c.get_prompt(name(EXAMPLE, "greeting"), {"name": "Ada"})
        assert prompt_text(p) == "Say hello to Ada."
        res = await c.read_resource("demo://resource/dynamic/text/3")
        assert res.contents[0].text.startswith("Resource 3: This is a plaintext resource")
        # A server's question mid-call travels on the client's one stream and the answer back.
        r = await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "over the old transport?"})
        assert text_of(r) == "model said: canned reply" and asked == ["over the old transport?"]
        r = await c.call_tool(name(EV_STDIO, "trigger-elicitation-request"), {})
        assert "Ada" in text_of(r)
        # Calls at once are answered each on its own id.
        results: dict[int, str] = {}

        async def call(i: int) -> None:
            results[i] = text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": f"n{i}"}))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(call, i)
        assert results == {i: f"n{i}" for i in range(10)}
    # Closing the stream ends the session.
    wait_until(lambda: gateway.sessions() == before, 10, "the HTTP+SSE session to end")


async def test_an_http_sse_upstream_serves_every_kind_of_client(sse_gateway: Gateway) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    callbacks = {"sampling_callback": canned_sampling, "elicitation_callback": canned_elicitation}
    async with sse_gateway.client(**callbacks) as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {name(OLD, "echo"), name(OLD, "test_sampling"), name(EXAMPLE, "echo")} <= tools
        assert text_of(await c.call_tool(name(OLD, "echo"), {"text": "to the old server"})) == "to the old server"
        r = await c.call_tool(name(OLD, "add"), {"a": 2, "b": 3})
        assert text_of(r) == "5"
        r = await c.call_tool(name(OLD, "test_tool_with_progress"), {}, progress_callback=on_progress)
        assert "executed successfully" in text_of(r) and progress == [0, 50, 100]
        r = await c.call_tool(name(OLD, "test_sampling"), {"prompt": "hello"})
        assert text_of(r) == "LLM response: canned reply"
        r = await c.call_tool(name(OLD, "test_elicitation"), {"message": "who?"})
        assert text_of(r) == 'User response: action=accept, content={"name": "Ada"}'
        p = await c.get_prompt(name(OLD, "test_simple_prompt"))
        assert "simple prompt" in prompt_text(p)
        res = await c.read_resource("test://static-text")
        assert res.contents[0].text == "This is the content of the static text resource."
        # An unknown tool is the server's error, not a broken connection.
        with pytest.raises(MCPError, match="Unknown tool"):
            await c.call_tool(name(OLD, "nosuchtool"), {})
        assert text_of(await c.call_tool(name(OLD, "echo"), {"text": "still here"})) == "still here"

    # A 2026-07-28 client reaches it too, and a server question becomes an input_required round.
    async with sse_gateway.client(mode="2026-07-28", wait_for_get_stream=False, **callbacks) as c:
        assert text_of(await c.call_tool(name(OLD, "echo"), {"text": "modern"})) == "modern"
        r = await c.call_tool(name(OLD, "test_sampling"), {"prompt": "hi"})
        assert text_of(r) == "LLM response: canned reply"

    # And an HTTP+SSE client, through an HTTP+SSE upstream.
    async with sse_session(sse_url(sse_gateway), **callbacks) as c:
        assert text_of(await c.call_tool(name(OLD, "echo"), {"text": "old to old"})) == "old to old"
        r = await c.call_tool(name(OLD, "test_sampling"), {"prompt": "old"})
        assert text_of(r) == "LLM response: canned reply"


async def test_a_restarted_http_sse_upstream_is_reconnected(tools: Tools, workdir: Path) -> None:
    proc, url = start_sse_fixture(tools, workdir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    gw = start_gateway(tools, workdir, "http-sse-restart", [{"name": OLD, "sse": {"url": url}, "call_timeout": "10s"}])
    try:
        async with gw.client() as c:
            assert text_of(await c.call_tool("echo", {"text": "before"})) == "before"
            proc.stop()
            # The stream is gone: the call fails, naming the server, instead of hanging.
            with pytest.raises(MCPError, match="upstream 'old' is unavailable"):
                await c.call_tool("echo", {"text": "while down"})
            proc, _ = start_sse_fixture(tools, workdir, port)
            assert text_of(await c.call_tool("echo", {"text": "after"})) == "after"
    finally:
        proc.stop()
        gw.proc.stop()


def test_the_sse_front_refuses_what_it_must(gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    with httpx.Client(timeout=10) as h:
        assert h.post(f"{base}/sse").status_code == 405
        assert h.post(f"{base}/messages", json=init).status_code == 400  # no sessionId
        r = h.post(f"{base}/messages?sessionId=forged", json=init)
        assert r.status_code == 404 and "session not found" in r.json()["error"]["message"]
        assert h.get(f"{base}/messages?sessionId=x").status_code == 405
        with h.stream("GET", f"{base}/sse", headers={"Origin": "http://evil.example"}) as r:
            assert r.status_code == 403
        with h.stream("GET", f"{base}/sse") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines) == "event: endpoint"
            data = next(lines)
            assert data.startswith("data: messages?sessionId=")
            endpoint = f"{base}/{data.removeprefix('data: ')}"
            assert h.post(endpoint, content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
            bad = h.post(endpoint, content=b"{not json", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == -32700
            # A request before initialize is answered on the stream with an error.
            call = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
            assert h.post(endpoint, json=call).status_code == 202
            assert next(lines) == "" and next(lines) == "event: message"
            answer = next(lines)
            assert '"id":7' in answer and "initialize first" in answer
