"""The official Python SDK 2.x speaking 2026-07-28 (stateless) to the gateway, whose upstreams
speak 2025-11-25: discovery, the catalogue, and server questions answered through
input_required rounds. Legacy mode on the same endpoint still gets a session."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import MCPError, types

from e2e_support import EV_HTTP, EV_STDIO, EXAMPLE, Gateway, canned_roots, name, prompt_text, text_of

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"


@pytest.mark.parametrize("mode", ["auto", MODERN])
async def test_a_modern_client_uses_every_upstream_without_a_session(gateway: Gateway, mode: str) -> None:
    before = gateway.sessions()
    async with gateway.client(mode=mode, wait_for_get_stream=False) as c:
        assert c.protocol_version == MODERN
        if mode == "auto":  # a pinned client skips server/discover
            assert c.server_info is not None and c.server_info.name == "gatehouse"
            assert c.server_capabilities.tools is not None
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {name(EXAMPLE, "echo"), name(EV_STDIO, "echo"), name(EV_HTTP, "echo")} <= tools
        r = await c.call_tool(name(EXAMPLE, "echo"), {"text": "stateless"})
        assert text_of(r) == "stateless"
        r = await c.call_tool(name(EV_HTTP, "echo"), {"message": "over http"})
        assert "over http" in text_of(r)
        p = await c.get_prompt(name(EXAMPLE, "greeting"), {"name": "Ada"})
        assert prompt_text(p) == "Say hello to Ada."
        res = await c.read_resource("demo://resource/dynamic/text/7")
        assert res.contents[0].text.startswith("Resource 7: This is a plaintext resource")
        with pytest.raises(MCPError):
            await c.get_prompt(name(EXAMPLE, "nosuchprompt"))
        # Nothing of it was a session.
        assert gateway.sessions() == before


async def test_legacy_mode_still_gets_a_session(gateway: Gateway) -> None:
    async with gateway.client(mode="legacy") as c:
        assert c.protocol_version == "2025-11-25"
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "old"})) == "old"
        assert gateway.sessions() >= 1


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP])
async def test_elicitation_is_an_input_required_round(gateway: Gateway, upstream: str) -> None:
    asked: list[types.ElicitRequestParams] = []

    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="accept", content={"name": "Grace Hopper", "check": True})

    async with gateway.client(mode=MODERN, wait_for_get_stream=False, elicitation_callback=elicit) as c:
        r = await c.call_tool(name(upstream, "trigger-elicitation-request"), {})
    assert len(asked) == 1
    assert asked[0].message == "Please provide inputs for the following fields:"
    text = text_of(r)
    assert "- Name: Grace Hopper" in text and "- Agreed to terms: true" in text


async def test_sampling_and_roots_are_input_required_rounds(gateway: Gateway) -> None:
    prompts: list[str] = []

    async def sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        prompts.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="forty-two"), model="m")

    async with gateway.client(
        mode=MODERN, wait_for_get_stream=False, sampling_callback=sample, list_roots_callback=canned_roots
    ) as c:
        r = await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "the answer?"})
        assert text_of(r) == "model said: forty-two"
        assert prompts == ["the answer?"]
        r = await c.call_tool(name(EV_STDIO, "get-roots-list"), {})
        assert "file:///tmp/e2e-root" in text_of(r)


async def test_a_question_the_client_cannot_answer_is_refused_with_its_capability(gateway: Gateway) -> None:
    # No sampling callback: the client does not declare sampling, so the gateway must not ask.
    async with gateway.client(mode=MODERN, wait_for_get_stream=False) as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "p"})
        assert e.value.code == -32021
        # The upstream heard the refusal and serves the next call at once.
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "next"})) == "next"


async def test_a_modern_client_hears_changes_on_its_listen_stream(gateway: Gateway) -> None:
    from mcp.client.subscriptions import ResourceUpdated, ToolsListChanged

    async with gateway.client(mode=MODERN, wait_for_get_stream=False) as c:
        readme = next(str(r.uri) for r in (await c.list_resources()).resources if str(r.uri).endswith("/readme"))
        async with c.listen(tools_list_changed=True, resource_subscriptions=[readme]) as sub:
            assert sub.honored.tools_list_changed and list(sub.honored.resource_subscriptions or []) == [readme]
            assert name(EXAMPLE, "extra") not in {t.name for t in (await c.list_tools()).tools}
            await c.call_tool(name(EXAMPLE, "toggle"), {"on": True, "notify": True})
            with anyio.fail_after(10):
                event = await sub.__anext__()
            assert isinstance(event, ToolsListChanged)
            # The gateway's cached list was dropped with the announcement.
            assert name(EXAMPLE, "extra") in {t.name for t in (await c.list_tools()).tools}
            await c.call_tool(name(EXAMPLE, "touch"), {"uri": readme})
            with anyio.fail_after(10):
                event = await sub.__anext__()
            assert isinstance(event, ResourceUpdated) and event.uri == readme
            await c.call_tool(name(EXAMPLE, "toggle"), {"on": False, "notify": True})
