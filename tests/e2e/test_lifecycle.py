"""Upstream processes live exactly as long as the sessions that use them: ending a session,
letting it idle out, or stopping the gateway leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from e2e_support import (
    EV_STDIO,
    EXAMPLE,
    Gateway,
    HttpEverything,
    Tools,
    example_argv,
    alive,
    descendants,
    name,
    start_gateway,
    tapped,
    wait_until,
    wait_until_async,
    with_tag,
)

pytestmark = pytest.mark.anyio

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def raw_session(http: httpx.Client, url: str) -> str:
    """Opens a session by hand (initialize + initialized) and returns its id."""
    r = http.post(
        url,
        headers=HEADERS,
        json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
    )
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    h = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    assert http.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
    return sid


def raw_call(http: httpx.Client, url: str, sid: str, tool: str, args: dict) -> httpx.Response:
    h = {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    return http.post(url, headers=h, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": args}})


async def test_ending_a_session_ends_its_upstream_sessions(gateway: Gateway, everything_http: HttpEverything) -> None:
    gw_pid = gateway.proc.popen.pid
    before = set(descendants(gw_pid))
    ended = everything_http.proc.log_text().count("Received session termination request")
    tag = uuid.uuid4().hex
    async with gateway.client() as c:
        await c.call_tool(name(EXAMPLE, "echo"), {"text": "x", "e2e_tag": tag})
        ours = set(descendants(gw_pid)) - before
        # tap + server for each of the two stdio upstreams
        assert len(ours) >= 4, ours
    # The SDK sent DELETE on the way out: the session's processes go (server-everything
    # ignores stdin closing; the gateway escalates to SIGTERM after its grace period).
    await wait_until_async(lambda: not alive(ours), 15, "the session's processes to exit")
    example = gateway.tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
    assert example is not None and gateway.tap.exited(example.file)
    # ... and the HTTP upstream's session is ended with DELETE.
    await wait_until_async(
        lambda: everything_http.proc.log_text().count("Received session termination request") > ended,
        5,
        "DELETE of the session's server-everything (HTTP) session",
    )
    assert gateway.proc.alive()


def test_idle_session_is_reaped(tools: Tools, workdir: Path) -> None:
    tapdir = workdir / "tap-idle"
    gw = start_gateway(
        tools,
        workdir,
        "idle",
        [
            {"name": EXAMPLE, "stdio": tapped(tools, tapdir, EXAMPLE, example_argv(tools))},
            {"name": "other", "stdio": {"command": tools.gatehouse, "args": example_argv(tools, "--name", "other")[1:]}},
        ],
        mcp={"session_idle_timeout": "1s"},
        tapdir=tapdir,
    )
    try:
        tag = uuid.uuid4().hex
        with httpx.Client(timeout=10) as http:
            sid = raw_session(http, gw.url)
            r = raw_call(http, gw.url, sid, name(EXAMPLE, "echo"), {"text": "hello", "e2e_tag": tag})
            assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "hello"
            # The client vanishes without DELETE: the session idles out and its upstreams stop.
            call = gw.tap.find_request(EXAMPLE, "tools/call", with_tag(tag))
            assert call is not None
            wait_until(lambda: gw.tap.exited(call.file), 15, "the idle session's upstream to exit", gw.proc)
            r = raw_call(http, gw.url, sid, name(EXAMPLE, "echo"), {"text": "late"})
            assert r.status_code == 404
    finally:
        gw.proc.stop()


def test_gateway_shutdown_leaves_no_processes(tools: Tools, workdir: Path) -> None:
    tapdir = workdir / "tap-shutdown"
    ev_stdio = tapped(tools, tapdir, EV_STDIO, [*tools.everything, "stdio"])
    gw = start_gateway(
        tools,
        workdir,
        "shutdown",
        [
            {"name": EV_STDIO, "stdio": ev_stdio},
            {"name": EXAMPLE, "stdio": tapped(tools, tapdir, EXAMPLE, example_argv(tools))},
        ],
        tapdir=tapdir,
    )
    gw_pid = gw.proc.popen.pid
    try:
        with httpx.Client(timeout=10) as http:
            for _ in range(2):  # two sessions, each with its own upstream processes
                raw_session(http, gw.url)
        # 2 sessions x 2 stdio upstreams x (tap + server), and the gateway's process guard
        wait_until(lambda: len(descendants(gw_pid)) >= 9, 10, "the sessions' upstream processes")
        procs = set(descendants(gw_pid))
        os.kill(gw_pid, signal.SIGTERM)  # the gateway alone, not its group
        try:
            code = gw.proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the gateway did not exit within 15 s of SIGTERM")
        assert code == 0
        wait_until(lambda: not alive(procs), 10, "the upstream processes to be gone after shutdown")
    finally:
        gw.proc.stop()
