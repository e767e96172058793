"""A 2026-07-28 upstream behind the gateway (the project's fixture over Streamable HTTP, on the
official Python SDK 2.x, which speaks 2026-07-28 and 2025-11-25 alike), met by clients of both
eras with the official Python SDK's own client:

- the gateway probes it with server/discover and speaks 2026-07-28 to it: it holds no session
  upstream, for any client;
- a legacy (2025-11-25) client's elicitation and sampling round trips: the server's
  input_required result becomes server requests on the client's stream, and the answers go back
  upstream as inputResponses;
- a 2026-07-28 client sees the server's own input keys, with the server's requestState sealed by
  the gateway: a tampered state and one from another caller are refused;
- Mcp-Param-* headers the server requires are sent for clients of either era.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import types

from e2e_support import START_TIMEOUT, Gateway, Proc, Tools, start_gateway, text_of, wait_until

pytestmark = pytest.mark.anyio

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "conformance_server.py"
MODERN = "2026-07-28"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
}


@pytest.fixture(scope="module")
def modern_upstream(tools: Tools, workdir: Path) -> Iterator[tuple[Proc, str]]:
    proc = Proc("modern-fixture", [tools.python, str(FIXTURE), "--http", "0"], workdir / "modern-fixture.log")
    found = wait_until(lambda: re.search(r"LISTENING (\S+)", proc.log_text()), START_TIMEOUT, "the HTTP fixture to listen", proc)
    try:
        yield proc, found.group(1)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def eras_gateway(tools: Tools, workdir: Path, modern_upstream: tuple[Proc, str]) -> Iterator[Gateway]:
    gw = start_gateway(
        tools,
        workdir,
        "eras",
        [{"name": "modern", "http": {"url": modern_upstream[1]}, "call_timeout": "30s"}],
        extra={"auth": {"tokens": [{"token": ALICE, "principal": "alice"}, {"token": BOB, "principal": "bob"}]}},
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


def post(gw: Gateway, token: str, body: dict[str, Any], name: str | None = None) -> httpx.Response:
    headers = {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": MODERN,
        "mcp-method": body["method"],
    }
    if name is not None:
        headers["mcp-name"] = name
    return httpx.post(gw.url, headers=headers, content=json.dumps(body), timeout=30)


def call(tool: str, id: int, **extra: Any) -> dict[str, Any]:
    params = {"name": tool, "arguments": {}, "_meta": META, **extra}
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}


async def test_a_legacy_clients_questions_cross_a_2026_upstream(eras_gateway: Gateway) -> None:
    asked: list[str] = []

    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Grace"})

    async def sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris."), model="m")

    async with eras_gateway.client(mode="legacy", token=ALICE, elicitation_callback=elicit, sampling_callback=sample) as c:
        assert c.protocol_version == "2025-11-25"
        tools = {t.name for t in (await c.list_tools()).tools}
        assert {"echo", "test_input_required_result_elicitation", "test_sampling"} <= tools
        assert text_of(await c.call_tool("echo", {"text": "across eras"})) == "across eras"
        r = await c.call_tool("test_input_required_result_elicitation", {})
        assert text_of(r) == "Hello, Grace!"
        r = await c.call_tool("test_input_required_result_multi_round", {})
        assert text_of(r) == "Grace likes None"  # the canned answer has no color
        r = await c.call_tool("test_sampling", {"prompt": "capital of France?"})
        assert "Paris." in text_of(r)
        assert asked[0] == "What is your name?" and "capital of France?" in asked
        # An argument the tool mirrors in a header reaches the server (which checks it).
        assert text_of(await c.call_tool("test_header_routed", {"region": "eu-west"})) == "eu-west"


async def test_a_2026_client_answers_the_servers_own_questions(eras_gateway: Gateway) -> None:
    first = post(eras_gateway, ALICE, call("test_input_required_result_elicitation", 1), "test_input_required_result_elicitation")
    assert first.status_code == 200, first.text
    result = first.json()["result"]
    assert result["resultType"] == "input_required"
    assert set(result["inputRequests"]) == {"user_name"}  # the server's own key
    state = result["requestState"]
    answers = {"user_name": {"action": "accept", "content": {"name": "Alice"}}}
    tampered = state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB")
    bad = post(
        eras_gateway,
        ALICE,
        call("test_input_required_result_elicitation", 2, requestState=tampered, inputResponses=answers),
        "test_input_required_result_elicitation",
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == -32602, bad.text
    foreign = post(
        eras_gateway,
        BOB,
        call("test_input_required_result_elicitation", 3, requestState=state, inputResponses=answers),
        "test_input_required_result_elicitation",
    )
    assert foreign.status_code == 400 and "not issued to this caller" in foreign.json()["error"]["message"], foreign.text
    other = post(
        eras_gateway, ALICE, call("echo", 4, requestState=state, inputResponses=answers), "echo"
    )
    assert other.status_code == 400 and "another request" in other.json()["error"]["message"], other.text
    done = post(
        eras_gateway,
        ALICE,
        call("test_input_required_result_elicitation", 5, requestState=state, inputResponses=answers),
        "test_input_required_result_elicitation",
    )
    assert done.status_code == 200, done.text
    assert done.json()["result"]["content"][0]["text"] == "Hello, Alice!"
    # A first call that already carries the answer under the server's key needs no round.
    direct = post(
        eras_gateway,
        BOB,
        call("test_input_required_result_elicitation", 6, inputResponses=answers),
        "test_input_required_result_elicitation",
    )
    assert direct.json()["result"]["content"][0]["text"] == "Hello, Alice!", direct.text


async def test_a_2026_client_through_the_sdk(eras_gateway: Gateway) -> None:
    async def elicit(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with eras_gateway.client(mode=MODERN, token=BOB, wait_for_get_stream=False, elicitation_callback=elicit) as c:
        assert c.protocol_version == MODERN
        r = await c.call_tool("test_input_required_result_elicitation", {})
        assert text_of(r) == "Hello, Ada!"
        assert text_of(await c.call_tool("test_header_routed", {"region": "ap-south"})) == "ap-south"


@pytest.fixture(scope="module")
def sessions_gateway(tools: Tools, workdir: Path, modern_upstream: tuple[Proc, str]) -> Iterator[Gateway]:
    """The same server, told to be spoken to with sessions only (`protocol: sessions`)."""
    gw = start_gateway(
        tools,
        workdir,
        "eras-sessions",
        [{"name": "modern", "http": {"url": modern_upstream[1]}, "protocol": "sessions", "call_timeout": "30s"}],
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


async def test_an_upstream_that_ends_its_stream_mid_call_is_resumed(sessions_gateway: Gateway) -> None:
    """The fixture's test_reconnection ends its response stream before answering (2025-11-25
    polling): the gateway comes back with Last-Event-ID and the answer still arrives."""
    async with sessions_gateway.client(mode="legacy") as c:
        r = await c.call_tool("test_reconnection", {})
        assert text_of(r) == "Reconnection test completed successfully"
        # Spoken to with sessions: the server's questions are server requests, not input keys.
        assert text_of(await c.call_tool("echo", {"text": "still here"})) == "still here"
