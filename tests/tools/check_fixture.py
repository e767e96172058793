#!/usr/bin/env python3
"""Exercise every feature of tests/fixtures/conformance_server.py through the
official MCP Python SDK client, and print one line per check.

    check_fixture.py                      spawn the fixture over stdio
    check_fixture.py --url URL            talk Streamable HTTP to URL (the fixture's
                                          --http mode, or a gateway in front of it)
    check_fixture.py --stdio CMD ARG...   spawn any stdio command (e.g. the gateway)
    --mode legacy|auto                    SDK connect mode (default legacy: initialize
                                          handshake; auto, the SDK's own default, first probes
                                          server/discover and, if that succeeds, speaks the
                                          2026-07-28 era, where the handshake-era checks
                                          (logging, progress, sampling, elicitation,
                                          subscribe, ping) are skipped)
    --prefix P                            expect every tool/prompt name as P+name (a gateway
                                          that namespaces upstreams)

Ends with 'N passed, N failed' and exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio

warnings.filterwarnings("ignore", message=r".*2026-07-28.*")

import mcp_types as types  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "conformance_server.py"


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: Any = "") -> None:
        if ok:
            self.passed += 1
            print(f"PASS {name}")
        else:
            self.failed += 1
            print(f"FAIL {name}: {detail}")


async def run(target: Any, mode: str, prefix: str) -> Checks:
    c = Checks()
    logs: list[types.LoggingMessageNotificationParams] = []
    sampled: list[types.CreateMessageRequestParams] = []
    elicited: list[Any] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async def on_sample(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        sampled.append(params)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled reply"),
            model="test-model",
            stop_reason="endTurn",
        )

    async def on_elicit(ctx: Any, params: Any) -> types.ElicitResult:
        elicited.append(params)
        return types.ElicitResult(action="accept", content={"username": "u", "email": "e@example.com"})

    async with Client(
        target,
        mode=mode,
        logging_callback=on_log,
        sampling_callback=on_sample,
        elicitation_callback=on_elicit,
        read_timeout_seconds=30,
    ) as client:
        p = prefix
        legacy = client.session.initialize_result is not None
        print(f"INFO connected: {'initialize handshake' if legacy else 'server/discover (2026-07-28 era)'}")
        tools = {t.name: t for t in (await client.list_tools()).tools}
        expected = [
            "test_simple_text", "test_image_content", "test_audio_content", "test_embedded_resource",
            "test_multiple_content_types", "test_tool_with_logging", "test_error_handling",
            "test_tool_with_progress", "test_sampling", "test_elicitation", "test_elicitation_sep1034_defaults",
            "test_elicitation_sep1330_enums", "json_schema_2020_12_tool", "test_reconnection", "echo", "add",
        ]
        missing = [n for n in expected if p + n not in tools]
        c.check("tools/list has every fixture tool", not missing, missing)
        schema = tools.get(p + "json_schema_2020_12_tool")
        c.check(
            "json_schema_2020_12_tool keeps $schema/$defs/additionalProperties",
            schema is not None
            and schema.input_schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema"
            and "address" in schema.input_schema.get("$defs", {})
            and schema.input_schema.get("additionalProperties") is False,
            schema and schema.input_schema,
        )

        r = await client.call_tool(p + "test_simple_text", {})
        c.check("test_simple_text", r.content[0].text == "This is a simple text response for testing.", r)
        r = await client.call_tool(p + "test_image_content", {})
        c.check("test_image_content", r.content[0].type == "image" and r.content[0].mime_type == "image/png", r)
        r = await client.call_tool(p + "test_audio_content", {})
        c.check("test_audio_content", r.content[0].type == "audio" and r.content[0].mime_type == "audio/wav", r)
        r = await client.call_tool(p + "test_embedded_resource", {})
        c.check("test_embedded_resource", r.content[0].type == "resource", r)
        r = await client.call_tool(p + "test_multiple_content_types", {})
        c.check("test_multiple_content_types", [x.type for x in r.content] == ["text", "image", "resource"], r)
        r = await client.call_tool(p + "test_error_handling", {})
        c.check("test_error_handling isError", r.is_error is True and bool(r.content[0].text), r)

        # Logging, progress, sampling and elicitation are handshake-era (<= 2025-11-25)
        # features; a 2026-07-28 session (mode auto against a modern server) lacks them.
        if legacy:
            await client.set_logging_level("debug")
            await client.call_tool(p + "test_tool_with_logging", {})
            await anyio.sleep(0.2)
            texts = [str(x.data) for x in logs]
            c.check("test_tool_with_logging sends 3 logs", len(texts) >= 3 and "Tool execution completed" in texts, texts)
            logs.clear()
            await client.set_logging_level("error")
            await client.call_tool(p + "test_tool_with_logging", {})
            await anyio.sleep(0.2)
            c.check("logging/setLevel error filters info logs", not logs, [x.data for x in logs])
            await client.set_logging_level("debug")

            progress: list[tuple[float, float | None]] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append((value, total))

            await client.call_tool(p + "test_tool_with_progress", {}, progress_callback=on_progress)
            c.check("test_tool_with_progress 0/50/100", [v for v, _ in progress] == [0, 50, 100], progress)

            r = await client.call_tool(p + "test_sampling", {"prompt": "hello sampler"})
            c.check(
                "test_sampling round trip",
                len(sampled) == 1 and "sampled reply" in r.content[0].text
                and sampled[0].messages[0].content.text == "hello sampler" and sampled[0].max_tokens == 100,
                (r, sampled),
            )
            r = await client.call_tool(p + "test_elicitation", {"message": "who are you?"})
            c.check("test_elicitation round trip", len(elicited) == 1 and "accept" in r.content[0].text, r)
            await client.call_tool(p + "test_elicitation_sep1034_defaults", {})
            props = elicited[-1].requested_schema["properties"]
            c.check(
                "sep1034 defaults",
                props["name"]["default"] == "John Doe" and props["age"]["default"] == 30
                and props["score"]["default"] == 95.5 and props["status"]["default"] == "active"
                and props["verified"]["default"] is True,
                props,
            )
            await client.call_tool(p + "test_elicitation_sep1330_enums", {})
            props = elicited[-1].requested_schema["properties"]
            c.check(
                "sep1330 enums",
                set(props) == {"untitledSingle", "titledSingle", "legacyEnum", "untitledMulti", "titledMulti"}
                and props["legacyEnum"]["enumNames"] == ["Option One", "Option Two", "Option Three"]
                and "anyOf" in props["titledMulti"]["items"],
                props,
            )
            r = await client.call_tool(p + "test_reconnection", {})
            c.check("test_reconnection answers", "completed" in r.content[0].text, r)
        r = await client.call_tool(p + "echo", {"text": "héllo ✓"})
        c.check("echo", r.content[0].text == "héllo ✓", r)
        r = await client.call_tool(p + "add", {"a": 2, "b": 3.5})
        c.check("add structured content", r.structured_content == {"sum": 5.5} and r.content[0].text == "5.5", r)

        resources = {str(x.uri) for x in (await client.list_resources()).resources}
        c.check(
            "resources/list",
            {"test://static-text", "test://static-binary", "test://watched-resource"} <= resources,
            resources,
        )
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        c.check("resources/templates/list", "test://template/{id}/data" in templates, templates)
        r = await client.read_resource("test://static-text")
        c.check("read test://static-text", r.contents[0].text.startswith("This is the content"), r)
        r = await client.read_resource("test://static-binary")
        c.check("read test://static-binary", bool(r.contents[0].blob) and r.contents[0].mime_type == "image/png", r)
        r = await client.read_resource("test://template/123/data")
        c.check("read template test://template/123/data", '"id":"123"' in r.contents[0].text, r)
        try:
            await client.read_resource("test://nope")
            c.check("read unknown resource errors", False, "no error")
        except Exception as e:  # noqa: BLE001
            c.check("read unknown resource errors", "not found" in str(e).lower(), e)
        if legacy:  # resources/subscribe is replaced by subscriptions/listen on 2026-07-28
            await client.subscribe_resource("test://watched-resource")
            await client.unsubscribe_resource("test://watched-resource")
            c.check("resources subscribe/unsubscribe", True)

        prompts = {x.name for x in (await client.list_prompts()).prompts}
        want = {"test_simple_prompt", "test_prompt_with_arguments", "test_prompt_with_embedded_resource",
                "test_prompt_with_image"}
        c.check("prompts/list", {p + n for n in want} <= prompts, prompts)
        r = await client.get_prompt(p + "test_simple_prompt")
        c.check("prompt simple", r.messages[0].content.text == "This is a simple prompt for testing.", r)
        r = await client.get_prompt(p + "test_prompt_with_arguments", {"arg1": "hello", "arg2": "world"})
        c.check("prompt with args", r.messages[0].content.text == "Prompt with arguments: arg1='hello', arg2='world'", r)
        r = await client.get_prompt(p + "test_prompt_with_embedded_resource", {"resourceUri": "test://x"})
        c.check("prompt embedded resource", r.messages[0].content.type == "resource", r)
        r = await client.get_prompt(p + "test_prompt_with_image")
        c.check("prompt image", r.messages[0].content.type == "image", r)

        r = await client.complete(
            types.PromptReference(type="ref/prompt", name=p + "test_prompt_with_arguments"),
            {"name": "arg1", "value": "par"},
        )
        c.check("completion/complete", r.completion.values == ["paris", "park", "party"], r)
        if legacy:
            await client.send_ping()
            c.check("ping", True)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--stdio", nargs=argparse.REMAINDER)
    ap.add_argument("--mode", default="legacy")
    ap.add_argument("--prefix", default="")
    opts = ap.parse_args()
    if opts.url:
        target: Any = opts.url
    elif opts.stdio:
        target = StdioServerParameters(command=opts.stdio[0], args=opts.stdio[1:])
    else:
        target = StdioServerParameters(command=sys.executable, args=[str(FIXTURE)])
    c = anyio.run(run, target, opts.mode, opts.prefix)
    print(f"check_fixture: {c.passed} passed, {c.failed} failed")
    sys.exit(1 if c.failed else 0)


if __name__ == "__main__":
    main()
