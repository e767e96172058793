// The official TypeScript client v2 (@modelcontextprotocol/client) against a gateway, in one
// version-negotiation mode: prints one JSON line with what it saw, for test_ts_client.py.
//
//   node ts_client.mjs <client module path> <MCP URL> legacy|auto|pin <example> <everything>
const [modulePath, url, modeArg, example, everything] = process.argv.slice(2);
const { Client, StreamableHTTPClientTransport } = await import(modulePath);
const mode = modeArg === 'pin' ? { pin: '2026-07-28' } : modeArg;
const client = new Client(
    { name: 'gatehouse-ts-e2e', version: '1' },
    { capabilities: { elicitation: {} }, versionNegotiation: { mode } }
);
const asked = [];
client.setRequestHandler('elicitation/create', async request => {
    asked.push(request.params.message);
    return { action: 'accept', content: { name: 'Ada Lovelace', check: true } };
});
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const text = result => (result.content ?? []).map(c => c.text ?? '').join('\n');
const out = {
    version: client.getNegotiatedProtocolVersion(),
    server: client.getServerVersion()?.name ?? null,
    tools: (await client.listTools()).tools.map(t => t.name),
    echo: text(await client.callTool({ name: `${example}__echo`, arguments: { text: `hello ${modeArg}` } })),
    prompt: (await client.getPrompt({ name: `${example}__greeting`, arguments: { name: 'Ada' } })).messages.map(m => m.content.text),
    resource: (await client.readResource({ uri: 'demo://resource/dynamic/text/7' })).contents[0].text,
    elicited: text(await client.callTool({ name: `${everything}__trigger-elicitation-request`, arguments: {} })),
};
out.asked = asked;
console.log(JSON.stringify(out));
await client.close();
