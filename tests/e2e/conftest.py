"""Fixtures of the end-to-end suite: real MCP peers on both sides of the gateway.

    . target/tools/env.sh && target/tools/venv/bin/python -m pytest tests/e2e -q

Every process (server-everything over Streamable HTTP, gateways) runs in its own process group,
and every group is killed at teardown, also when a fixture or test fails half-way or the run is
interrupted, so nothing is left behind. The gateway runs each stdio upstream in a group of its
own and stops them itself (or its process guard does, when the gateway is killed). When a
test fails, the tail of every running process's log is attached to its report.

Environment (target/tools/env.sh sets it; without it, install.sh's paths are used):
  GATEHOUSE_BIN         gateway binary (default target/debug/gatehouse)
  GATEHOUSE_PYTHON      Python that runs tap.py (default: this interpreter)
  GATEHOUSE_NODE        Node 22 (only used when GATEHOUSE_EVERYTHING is unset)
  GATEHOUSE_EVERYTHING  command line running server-everything (stdio|streamableHttp appended)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e_support import (
    EV_HTTP,
    EV_STDIO,
    EXAMPLE,
    Gateway,
    HttpEverything,
    Proc,
    Tools,
    example_argv,
    find_tools,
    free_port,
    start_everything_http,
    start_gateway,
    tapped,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Last line of defence: fixtures stop their processes, but not when pytest is interrupted.
    for p in list(Proc.registry):
        p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for p in Proc.registry:
            report.sections.append((f"log of {p.label} (last lines)", p.tail()))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tools() -> Tools:
    found = find_tools()
    if isinstance(found, str):
        pytest.fail(found, pytrace=False)
    return found


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def everything_http(tools: Tools, workdir: Path) -> Iterator[HttpEverything]:
    """server-everything over Streamable HTTP (GATEHOUSE_E2E_ROLE=http), shared by the gateways."""
    ev = start_everything_http(tools, workdir, free_port(), role="http")
    try:
        yield ev
    finally:
        ev.proc.stop()


@pytest.fixture(scope="session")
def gateway(tools: Tools, workdir: Path, everything_http: HttpEverything) -> Iterator[Gateway]:
    """The main gateway: server-everything over stdio (tapped, GATEHOUSE_E2E_ROLE=stdio) and over
    Streamable HTTP, and the example server with its test tools (tapped)."""
    tapdir = workdir / "tap"
    ev_stdio = tapped(tools, tapdir, EV_STDIO, [*tools.everything, "stdio"])
    ev_stdio["env"] = {"GATEHOUSE_E2E_ROLE": "stdio"}
    example = tapped(tools, tapdir, EXAMPLE, example_argv(tools, "--test-tools"))
    gw = start_gateway(
        tools,
        workdir,
        "main",
        [
            {"name": EV_STDIO, "stdio": ev_stdio, "call_timeout": "30s"},
            {"name": EV_HTTP, "http": {"url": everything_http.url}, "call_timeout": "30s"},
            {"name": EXAMPLE, "stdio": example, "call_timeout": "30s"},
        ],
        # One server reached two ways: a resource URI both claim is read from the first.
        mcp={"resource_conflicts": "first"},
        tapdir=tapdir,
    )
    try:
        yield gw
    finally:
        gw.proc.stop()
