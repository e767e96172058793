"""Progress notifications relayed to the caller, and cancellation: the client abandons a call
(anyio cancel scope, the SDK sends notifications/cancelled), the gateway tells the upstream, and
the session goes on working without stale answers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from mcp import Client

from e2e_support import EV_HTTP, EV_STDIO, EXAMPLE, Gateway, name, text_of, wait_until_async, with_tag

# (upstream, tool, arguments for `steps` steps over `seconds`, expected result text)
LONG_OPS = {
    EV_STDIO: ("trigger-long-running-operation", lambda s, n: {"duration": s, "steps": n}, "Long running operation completed. Duration: {s} seconds, Steps: {n}."),
    EV_HTTP: ("trigger-long-running-operation", lambda s, n: {"duration": s, "steps": n}, "Long running operation completed. Duration: {s} seconds, Steps: {n}."),
    EXAMPLE: ("slow", lambda s, n: {"seconds": s, "steps": n}, "done after {s}s"),
}

pytestmark = pytest.mark.anyio


def long_op(upstream: str, seconds: float, steps: int, **extra: Any) -> tuple[str, dict[str, Any], str]:
    tool, args, expected = LONG_OPS[upstream]
    return name(upstream, tool), {**args(seconds, steps), **extra}, expected.format(s=seconds, n=steps)


@pytest.mark.parametrize("upstream", [EV_STDIO, EV_HTTP, EXAMPLE])
async def test_progress_notifications_reach_the_caller(gateway: Gateway, upstream: str) -> None:
    progress: list[tuple[float, float | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, total))

    tool, args, expected = long_op(upstream, 0.6, 3)
    async with gateway.client() as c:
        r = await c.call_tool(tool, args, progress_callback=on_progress)
    assert text_of(r) == expected
    assert progress == [(1, 3), (2, 3), (3, 3)]


async def test_concurrent_calls_each_get_their_own_progress(gateway: Gateway) -> None:
    """Four calls at once, two of them on the same stdio process: progress is routed by token."""
    calls = [
        long_op(EXAMPLE, 0.6, 3),
        long_op(EXAMPLE, 0.4, 4),
        long_op(EV_STDIO, 0.4, 2),
        long_op(EV_HTTP, 0.5, 5),
    ]
    progress: list[list[float]] = [[] for _ in calls]
    results: list[str] = ["" for _ in calls]

    async with gateway.client() as c:

        async def run(i: int) -> None:
            async def on_progress(p: float, total: float | None, message: str | None) -> None:
                progress[i].append(p)

            tool, args, _ = calls[i]
            results[i] = text_of(await c.call_tool(tool, args, progress_callback=on_progress))

        async with anyio.create_task_group() as tg:
            for i in range(len(calls)):
                tg.start_soon(run, i)

    assert results == [expected for _, _, expected in calls]
    assert progress == [[1, 2, 3], [1, 2, 3, 4], [1, 2], [1, 2, 3, 4, 5]]


async def cancel_once_running(c: Client, tool: str, args: dict[str, Any], started: Callable[[], Any] | None) -> None:
    """Calls `tool` and cancels the call (anyio cancel scope) once it runs upstream: when
    `started()` turns true, or (with `started` None) when the first progress notification comes."""
    progressed = anyio.Event()
    finished = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async def call() -> None:
        await c.call_tool(tool, args, progress_callback=on_progress if started is None else None)
        finished.append(True)

    with anyio.move_on_after(20) as safety:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            if started is None:
                await progressed.wait()
            else:
                await wait_until_async(started, 10, f"{tool} to reach its upstream")
            tg.cancel_scope.cancel()
    assert not safety.cancelled_caught, "the call was never seen running"
    assert not finished, "the call finished before it was cancelled"


@pytest.mark.parametrize("relay", ["sse", "json"])
@pytest.mark.parametrize("upstream", [EXAMPLE, EV_STDIO])
async def test_cancellation_reaches_the_stdio_upstream(gateway: Gateway, upstream: str, relay: str) -> None:
    """relay="sse": the call has a progress token, so the gateway answers on an SSE stream;
    relay="json": it does not, so the gateway holds a plain JSON response. Either way the
    upstream must be sent notifications/cancelled for its own id of the request."""
    tag = uuid.uuid4().hex
    tool, args, _ = long_op(upstream, 60, 600, e2e_tag=tag)
    tap = gateway.tap
    async with gateway.client() as c:
        started = None if relay == "sse" else (lambda: tap.find_request(upstream, "tools/call", with_tag(tag)))
        await cancel_once_running(c, tool, args, started)

        request = tap.find_request(upstream, "tools/call", with_tag(tag))
        assert request is not None
        upstream_id = request.msg["id"]

        def cancelled() -> bool:
            return any(
                e.dir == "in"
                and e.msg.get("method") == "notifications/cancelled"
                and (e.msg.get("params") or {}).get("requestId") == upstream_id
                for e in tap.later(request)
            )

        await wait_until_async(cancelled, 5, f"notifications/cancelled for upstream request {upstream_id}")

        # The session goes on, and the next call gets its own answer, not the abandoned one's.
        tool, args, expected = long_op(upstream, 0.2, 2)
        r = await c.call_tool(tool, args)
        assert text_of(r) == expected
        answered = [e for e in tap.later(request) if e.dir == "out" and e.msg.get("id") == upstream_id]
        assert not answered, f"the upstream still answered the cancelled request: {answered}"


async def test_cancelled_http_call_leaves_the_session_working(gateway: Gateway) -> None:
    async with gateway.client() as c:
        tool, args, _ = long_op(EV_HTTP, 60, 600)
        await cancel_once_running(c, tool, args, None)
        tool, args, expected = long_op(EV_HTTP, 0.2, 2)
        r = await c.call_tool(tool, args)
        assert text_of(r) == expected
        r = await c.call_tool(name(EV_HTTP, "echo"), {"message": "still here"})
        assert text_of(r) == "Echo: still here"
