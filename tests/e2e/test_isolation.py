"""Two client sessions at once: each gets its own upstream sessions and processes, server-to-
client requests go to the session whose call caused them, and one session's failures (a crashed
upstream, a refused sampling request, a client vanishing mid-call) leave the other alone."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
from mcp import MCPError, types

from e2e_support import EV_HTTP, EV_STDIO, EXAMPLE, Gateway, name, text_of, wait_until_async, with_tag

pytestmark = pytest.mark.anyio


def echoing_sampler(who: str, asked: list[str]) -> Any:
    async def sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        prompt = params.messages[0].content.text
        asked.append(prompt)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=f"{who} answers {prompt}"), model="m")

    return sample


async def test_sampling_requests_go_to_the_session_that_caused_them(gateway: Gateway) -> None:
    # Per client: two concurrent calls on the same example process, and one on each
    # server-everything, all at once in both sessions.
    calls = [
        (EXAMPLE, "sample", "prompt", "p1", lambda who, p: f"model said: {who} answers {p}"),
        (EXAMPLE, "sample", "prompt", "p2", lambda who, p: f"model said: {who} answers {p}"),
        (EV_STDIO, "trigger-sampling-request", "prompt", "p3", lambda who, p: f"{who} answers Resource trigger-sampling-request context: {p}"),
        (EV_HTTP, "trigger-sampling-request", "prompt", "p4", lambda who, p: f"{who} answers Resource trigger-sampling-request context: {p}"),
    ]
    asked: dict[str, list[str]] = {"A": [], "B": []}
    results: dict[tuple[str, str], str] = {}

    async def client(who: str) -> None:
        async with gateway.client(sampling_callback=echoing_sampler(who, asked[who])) as c:

            async def one(upstream: str, tool: str, arg: str, prompt: str) -> None:
                r = await c.call_tool(name(upstream, tool), {arg: f"{who}-{prompt}"})
                results[(who, prompt)] = text_of(r)

            async with anyio.create_task_group() as tg:
                for upstream, tool, arg, prompt, _ in calls:
                    tg.start_soon(one, upstream, tool, arg, prompt)

    async with anyio.create_task_group() as tg:
        tg.start_soon(client, "A")
        tg.start_soon(client, "B")

    for who in ("A", "B"):
        assert len(asked[who]) == len(calls)
        assert all(f"{who}-" in p for p in asked[who]), asked  # never the other session's prompt
        for upstream, _, _, prompt, expect in calls:
            text = results[(who, prompt)]
            if upstream == EXAMPLE:
                assert text == expect(who, f"{who}-{prompt}")
            else:
                assert f'"text": "{expect(who, f"{who}-{prompt}")}"' in text


async def test_refused_sampling_in_one_session_does_not_affect_the_other(gateway: Gateway) -> None:
    async def refuse(ctx: Any, params: types.CreateMessageRequestParams) -> types.ErrorData:
        return types.ErrorData(code=-32001, message="A refuses")

    b_asked: list[str] = []
    outcome: dict[str, Any] = {}

    async def a() -> None:
        async with gateway.client(sampling_callback=refuse) as c:
            try:
                await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "from A"})
                outcome["A"] = "no error"
            except MCPError as e:
                outcome["A"] = e.message

    async def b() -> None:
        async with gateway.client(sampling_callback=echoing_sampler("B", b_asked)) as c:
            outcome["B"] = text_of(await c.call_tool(name(EXAMPLE, "sample"), {"prompt": "from B"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(a)
        tg.start_soon(b)
    assert "A refuses" in outcome["A"]
    assert outcome["B"] == "model said: B answers from B"
    assert b_asked == ["from B"]


async def test_upstream_crash_in_one_session_does_not_affect_the_other(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    tap = gateway.tap
    b_progress: list[float] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        b_progress.append(p)

    async with gateway.client() as a, gateway.client() as b:
        b_result: dict[str, Any] = {}

        async def b_slow() -> None:
            r = await b.call_tool(name(EXAMPLE, "slow"), {"seconds": 1.5, "steps": 3, "e2e_tag": tag}, progress_callback=on_progress)
            b_result["text"] = text_of(r)

        async with anyio.create_task_group() as tg:
            tg.start_soon(b_slow)
            await wait_until_async(lambda: b_progress, 10, "B's call to make progress")
            with pytest.raises(MCPError) as crash:
                await a.call_tool(name(EXAMPLE, "crash"), {})
            assert "'example'" in crash.value.message, crash.value.message
        assert b_result["text"] == "done after 1.5s"
        assert b_progress == [1, 2, 3]

        # B's example process is the one that ran its slow call: it was never restarted.
        b_call = tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
        assert b_call is not None and not tap.exited(b_call.file)
        r = await b.call_tool(name(EXAMPLE, "echo"), {"text": tag, "e2e_tag": tag + "-echo"})
        assert text_of(r) == tag
        b_echo = tap.find_request(EXAMPLE, "tools/call", with_tag(tag + "-echo"))
        assert b_echo is not None and b_echo.file == b_call.file
        # A's session goes on with a new process.
        r = await a.call_tool(name(EXAMPLE, "echo"), {"text": "A again"})
        assert text_of(r) == "A again"


async def test_client_vanishing_mid_call_does_not_affect_the_other(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    tap = gateway.tap
    async with gateway.client() as b:
        b_progress: list[float] = []

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            b_progress.append(p)

        async def a_vanishes() -> None:
            # A starts long calls on every upstream and is torn down while they run.
            with anyio.CancelScope() as scope:
                async with gateway.client() as a, anyio.create_task_group() as tg:
                    tg.start_soon(a.call_tool, name(EXAMPLE, "slow"), {"seconds": 60, "steps": 2, "e2e_tag": tag})
                    tg.start_soon(a.call_tool, name(EV_STDIO, "trigger-long-running-operation"), {"duration": 60, "steps": 2})
                    tg.start_soon(a.call_tool, name(EV_HTTP, "trigger-long-running-operation"), {"duration": 60, "steps": 2})
                    await wait_until_async(lambda: tap.find_request(EXAMPLE, "tools/call", with_tag(tag)), 10, "A's call upstream")
                    scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(a_vanishes)
            r = await b.call_tool(name(EXAMPLE, "slow"), {"seconds": 1, "steps": 4}, progress_callback=on_progress)
        assert text_of(r) == "done after 1s" and b_progress == [1, 2, 3, 4]
        r = await b.call_tool(name(EV_HTTP, "get-sum"), {"a": 1, "b": 1})
        assert text_of(r) == "The sum of 1 and 1 is 2."

        # A's abandoned call was cancelled upstream. (A's session itself lives on until it idles
        # out: the SDK's DELETE was cancelled along with everything else.)
        a_call = tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
        assert a_call is not None

        def cancelled() -> bool:
            return any(
                e.msg.get("method") == "notifications/cancelled" and e.msg["params"]["requestId"] == a_call.msg["id"]
                for e in tap.later(a_call)
            )

        await wait_until_async(cancelled, 5, "A's abandoned call to be cancelled upstream")
