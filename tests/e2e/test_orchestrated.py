"""server-everything run by the gateway's own orchestrator (the local backend, over stdio) and
used through the gateway with the official Python SDK: one process serves every client session;
calls, progress and sampling reach the session that made the call; the admin API reports it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import types

from e2e_support import Gateway, Tools, start_gateway, text_of, wait_until

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "e2e-admin-token-0123456789"


@pytest.fixture(scope="module")
def orchestrated(tools: Tools, workdir: Path) -> Iterator[Gateway]:
    gw = start_gateway(
        tools,
        workdir,
        "orchestrated",
        upstreams=[],
        extra={
            "servers": [{"name": "everything", "command": tools.everything[0], "args": [*tools.everything[1:], "stdio"]}],
            "admin": {"tokens": [{"principal": "ops", "token": ADMIN_TOKEN}]},
        },
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


def children_running_everything(gw: Gateway) -> list[int]:
    """Pids of server-everything processes whose parent is the gateway."""
    script = Path(gw.config["servers"][0]["args"][-2]).name
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == gw.proc.popen.pid and any(script.encode() in a for a in cmdline):
            pids.append(int(entry))
    return pids


def admin_servers(gw: Gateway) -> dict[str, Any]:
    r = httpx.get(f"http://127.0.0.1:{gw.port}/admin/v1/servers", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


async def test_sessions_share_the_one_process_the_orchestrator_runs(orchestrated: Gateway) -> None:
    async with orchestrated.client() as a, orchestrated.client() as b:
        tools = {t.name for t in (await a.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools, tools
        ra = await a.call_tool("echo", {"message": "from a"})
        rb = await b.call_tool("get-sum", {"a": 2, "b": 40})
        assert text_of(ra) == "Echo: from a"
        assert text_of(rb) == "The sum of 2 and 40 is 42."
        assert len(children_running_everything(orchestrated)) == 1
    listed = admin_servers(orchestrated)
    assert listed["backend"] == "local"
    [server] = listed["servers"]
    assert server["name"] == "everything" and server["source"] == "config"
    assert server["status"]["phase"] == "ready" and server["status"]["restarts"] == 0


async def test_each_session_gets_its_own_progress_on_the_shared_process(orchestrated: Gateway) -> None:
    """Both SDK clients number their progress tokens alike; the gateway keeps them apart."""
    progress: list[list[float]] = [[], []]
    results: list[str] = ["", ""]

    async def run(i: int, steps: int) -> None:
        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress[i].append(p)

        async with orchestrated.client() as c:
            r = await c.call_tool("trigger-long-running-operation", {"duration": 0.6, "steps": steps}, progress_callback=on_progress)
            results[i] = text_of(r)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, 0, 3)
        tg.start_soon(run, 1, 4)
    assert progress == [[1, 2, 3], [1, 2, 3, 4]]
    assert results[0].startswith("Long running operation completed") and "Steps: 3" in results[0]
    assert "Steps: 4" in results[1]


async def test_sampling_reaches_the_session_that_made_the_call(orchestrated: Gateway) -> None:
    asked: list[str] = []

    async def sampler(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="forty-two"), model="e2e-model")

    async def never(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        raise AssertionError("the other session must not be asked")

    async with orchestrated.client(sampling_callback=sampler) as a, orchestrated.client(sampling_callback=never) as b:
        tools = {t.name for t in (await b.list_tools()).tools}
        assert "trigger-sampling-request" in tools, "the gateway offers sampling to the shared server"
        r = await a.call_tool("trigger-sampling-request", {"prompt": "what is 6x7?", "maxTokens": 17})
    assert not r.is_error, r
    assert asked == ["Resource trigger-sampling-request context: what is 6x7?"]
    assert "forty-two" in text_of(r)


async def test_the_process_is_restarted_and_serves_again(orchestrated: Gateway) -> None:
    [before] = children_running_everything(orchestrated)
    r = httpx.post(
        f"http://127.0.0.1:{orchestrated.port}/admin/v1/servers/everything/restart",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )
    assert r.status_code == 202, r.text
    wait_until(lambda: children_running_everything(orchestrated) not in ([], [before]), 20, "a new server-everything process")
    async with orchestrated.client() as c:
        for _ in range(100):
            r = await c.call_tool("echo", {"message": "again"})
            if not r.is_error:
                break
            await anyio.sleep(0.1)
    assert text_of(r) == "Echo: again"
    assert admin_servers(orchestrated)["servers"][0]["status"]["restarts"] >= 1
