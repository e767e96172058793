"""Server-to-client traffic through the gateway: sampling, elicitation and roots requests sent by
upstreams while they handle a call (answered by the SDK client's callbacks), and notifications
sent outside any call (server-everything's simulated logging)."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import anyio
import pytest
from mcp import MCPError, types

from e2e_support import (
    EV_HTTP,
    EV_STDIO,
    EXAMPLE,
    Gateway,
    HttpEverything,
    canned_roots,
    name,
    simulated_log_arrives,
    sse_streams_opened,
    text_of,
    wait_until_async,
)

pytestmark = pytest.mark.anyio


class Sampler:
    """A sampling callback answering with a fresh reply per request, recording what it was asked."""

    def __init__(self) -> None:
        self.requests: list[types.CreateMessageRequestParams] = []
        self.replies: list[str] = []

    async def __call__(self, ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.requests.append(params)
        reply = f"reply-{uuid.uuid4().hex[:8]}"
        self.replies.append(reply)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=reply), model="e2e-model")


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP])
async def test_sampling_from_server_everything(gateway: Gateway, upstream: str) -> None:
    sampler = Sampler()
    async with gateway.client(sampling_callback=sampler) as c:
        r = await c.call_tool(name(upstream, "trigger-sampling-request"), {"prompt": "what is 6x7?", "maxTokens": 17})
    assert len(sampler.requests) == 1
    asked = sampler.requests[0]
    assert asked.max_tokens == 17
    assert asked.messages[0].content.text == "Resource trigger-sampling-request context: what is 6x7?"
    text = text_of(r)
    assert not r.is_error
    assert f'"text": "{sampler.replies[0]}"' in text and '"model": "e2e-model"' in text


async def test_sampling_from_the_example_server(gateway: Gateway) -> None:
    sampler = Sampler()
    async with gateway.client(sampling_callback=sampler) as c:
        r = await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "say something"})
        assert text_of(r) == f"model said: {sampler.replies[0]}"
        assert [m.content.text for m in sampler.requests[0].messages] == ["say something"]

        async def refuse(ctx: Any, params: types.CreateMessageRequestParams) -> types.ErrorData:
            return types.ErrorData(code=-32001, message="the user said no")

    # A refusal travels back to the upstream, whose error reaches the caller.
    async with gateway.client(sampling_callback=refuse) as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "say something"})
        assert "the user said no" in e.value.message


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP])
@pytest.mark.parametrize("action", ["accept", "decline"])
async def test_elicitation(gateway: Gateway, upstream: str, action: str) -> None:
    asked: list[types.ElicitRequestParams] = []

    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params)
        if action == "accept":
            return types.ElicitResult(action="accept", content={"name": "Grace Hopper", "check": True})
        return types.ElicitResult(action="decline")

    async with gateway.client(elicitation_callback=elicit) as c:
        r = await c.call_tool(name(upstream, "trigger-elicitation-request"), {})
    assert len(asked) == 1
    assert asked[0].message == "Please provide inputs for the following fields:"
    text = text_of(r)
    if action == "accept":
        assert "- Name: Grace Hopper" in text and "- Agreed to terms: true" in text
    else:
        assert "User declined" in text


async def upstream_get_stream_open(everything_http: HttpEverything, before: int) -> None:
    """Waits until the gateway has opened this session's GET stream to server-everything.

    server-everything sends some requests (roots/list) and notifications on its GET stream, not
    on the stream of the call they belong to, and drops them when no GET stream is open. The
    gateway opens its upstream GET stream only when the client opens its own, which the SDK
    does in the background after the handshake: a call made at once can overtake it."""
    await wait_until_async(lambda: sse_streams_opened(everything_http) > before, 10, "the upstream GET stream")


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP])
async def test_roots_list(gateway: Gateway, everything_http: HttpEverything, upstream: str) -> None:
    before = sse_streams_opened(everything_http)
    async with gateway.client(list_roots_callback=canned_roots) as c:
        if upstream == EV_HTTP:
            await upstream_get_stream_open(everything_http, before)
        r = await c.call_tool(name(upstream, "get-roots-list"), {})
    text = text_of(r)
    assert "Current MCP Roots (1 total)" in text and "file:///tmp/e2e-root" in text


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP])
async def test_notifications_outside_calls_reach_the_client(gateway: Gateway, everything_http: HttpEverything, upstream: str) -> None:
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    before = sse_streams_opened(everything_http)
    async with gateway.client(logging_callback=on_log) as c:
        if upstream == EV_HTTP:
            await upstream_get_stream_open(everything_http, before)
        assert await simulated_log_arrives(c, name(upstream, "toggle-simulated-logging"), logs), logs


async def test_roots_list_changed_is_forwarded(gateway: Gateway, everything_http: HttpEverything) -> None:
    """server-everything caches the client's roots and asks again on roots/list_changed."""
    current = ["v1"]

    async def roots(ctx: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=f"file:///tmp/roots-{current[0]}", name=current[0])])

    before = sse_streams_opened(everything_http)
    async with gateway.client(list_roots_callback=roots) as c:
        await upstream_get_stream_open(everything_http, before)
        for upstream in (EV_STDIO, EV_HTTP):
            assert "file:///tmp/roots-v1" in text_of(await c.call_tool(name(upstream, "get-roots-list"), {}))
        current[0] = "v2"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # roots are deprecated as of 2026-07-28, not in 2025-11-25
            await c.send_roots_list_changed()
        for upstream in (EV_STDIO, EV_HTTP):
            seen: list[str] = []

            async def refreshed() -> bool:
                seen.append(text_of(await c.call_tool(name(upstream, "get-roots-list"), {})))
                return "file:///tmp/roots-v2" in seen[-1]

            deadline = anyio.current_time() + 5
            while not await refreshed():
                assert anyio.current_time() < deadline, f"{upstream} never re-read the roots: {seen[-1]}"
                await anyio.sleep(0.1)
