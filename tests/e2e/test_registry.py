"""The private registry read by an official-registry client: every answer of the gateway's
`/v0.1` API validated against a JSON Schema of the official API's shapes (written by us from
the registry's published API reference, tests/fixtures/registry-api.schema.json), with the
pages an incremental sync walks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import jsonschema
import pytest

from e2e_support import EXAMPLE, Gateway, Tools, example_argv, start_gateway, text_of, wait_until

SCHEMA = json.loads((Path(__file__).parent.parent / "fixtures" / "registry-api.schema.json").read_text())
ADMIN = "registry-e2e-admin-token-0123456789"


def validator(definition: str) -> jsonschema.Draft202012Validator:
    schema = {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


LIST = validator("ServerListResponse")
ONE = validator("ServerResponse")
ERROR = validator("Error")


@pytest.fixture(scope="module")
def registry_gateway(tools: Tools, workdir: Path) -> Iterator[Gateway]:
    gw = start_gateway(
        tools,
        workdir,
        "registry",
        [{"name": EXAMPLE, "stdio": {"command": example_argv(tools)[0], "args": example_argv(tools)[1:]}}],
        extra={
            "admin": {"tokens": [{"principal": "ops", "token": ADMIN}]},
            # How the test machine's packages are fetched: uvx from the test venv, the system
            # CA store (a TLS-inspecting proxy's CA may be there), the system Python.
            "registry": {
                "runner_env": {
                    # Not /usr/local/bin: uvx is found only through this variable.
                    "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                    "UV_SYSTEM_CERTS": "true",
                    "UV_PYTHON_DOWNLOADS": "never",
                }
            },
        },
    )
    try:
        yield gw
    finally:
        gw.proc.stop()


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.port}"


def test_every_answer_has_the_official_shapes(registry_gateway: Gateway) -> None:
    url = base(registry_gateway)
    with httpx.Client(timeout=10) as c:
        # An import of the reference servers' published documents (one new version).
        time_doc: dict[str, Any] = {
            "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
            "name": "io.github.modelcontextprotocol/server-time",
            "description": "MCP server providing tools for time queries and timezone conversions for LLMs",
            "version": "2026.11.2",
            "packages": [{"registryType": "pypi", "identifier": "mcp-server-time", "version": "2026.11.2",
                          "runtimeHint": "uvx", "transport": {"type": "stdio"}}],
        }
        r = c.post(f"{url}/admin/v1/registry/servers", json=[time_doc],
                   headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text

        # A full walk in pages of two, as a syncing client does.
        names: list[tuple[str, str]] = []
        cursor = None
        for _ in range(50):
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = c.get(f"{url}/v0.1/servers", params=params)
            assert page.status_code == 200, page.text
            LIST.validate(page.json())
            names += [(s["server"]["name"], s["server"]["version"]) for s in page.json()["servers"]]
            cursor = page.json()["metadata"].get("nextCursor")
            if not cursor:
                break
        assert len(names) == len(set(names)) == 5, names
        assert ("io.github.modelcontextprotocol/server-time", "2026.11.2") in names

        latest = c.get(f"{url}/v0.1/servers", params={"version": "latest"}).json()
        LIST.validate(latest)
        assert len(latest["servers"]) == 4
        assert all(s["_meta"]["io.modelcontextprotocol.registry/official"]["isLatest"] for s in latest["servers"])

        name = quote("io.github.modelcontextprotocol/server-time", safe="")
        one = c.get(f"{url}/v0/servers/{name}/versions/latest")
        ONE.validate(one.json())
        assert one.json()["server"] == time_doc
        versions = c.get(f"{url}/v0.1/servers/{name}/versions").json()
        LIST.validate(versions)
        assert [s["server"]["version"] for s in versions["servers"]] == ["2026.11.2", "2026.10.19"]

        for bad in ["/v0.1/servers?limit=500", "/v0.1/servers/io.example%2Fnone/versions/latest"]:
            r = c.get(f"{url}{bad}")
            assert r.status_code in (400, 404), r.text
            ERROR.validate(r.json())


async def install_call_uninstall(
    gw: Gateway,
    entry: str,
    name: str,
    tool: str,
    args: dict[str, Any],
    check: Callable[[str], bool],
    version: str | None = None,
) -> None:
    """Install `entry` as `name` → ready → `tool` through /mcp (the official Python SDK) answers
    what `check` accepts → uninstall → its tools are gone."""
    url = base(gw)
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(timeout=30) as c:
        ask = {"entry": entry, "name": name, **({"version": version} if version else {})}
        r = c.post(f"{url}/admin/v1/registry/install", headers=admin, json=ask)
        assert r.status_code == 201, r.text
        view = r.json()
        assert view["installed"]["entry"] == entry, view
        again = c.post(f"{url}/admin/v1/registry/install", headers=admin, json=ask)
        assert again.status_code == 409, again.text
        assert f'"{name}" runs already' in again.json()["error"], again.text

        def phase() -> str:
            got = c.get(f"{url}/admin/v1/servers/{name}", headers=admin)
            assert got.status_code == 200, got.text
            status = got.json()["status"]
            assert status["phase"] != "failed", status
            return str(status["phase"])

        wait_until(lambda: phase() == "ready", 120, "the installed server ready")

    # Its tools appear once the gateway has listed them (the runner may still be fetching the
    # package).
    public = f"{name}__{tool}"
    names: set[str] = set()
    with anyio.fail_after(180):
        while public not in names:
            async with gw.client() as session:
                names = {t.name for t in (await session.list_tools()).tools}
                if public in names:
                    r = await session.call_tool(public, args)
                    assert not r.is_error, r
                    assert check(text_of(r)), r
            if public not in names:
                await anyio.sleep(1)

    with httpx.Client(timeout=30) as c:
        gone = c.delete(f"{url}/admin/v1/servers/{name}", headers=admin)
        assert gone.status_code == 204, gone.text
        assert c.get(f"{url}/admin/v1/servers/{name}", headers=admin).status_code == 404

    async def listed() -> set[str]:
        async with gw.client() as session:
            return {t.name for t in (await session.list_tools()).tools}

    with anyio.fail_after(30):
        while any(n.startswith(f"{name}__") for n in await listed()):
            await anyio.sleep(0.5)


@pytest.mark.anyio
async def test_an_installed_npm_entry_runs_behind_the_gateway_until_uninstalled(registry_gateway: Gateway) -> None:
    """The default catalog's server-everything is an npm package: the local backend runs it
    with `npx` (fetched from the npm registry on first use)."""
    await install_call_uninstall(
        registry_gateway,
        "io.github.modelcontextprotocol/server-everything",
        "everything",
        "echo",
        {"message": "installed"},
        lambda text: text == "Echo: installed",
    )


@pytest.mark.anyio
async def test_an_installed_pypi_entry_runs_behind_the_gateway_until_uninstalled(registry_gateway: Gateway) -> None:
    """The default catalog's server-time is a PyPI package: the local backend runs it with
    `uvx` (found through the operator's `registry.runner_env`, fetched from PyPI on first use)."""
    await install_call_uninstall(
        registry_gateway,
        "io.github.modelcontextprotocol/server-time",
        "time",
        "get_current_time",
        {"timezone": "UTC"},
        lambda text: '"timezone": "UTC"' in text.replace('":"', '": "'),
        # The catalog's own version: another test imports a newer document of this entry.
        version="2026.10.19",
    )
