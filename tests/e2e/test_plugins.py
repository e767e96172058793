"""Every shipped policy plugin on the gateway's request path, with the official Python SDK as the
client and real upstreams (server-everything over HTTP and the example server): tool-policy (Rust
and Python builds), redact, trusted-data, list-filter and rate-limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError

from e2e_support import EV_HTTP, EXAMPLE, Gateway, HttpEverything, Tools, example_argv, name, start_gateway, text_of

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
POLICY_DENIED = -32030
RATE_LIMITED = -32029


def wasm(plugin: str) -> str:
    path = REPO / "target" / "plugins" / f"{plugin}.wasm"
    if not path.exists():
        pytest.fail(f"{path} is missing: run plugins/build.sh first", pytrace=False)
    return str(path)


def gateway_with(tools: Tools, workdir: Path, everything_http: HttpEverything, label: str, plugins: dict[str, Any]) -> Gateway:
    return start_gateway(
        tools,
        workdir,
        label,
        [
            {"name": EXAMPLE, "stdio": {"command": tools.gatehouse, "args": example_argv(tools)[1:]}},
            {"name": EV_HTTP, "http": {"url": everything_http.url}},
        ],
        plugins=plugins,
    )


@pytest.fixture(scope="module")
def policed(tools: Tools, workdir: Path, everything_http: HttpEverything) -> Iterator[Gateway]:
    """All five plugins at once, each on its own chain."""
    plugins = {
        "modules": [
            {
                "name": "policy",
                "path": wasm("tool_policy"),
                "config": {
                    "rules": [
                        {"tool": "echo", "argument": "message", "operator": "startsWith", "value": "rm ", "action": "block", "reason": "no shell commands"},
                        {"tool": "get-env", "action": "block", "reason": "environment is private"},
                    ],
                    "default": "allow",
                },
            },
            {"name": "redact", "path": wasm("redact")},
            {"name": "lists", "path": wasm("list_filter"), "config": {"rules": [{"deny": ["get-tiny-image", "args-prompt"]}]}},
            {"name": "taint", "path": wasm("trusted_data"), "config": {"untrusted": ["whoami"], "sensitive": ["get-sum"]}},
            {"name": "limits", "path": wasm("rate_limit"), "config": {"limits": [{"tool": "add", "calls": 3, "window": "60s", "per": "session"}]}},
        ],
        "chains": [
            {"name": "calls", "methods": ["tools/call"], "plugins": ["policy", "taint", "limits"]},
            {"name": "results", "plugins": ["redact"]},
            {"name": "catalog", "plugins": ["lists"]},
        ],
    }
    gw = gateway_with(tools, workdir, everything_http, "plugins", plugins)
    try:
        yield gw
    finally:
        gw.proc.stop()


async def expect_denied(call: Any, code: int, *words: str) -> None:
    with pytest.raises(MCPError) as err:
        await call
    assert err.value.error.code == code, err.value.error
    for w in words:
        assert w in err.value.error.message, err.value.error.message


async def test_tool_policy_blocks_by_rule_and_allows_the_rest(policed: Gateway) -> None:
    async with policed.client() as c:
        await expect_denied(c.call_tool(name(EV_HTTP, "echo"), {"message": "rm -rf /"}), POLICY_DENIED, "policy", "no shell commands")
        await expect_denied(c.call_tool(name(EV_HTTP, "get-env"), {}), POLICY_DENIED, "environment is private")
        ok = await c.call_tool(name(EV_HTTP, "echo"), {"message": "ls"})
        assert text_of(ok) == "Echo: ls"


async def test_redact_masks_secrets_in_results(policed: Gateway) -> None:
    async with policed.client() as c:
        secret = "key sk-abcdefghijklmnopqrstuvwxyz012345 mail ada@example.org card 4111 1111 1111 1111"
        out = text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": secret}))
        assert out.startswith("Echo: key ")
        for leaked in ("sk-abcdefghijklmnopqrstuvwxyz012345", "ada@example.org", "4111 1111 1111 1111"):
            assert leaked not in out, out


async def test_list_filter_hides_entries_and_their_calls(policed: Gateway) -> None:
    async with policed.client() as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert name(EV_HTTP, "echo") in tools
        assert name(EV_HTTP, "get-tiny-image") not in tools
        prompts = {p.name for p in (await c.list_prompts()).prompts}
        assert name(EV_HTTP, "simple-prompt") in prompts
        assert name(EV_HTTP, "args-prompt") not in prompts
        await expect_denied(c.call_tool(name(EV_HTTP, "get-tiny-image"), {}), POLICY_DENIED, "lists")


async def test_trusted_data_blocks_sensitive_tools_in_a_tainted_session(policed: Gateway) -> None:
    async with policed.client() as c:
        assert "5" in text_of(await c.call_tool(name(EV_HTTP, "get-sum"), {"a": 2, "b": 3}))
        assert text_of(await c.call_tool(name(EXAMPLE, "whoami"), {})) == "example"
        await expect_denied(c.call_tool(name(EV_HTTP, "get-sum"), {"a": 2, "b": 3}), POLICY_DENIED, "taint")
    async with policed.client() as fresh:
        assert "5" in text_of(await fresh.call_tool(name(EV_HTTP, "get-sum"), {"a": 2, "b": 3}))


async def test_rate_limit_per_session(policed: Gateway) -> None:
    async with policed.client() as c:
        for _ in range(3):
            assert text_of(await c.call_tool(name(EXAMPLE, "add"), {"a": 1, "b": 1})) == "2"
        await expect_denied(c.call_tool(name(EXAMPLE, "add"), {"a": 1, "b": 1}), RATE_LIMITED, "limits")
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "still fine"})) == "still fine"
    async with policed.client() as other:
        assert text_of(await other.call_tool(name(EXAMPLE, "add"), {"a": 2, "b": 2})) == "4"


@pytest.mark.parametrize("build", ["tool_policy", "tool_policy_py", "tool_policy_js"])
async def test_every_build_of_tool_policy_decides_alike(build: str, tools: Tools, workdir: Path, everything_http: HttpEverything) -> None:
    """The Rust, Python and JavaScript builds of tool-policy, each in front of
    the same server with the same rules, make the same decisions."""
    plugins = {
        "modules": [
            {
                "name": "policy",
                "path": wasm(build),
                "init_deadline": "20s",
                "config": {"rules": [{"tool": "echo", "argument": "message", "operator": "regex", "value": "^rm\\s", "action": "block", "reason": "no shell commands"}], "default": "allow"},
            }
        ],
        "chains": [{"name": "calls", "methods": ["tools/call"], "plugins": ["policy"]}],
    }
    gw = gateway_with(tools, workdir, everything_http, f"plugins-{build}", plugins)
    try:
        async with gw.client() as c:
            await expect_denied(c.call_tool(name(EV_HTTP, "echo"), {"message": "rm -rf /"}), POLICY_DENIED, "policy", "no shell commands")
            assert text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": "ls"})) == "Echo: ls"
            assert text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": "firm stance"})) == "Echo: firm stance"
    finally:
        gw.proc.stop()
