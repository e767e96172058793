"""Tools, prompts and resources of three upstreams through one gateway: merged lists with
prefixed names (compared with what each upstream lists when asked directly), and calls, prompt
gets and resource reads routed to the right upstream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError, StdioServerParameters, types

from e2e_support import (
    EV_HTTP,
    EV_STDIO,
    EXAMPLE,
    SEP,
    Gateway,
    HttpEverything,
    Tools,
    all_callbacks,
    example_argv,
    name,
    prompt_text,
    start_gateway,
    text_of,
)

pytestmark = pytest.mark.anyio


@dataclass
class Catalog:
    tools: dict[str, types.Tool]
    prompts: dict[str, types.Prompt]
    resources: list[str]
    templates: list[str]


async def catalog_of(c: Client) -> Catalog:
    async def pages(fetch: Any, key: str) -> list[Any]:
        items, cursor = [], None
        while True:
            page = await fetch(cursor=cursor)
            items += getattr(page, key)
            cursor = page.next_cursor
            if not cursor:
                return items

    tools = await pages(c.list_tools, "tools")
    prompts = await pages(c.list_prompts, "prompts")
    resources = await pages(c.list_resources, "resources")
    templates = await pages(c.list_resource_templates, "resource_templates")
    return Catalog(
        tools={t.name: t for t in tools},
        prompts={p.name: p for p in prompts},
        resources=[r.uri for r in resources],
        templates=[t.uri_template for t in templates],
    )


@pytest.fixture(scope="module")
async def direct(tools: Tools, everything_http: HttpEverything) -> dict[str, Catalog]:
    """What each upstream offers when the SDK client talks to it directly (same capabilities)."""
    targets: dict[str, Any] = {
        EV_STDIO: StdioServerParameters(command=tools.everything[0], args=[*tools.everything[1:], "stdio"]),
        EV_HTTP: everything_http.url,
        EXAMPLE: StdioServerParameters(command=tools.gatehouse, args=example_argv(tools, "--test-tools")[1:]),
    }
    out = {}
    for upstream, target in targets.items():
        async with Client(target, mode="legacy", read_timeout_seconds=30, **all_callbacks()) as c:
            out[upstream] = await catalog_of(c)
    return out


@pytest.fixture(scope="module")
async def through_gateway(gateway: Gateway) -> Catalog:
    async with gateway.client(**all_callbacks()) as c:
        return await catalog_of(c)


def strip(upstream: str, names: Any) -> set[str]:
    prefix = upstream + SEP
    return {n[len(prefix) :] for n in names if n.startswith(prefix)}


async def test_tools_list_merges_every_upstream_with_prefixes(direct: dict[str, Catalog], through_gateway: Catalog) -> None:
    merged = through_gateway.tools
    assert all(n.split(SEP, 1)[0] in (EV_STDIO, EV_HTTP, EXAMPLE) for n in merged), sorted(merged)
    for upstream, cat in direct.items():
        assert strip(upstream, merged) == set(cat.tools), upstream
    assert len(merged) == sum(len(c.tools) for c in direct.values())
    assert set(direct[EXAMPLE].tools) == {"echo", "add", "slow", "whoami", "sample", "crash", "pid", "log", "fail", "toggle", "routed", "touch"}
    # Everything but the name is passed through untouched.
    for upstream, local in [(EV_STDIO, "get-sum"), (EV_HTTP, "trigger-long-running-operation"), (EXAMPLE, "add")]:
        gw_tool = merged[name(upstream, local)].model_dump(exclude={"name"})
        assert gw_tool == direct[upstream].tools[local].model_dump(exclude={"name"})


async def test_prompts_list_merges_every_upstream_with_prefixes(direct: dict[str, Catalog], through_gateway: Catalog) -> None:
    for upstream, cat in direct.items():
        assert strip(upstream, through_gateway.prompts) == set(cat.prompts), upstream
    assert len(through_gateway.prompts) == sum(len(c.prompts) for c in direct.values())
    greeting = through_gateway.prompts[name(EXAMPLE, "greeting")]
    assert [a.name for a in greeting.arguments or []] == ["name"]


async def test_resource_lists_keep_uris(direct: dict[str, Catalog], through_gateway: Catalog) -> None:
    expected = [u for up in (EV_STDIO, EV_HTTP, EXAMPLE) for u in direct[up].resources]
    assert sorted(through_gateway.resources) == sorted(expected)
    assert "example://example/readme" in through_gateway.resources
    expected_t = [t for up in (EV_STDIO, EV_HTTP, EXAMPLE) for t in direct[up].templates]
    assert sorted(through_gateway.templates) == sorted(expected_t)
    assert "example://example/echo/{text}" in through_gateway.templates
    assert "demo://resource/dynamic/text/{resourceId}" in through_gateway.templates


async def test_tool_calls_reach_the_right_upstream(gateway: Gateway) -> None:
    async with gateway.client() as c:
        r = await c.call_tool(name(EV_STDIO, "echo"), {"message": "via stdio"})
        assert text_of(r) == "Echo: via stdio"
        r = await c.call_tool(name(EV_HTTP, "get-sum"), {"a": 2, "b": 40})
        assert text_of(r) == "The sum of 2 and 40 is 42."
        r = await c.call_tool(name(EXAMPLE, "add"), {"a": 1.5, "b": 2})
        assert text_of(r) == "3.5" and r.structured_content == {"sum": 3.5} and not r.is_error
        # The two server-everything instances are told apart by an environment variable.
        r = await c.call_tool(name(EV_STDIO, "get-env"), {})
        assert '"GATEHOUSE_E2E_ROLE": "stdio"' in text_of(r)
        r = await c.call_tool(name(EV_HTTP, "get-env"), {})
        assert '"GATEHOUSE_E2E_ROLE": "http"' in text_of(r)
        r = await c.call_tool(name(EXAMPLE, "whoami"), {})
        assert text_of(r) == "example"


async def test_many_concurrent_calls_get_their_own_answers(gateway: Gateway) -> None:
    """Thirty calls in flight at once over three upstreams: ids are remapped per upstream
    connection and every answer must find its way back to its own call."""
    kinds = [
        (name(EV_STDIO, "get-sum"), lambda i: {"a": i, "b": 1}, lambda i: f"The sum of {i} and 1 is {i + 1}."),
        (name(EV_HTTP, "get-sum"), lambda i: {"a": i, "b": 2}, lambda i: f"The sum of {i} and 2 is {i + 2}."),
        (name(EXAMPLE, "add"), lambda i: {"a": i, "b": 3}, lambda i: f"{i + 3}"),
    ]
    got: dict[int, str] = {}
    async with gateway.client() as c:

        async def one(i: int) -> None:
            tool, args, _ = kinds[i % 3]
            got[i] = text_of(await c.call_tool(tool, args(i)))

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
    assert got == {i: kinds[i % 3][2](i) for i in range(30)}


async def test_large_payloads_pass_every_transport(gateway: Gateway) -> None:
    big = "0123456789abcdef" * 65536 + " — é ✓"  # 1 MiB and some non-ASCII
    async with gateway.client() as c:
        assert text_of(await c.call_tool(name(EV_STDIO, "echo"), {"message": big})) == f"Echo: {big}"
        assert text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": big})) == f"Echo: {big}"
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": big})) == big


async def test_unknown_tool_names_are_refused(gateway: Gateway) -> None:
    async with gateway.client() as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool("nosuchserver__echo", {"text": "x"})
        assert e.value.code == -32602 and "nosuchserver__echo" in e.value.message
        with pytest.raises(MCPError) as e:
            await c.call_tool("echo", {"text": "unprefixed"})
        assert e.value.code == -32602
        # An unknown tool of a known upstream is that upstream's answer (an error result).
        r = await c.call_tool(name(EXAMPLE, "nosuchtool"), {})
        assert r.is_error and "unknown tool: nosuchtool" in text_of(r)


async def test_prompts_get_from_each_upstream(gateway: Gateway) -> None:
    async with gateway.client() as c:
        p = await c.get_prompt(name(EXAMPLE, "greeting"), {"name": "Ada"})
        assert prompt_text(p) == "Say hello to Ada."
        p = await c.get_prompt(name(EV_HTTP, "args-prompt"), {"city": "Lisbon", "state": "Lisboa"})
        assert "Lisbon" in prompt_text(p) and "Lisboa" in prompt_text(p)
        p = await c.get_prompt(name(EV_STDIO, "simple-prompt"))
        assert prompt_text(p).strip()
        with pytest.raises(MCPError):
            await c.get_prompt(name(EXAMPLE, "nosuchprompt"))


async def test_resources_read_routed_by_uri(gateway: Gateway) -> None:
    async with gateway.client() as c:
        r = await c.read_resource("example://example/readme")
        assert r.contents[0].text == "Gatehouse example server: tools echo and add, prompt greeting."
        # A template resource: only the example server can expand example://example/echo/{text}.
        r = await c.read_resource("example://example/echo/routed-by-template")
        assert r.contents[0].text == "routed-by-template"
        assert r.contents[0].uri == "example://example/echo/routed-by-template"
        r = await c.read_resource("demo://resource/static/document/architecture.md")
        assert r.contents[0].mime_type == "text/markdown"
        assert r.contents[0].text.startswith("# Everything Server")
        r = await c.read_resource("demo://resource/dynamic/text/7")
        assert r.contents[0].text.startswith("Resource 7: This is a plaintext resource")
        with pytest.raises(MCPError) as e:
            await c.read_resource("nowhere://nothing")
        assert "nowhere://nothing" in e.value.message


async def test_completion_is_routed_by_prompt_name(gateway: Gateway) -> None:
    async with gateway.client() as c:
        ref = types.PromptReference(type="ref/prompt", name=name(EV_STDIO, "completable-prompt"))
        r = await c.complete(ref, {"name": "department", "value": "S"})
        assert sorted(r.completion.values) == ["Sales", "Support"]


@pytest.fixture(scope="module")
def paged_gateway(tools: Tools, workdir: Path) -> Iterator[Gateway]:
    """Two example servers paginating tools/list differently (2 and 4 per page)."""
    gw = start_gateway(
        tools,
        workdir,
        "paged",
        [
            {"name": "pa", "stdio": {"command": tools.gatehouse, "args": ["example-server", "--name", "pa", "--page-size", "2"]}},
            {"name": "pb", "stdio": {"command": tools.gatehouse, "args": ["example-server", "--name", "pb", "--page-size", "4", "--test-tools"]}},
        ],
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


async def test_paginated_upstreams_list_completely(paged_gateway: Gateway) -> None:
    async with paged_gateway.client() as c:
        seen: list[str] = []
        cursor, pages = None, 0
        while True:
            page = await c.list_tools(cursor=cursor)
            seen += [t.name for t in page.tools]
            pages += 1
            cursor = page.next_cursor
            if not cursor:
                break
            assert pages < 10, "pagination does not end"
        base = ["echo", "add", "slow", "whoami", "sample"]
        assert sorted(seen) == sorted([f"pa__{t}" for t in base] + [f"pb__{t}" for t in [*base, "crash", "pid", "log", "fail", "toggle", "routed", "touch"]])
        assert pages == 3  # pa needs three pages of two (5 tools); pb three pages of four (12)
        r = await c.call_tool("pb__whoami", {})
        assert text_of(r) == "pb"
