"""Upstream failures: one that is down when the gateway starts (and comes up later), one that
crashes mid-call, one that is too slow, one that restarts. The healthy upstreams keep serving,
errors name the failed upstream, and the gateway recovers when the upstream does."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import MCPError, types

from e2e_support import (
    EV_HTTP,
    EXAMPLE,
    Gateway,
    HttpEverything,
    Proc,
    Tools,
    example_argv,
    free_port,
    name,
    simulated_log_arrives,
    sse_streams_opened,
    start_everything_http,
    start_gateway,
    tapped,
    text_of,
    wait_until,
    wait_until_async,
    with_tag,
)

pytestmark = pytest.mark.anyio

UPSTREAM_UNAVAILABLE = -32010
UPSTREAM_TIMEOUT = -32011


# ----------------------------------------------------------------------------- an upstream down from the start


@pytest.fixture(scope="module")
def degraded(tools: Tools, workdir: Path, everything_http: HttpEverything) -> Iterator[Gateway]:
    """example (1 s call timeout, tapped), server-everything over HTTP, and "dead": an HTTP
    upstream on a port nothing listens on."""
    tapdir = workdir / "tap-degraded"
    gw = start_gateway(
        tools,
        workdir,
        "degraded",
        [
            {"name": EXAMPLE, "stdio": tapped(tools, tapdir, EXAMPLE, example_argv(tools)), "call_timeout": "1s"},
            {"name": EV_HTTP, "http": {"url": everything_http.url}},
            {"name": "dead", "http": {"url": f"http://127.0.0.1:{free_port()}/mcp"}, "connect_timeout": "5s"},
        ],
        tapdir=tapdir,
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


def upstreams_of(names: list[str]) -> set[str]:
    return {n.split("__", 1)[0] for n in names}


async def test_lists_skip_an_upstream_that_is_down(degraded: Gateway) -> None:
    async with degraded.client() as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        assert upstreams_of(tools) == {EXAMPLE, EV_HTTP}
        assert name(EXAMPLE, "echo") in tools and name(EV_HTTP, "echo") in tools
        prompts = [p.name for p in (await c.list_prompts()).prompts]
        assert upstreams_of(prompts) == {EXAMPLE, EV_HTTP}
        resources = [r.uri for r in (await c.list_resources()).resources]
        assert "example://example/readme" in resources
        assert "demo://resource/static/document/features.md" in resources
        templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
        assert "example://example/echo/{text}" in templates


async def test_calls_to_an_upstream_that_is_down_fail_naming_it(degraded: Gateway) -> None:
    async with degraded.client() as c:
        started = time.monotonic()
        with pytest.raises(MCPError) as e:
            await c.call_tool("dead__echo", {"message": "anyone?"})
        assert time.monotonic() - started < 5
        assert e.value.code == UPSTREAM_UNAVAILABLE
        assert "'dead'" in e.value.message, e.value.message
        with pytest.raises(MCPError) as e:
            await c.get_prompt("dead__simple-prompt")
        assert e.value.code == UPSTREAM_UNAVAILABLE and "'dead'" in e.value.message
        # The healthy upstreams are unaffected.
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "fine"})) == "fine"
        assert text_of(await c.call_tool(name(EV_HTTP, "echo"), {"message": "fine"})) == "Echo: fine"


async def test_call_timeout_names_the_upstream_and_cancels_upstream(degraded: Gateway) -> None:
    tag = uuid.uuid4().hex
    tap = degraded.tap
    async with degraded.client() as c:
        started = time.monotonic()
        with pytest.raises(MCPError) as e:
            await c.call_tool(name(EXAMPLE, "slow"), {"seconds": 20, "steps": 1, "e2e_tag": tag})
        elapsed = time.monotonic() - started
        assert e.value.code == UPSTREAM_TIMEOUT
        assert "'example'" in e.value.message and "1s" in e.value.message, e.value.message
        assert 0.9 < elapsed < 5, elapsed
        request = tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
        assert request is not None

        def cancelled() -> bool:
            return any(
                x.msg.get("method") == "notifications/cancelled" and x.msg["params"]["requestId"] == request.msg["id"]
                for x in tap.later(request)
            )

        await wait_until_async(cancelled, 5, "notifications/cancelled for the timed-out call")
        assert text_of(await c.call_tool(name(EXAMPLE, "slow"), {"seconds": 0.1})) == "done after 0.1s"


# ----------------------------------------------------------------------------- an upstream that comes up later


class Late:
    """A gateway whose HTTP upstream "late" is down until `start()`."""

    def __init__(self, tools: Tools, workdir: Path) -> None:
        self.tools, self.workdir = tools, workdir
        self.port = free_port()
        self.server: HttpEverything | None = None
        self.gateway = start_gateway(
            tools,
            workdir,
            f"late-{self.port}",
            [
                {"name": EXAMPLE, "stdio": {"command": tools.gatehouse, "args": example_argv(tools)[1:]}},
                {"name": "late", "http": {"url": f"http://127.0.0.1:{self.port}/mcp"}},
            ],
        )

    def start(self) -> None:
        self.server = start_everything_http(self.tools, self.workdir, self.port, role="late")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.proc.stop()
            self.server = None

    def close(self) -> None:
        self.stop_server()
        self.gateway.proc.stop()


@pytest.fixture
def late(tools: Tools, workdir: Path) -> Iterator[Late]:
    setup = Late(tools, workdir)
    try:
        yield setup
    finally:
        setup.close()


async def test_upstream_down_at_startup_is_used_once_it_is_up(late: Late) -> None:
    async with late.gateway.client() as c:
        with pytest.raises(MCPError) as e:
            await c.call_tool("late__echo", {"message": "x"})
        assert "'late'" in e.value.message
        assert upstreams_of([t.name for t in (await c.list_tools()).tools]) == {EXAMPLE}

        late.start()
        r = await c.call_tool("late__echo", {"message": "you're up"})
        assert text_of(r) == "Echo: you're up"
        assert upstreams_of([t.name for t in (await c.list_tools()).tools]) == {EXAMPLE, "late"}


async def test_upstream_down_at_startup_delivers_notifications_once_up(late: Late) -> None:
    """Messages an HTTP upstream sends outside any call travel on its GET stream; the gateway
    must open one for an upstream that connects after the client opened its own GET stream."""
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async with late.gateway.client(logging_callback=on_log) as c:
        with pytest.raises(MCPError):
            await c.call_tool("late__echo", {"message": "x"})
        late.start()
        assert text_of(await c.call_tool("late__echo", {"message": "up"})) == "Echo: up"
        server = late.server
        assert server is not None
        try:
            await wait_until_async(lambda: sse_streams_opened(server) > 0, 5, "a GET stream to 'late'")
            opened = True
        except TimeoutError:
            opened = False
        assert opened, (
            "the gateway never opened a GET stream to 'late' (it connected after the client's GET "
            "stream was opened), so nothing 'late' sends outside a call can reach the client"
        )
        assert await simulated_log_arrives(c, "late__toggle-simulated-logging", logs), logs


async def test_server_everything_restart_is_survived(late: Late) -> None:
    """server-everything forgets its sessions when it restarts and answers the old session id
    with HTTP 400 "No valid session ID provided" (not the 404 the spec asks for)."""
    late.start()
    async with late.gateway.client() as c:
        assert text_of(await c.call_tool("late__echo", {"message": "one"})) == "Echo: one"
        late.stop_server()
        with pytest.raises(MCPError) as e:
            await c.call_tool("late__echo", {"message": "down"})
        assert "'late'" in e.value.message
        late.start()
        r = await c.call_tool("late__echo", {"message": "two"})
        assert text_of(r) == "Echo: two"


async def test_spec_compliant_http_upstream_restart_is_survived(tools: Tools, workdir: Path) -> None:
    """The Python SDK fixture server answers a forgotten session id with 404: the gateway
    initializes a new upstream session and retries the call."""
    port = free_port()

    def start_fixture() -> Proc:
        proc = Proc(
            f"fixture-http:{port}",
            [tools.python, str(Path(__file__).resolve().parents[1] / "fixtures" / "conformance_server.py"), "--http", str(port)],
            workdir / f"fixture-http-{port}.log",
        )
        wait_until(lambda: "LISTENING" in proc.log_text(), 30, "the fixture server to listen", proc)
        return proc

    fixture = start_fixture()
    gw = start_gateway(
        tools,
        workdir,
        f"restart-{port}",
        [
            {"name": EXAMPLE, "stdio": {"command": tools.gatehouse, "args": example_argv(tools)[1:]}},
            {"name": "fx", "http": {"url": f"http://127.0.0.1:{port}/mcp"}},
        ],
    )
    try:
        async with gw.client() as c:
            assert text_of(await c.call_tool("fx__echo", {"text": "one"})) == "one"
            fixture.stop()
            fixture = start_fixture()
            assert text_of(await c.call_tool("fx__echo", {"text": "two"})) == "two"
    finally:
        gw.proc.stop()
        fixture.stop()


# ----------------------------------------------------------------------------- an upstream that crashes


async def test_crash_mid_call_names_the_upstream_and_it_is_respawned(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex
    tap = gateway.tap
    async with gateway.client() as c:
        started = time.monotonic()
        with pytest.raises(MCPError) as e:
            await c.call_tool(name(EXAMPLE, "crash"), {"e2e_tag": tag})
        assert time.monotonic() - started < 5
        assert e.value.code == UPSTREAM_UNAVAILABLE and "'example'" in e.value.message, e.value.message
        crashed = tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
        assert crashed is not None
        await wait_until_async(lambda: tap.exited(crashed.file), 5, "the crashed process to be gone")

        r = await c.call_tool(name(EXAMPLE, "echo"), {"text": "reborn", "e2e_tag": tag + "-after"})
        assert text_of(r) == "reborn"
        after = tap.find_request(EXAMPLE, "tools/call", with_tag(tag + "-after"))
        assert after is not None and after.file != crashed.file  # a new process
        tools = [t.name for t in (await c.list_tools()).tools]
        assert name(EXAMPLE, "crash") in tools and name(EV_HTTP, "echo") in tools


async def test_crash_fails_every_call_in_flight_at_once(gateway: Gateway) -> None:
    """A call waiting on the process that crashed fails right away, not at its call timeout."""
    tag = uuid.uuid4().hex
    tap = gateway.tap
    async with gateway.client() as c:
        outcome: dict[str, Any] = {}

        async def slow() -> None:
            try:
                await c.call_tool(name(EXAMPLE, "slow"), {"seconds": 25, "steps": 1, "e2e_tag": tag})
                outcome["slow"] = "completed"
            except MCPError as e:
                outcome["slow"] = e

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await wait_until_async(lambda: tap.find_request(EXAMPLE, "tools/call", with_tag(tag)), 10, "the slow call upstream")
            with pytest.raises(MCPError):
                await c.call_tool(name(EXAMPLE, "crash"), {})
        assert time.monotonic() - started < 10
        assert isinstance(outcome["slow"], MCPError), outcome
        assert "'example'" in outcome["slow"].message
        assert text_of(await c.call_tool(name(EXAMPLE, "echo"), {"text": "ok"})) == "ok"
