// The operator console (/ui/) driven in headless Chromium (Debian's, through playwright-core),
// for test_console.py: sign in, install a catalog entry from its form, watch it become ready,
// call its tool through /mcp (the official TypeScript client), read its logs live, see the
// session, the policy denial and the plugin chain, uninstall, sign out. A screenshot of each
// page goes to the artifacts folder. Prints one JSON line with what it saw; any failed
// expectation throws (exit status 1).
//
//   node console.mjs <playwright-core dir> <client module> <gateway URL> <admin token>
//        <client token> <artifacts dir> <viewer token (scopes: servers:read, registry:read)>
import { mkdirSync } from 'node:fs';

const [playwrightDir, clientModule, base, adminToken, clientToken, artifacts, viewerToken] = process.argv.slice(2);
const { chromium } = (await import(`${playwrightDir}/index.js`)).default;
const { Client, StreamableHTTPClientTransport } = await import(clientModule);
mkdirSync(artifacts, { recursive: true });

const ENTRY = 'io.github.modelcontextprotocol/server-everything';
const WEATHER = 'io.github.gatehouse-test/weather';
const SECRET = 'weather-secret-value-8c1f';
const HOSTILE = 'io.github.gatehouse-test/hostile';
const FARAWAY = 'io.github.gatehouse-test/faraway';
const seen = { steps: [] };
const step = name => { seen.steps.push(name); console.error(`[console.mjs] ${name}`); };
const expect = (ok, what) => { if (!ok) throw new Error(`expected ${what}`); };

const browser = await chromium.launch({
    executablePath: process.env.GATEHOUSE_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync'],
});
const clients = [];
try {
    const page = await browser.newPage({ viewport: { width: 1366, height: 860 } });
    // Script errors, and anything the page's content policy blocked, fail the test; refused
    // requests the test makes on purpose (a wrong token) are not errors of the page.
    const errors = [];
    // Whatever the page's policy blocks is recorded where the test can read it.
    await page.addInitScript(() => {
        window.__violations = [];
        document.addEventListener('securitypolicyviolation', e => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
    });
    page.on('pageerror', e => errors.push(String(e)));
    page.on('console', m => { if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text()); });
    const shot = name => page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });
    const status = () => page.locator('#status').textContent();

    step('sign in');
    await page.goto(`${base}/ui/`);
    await page.locator('#token').fill('not-the-admin-token-0123456789');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.querySelector('#status').textContent.includes('refused'));
    expect(await page.locator('#sign-in').isVisible(), 'a refused token to leave the sign-in form up');
    await shot('sign-in');
    // By keyboard alone: a refusal puts the keyboard back in the token field; Enter sends it.
    expect(await page.evaluate(() => document.activeElement.id) === 'token', 'the token field focused after a refusal');
    await page.keyboard.press('Control+A');
    await page.keyboard.type(adminToken);
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Catalog' }).waitFor();
    expect(await page.evaluate(() => !JSON.stringify(sessionStorage).includes('not-the-admin')), 'the refused token not kept');

    step('catalog');
    await page.getByLabel('Search the catalog').fill('everything');
    await page.getByRole('button', { name: `Install ${ENTRY}` }).waitFor();
    await page.waitForFunction(() => !document.querySelector('#catalog-list').textContent.includes('server-time'));
    seen.catalogRows = await page.locator('#catalog-list tbody tr').count();
    expect(seen.catalogRows === 1, `one entry for "everything", not ${seen.catalogRows}`);
    await shot('catalog');

    step('a hostile entry');
    // A publisher's markup is shown as text, runs nothing, and the policy had nothing to block.
    await page.getByLabel('Search the catalog').fill('hostile');
    await page.getByRole('button', { name: `Install ${HOSTILE}` }).click();
    await page.locator('#install-variables').waitFor();
    const row = await page.locator('#catalog-list tbody tr').first().textContent();
    expect(row.includes('<img src=x onerror=') && row.includes('<script>'), `the markup as text in ${row}`);
    expect((await page.locator('#install-variables').textContent()).includes('<iframe'), 'a variable\'s markup as text');
    seen.pwned = await page.evaluate(() => window.__pwned ?? null);
    seen.violations = await page.evaluate(() => window.__violations);
    expect(seen.pwned === null, `nothing run, but ${seen.pwned}`);
    expect(await page.locator('#catalog-list img, #install img, #install iframe, #catalog-list script').count() === 0, 'no element made from the markup');
    await shot('hostile');
    // Should a future page take a link from data, it can lead nowhere but within the console.
    const links = await page.evaluate(() => ['javascript:alert(1)', ' javascript:x', '//evil.example/', '/\\evil.example', 'https://evil.example/', '#servers', '/ui/#catalog']
      .map(href => { try { return h('a', { HREF: href }).getAttribute('href'); } catch { return 'refused'; } }));
    expect(JSON.stringify(links) === JSON.stringify(['refused', 'refused', 'refused', 'refused', 'refused', '#servers', '/ui/#catalog']), `links from data: ${links}`);
    await page.getByRole('button', { name: 'Cancel' }).click();

    step('a form from environment variables');
    // An entry with a required secret and a choice: the form asks for each the way it must.
    await page.getByLabel('Search the catalog').fill('weather');
    await page.getByRole('button', { name: `Install ${WEATHER}` }).click();
    const key = page.getByLabel(/^WEATHER_API_KEY/);
    expect(await key.getAttribute('type') === 'password', 'a secret typed into a password field');
    expect(await key.evaluate(e => e.required), 'a required variable required');
    expect(await page.getByLabel(/^UNITS/).evaluate(e => e.tagName === 'SELECT' && e.value === 'metric'), 'choices as a list, the default chosen');
    expect((await page.locator('#install-variables').textContent()).includes('Your weather service key'), 'the description shown');
    // The browser refuses to send a form missing a required value: nothing is installed.
    await page.getByRole('button', { name: 'Install', exact: true }).click();
    expect(await key.evaluate(e => !e.validity.valid), 'the empty secret refused in the page');
    // The gateway's refusal is shown in the form, without the secret.
    await key.fill(SECRET);
    await page.getByLabel('Server name').fill('example');
    await page.getByRole('button', { name: 'Install', exact: true }).click();
    const refusal = page.locator('#install-error');
    await refusal.filter({ hasText: 'config file' }).waitFor();
    seen.refusal = await refusal.textContent();
    const said = seen.refusal + await status() + await page.evaluate(() => JSON.stringify(sessionStorage) + JSON.stringify(localStorage));
    expect(!said.includes(SECRET), 'the secret in no message and not kept by the page');
    await shot('install-refused');
    await page.getByRole('button', { name: 'Cancel' }).click();

    step('a form from a remote');
    // An entry that runs elsewhere asks for its URL's variable and its header's secret.
    await page.getByLabel('Search the catalog').fill('faraway');
    await page.getByRole('button', { name: `Install ${FARAWAY}` }).click();
    const token = page.getByLabel(/^token/);
    expect(await token.getAttribute('type') === 'password', 'a header\'s secret typed into a password field');
    const tenant = page.getByLabel(/^tenant/);
    expect(await tenant.evaluate(e => e.required), 'the URL\'s variable required');
    // A value that would move the URL elsewhere is the gateway's refusal, shown in the form.
    await tenant.fill('evil.example/x');
    await token.fill(SECRET);
    await page.getByRole('button', { name: 'Install', exact: true }).click();
    await page.locator('#install-error').filter({ hasText: 'values.tenant' }).waitFor();
    expect(!(await page.locator('#install-error').textContent()).includes(SECRET), 'the secret in no message');
    await page.getByRole('button', { name: 'Cancel' }).click();

    await page.getByLabel('Search the catalog').fill('everything');
    await page.getByRole('button', { name: `Install ${ENTRY}` }).waitFor();

    step('install form');
    await page.getByRole('button', { name: `Install ${ENTRY}` }).click();
    await page.getByRole('heading', { name: /^Install / }).waitFor();
    // Every field of the page has a label a screen reader reads.
    seen.unlabelled = await page.evaluate(() => [...document.querySelectorAll('input, select')]
        .filter(e => !e.hidden && e.type !== 'hidden' && e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id || e.name));
    expect(seen.unlabelled.length === 0, `every field labelled, not ${seen.unlabelled}`);
    await page.getByLabel('Server name').fill('everything');
    await shot('install');
    await page.getByRole('button', { name: 'Install', exact: true }).click();
    await page.waitForURL(/#servers$/);

    step('ready');
    const phase = page.locator('td[data-server="everything"]');
    await phase.filter({ hasText: /^ready/ }).waitFor({ timeout: 180_000 });
    await shot('servers');

    step('a viewer sees only what its token grants');
    {
        // Its token reads servers and the catalog only (in a tab of its own): the console
        // offers only those pages, and on them nothing the token may not do.
        const context = await browser.newContext({ viewport: { width: 1366, height: 860 } });
        const viewer = await context.newPage();
        viewer.on('pageerror', e => errors.push(String(e)));
        await viewer.goto(`${base}/ui/`);
        await viewer.locator('#token').fill(viewerToken);
        await viewer.keyboard.press('Enter');
        await viewer.locator('#catalog-list table').waitFor();
        seen.viewerLinks = await viewer.evaluate(() => [...document.querySelectorAll('nav li')].filter(li => !li.hidden).map(li => li.textContent.trim()));
        expect(JSON.stringify(seen.viewerLinks) === JSON.stringify(['Catalog', 'Servers']), `the viewer's pages, not ${seen.viewerLinks}`);
        seen.viewerInstall = await viewer.getByRole('button', { name: /^Install / }).count();
        expect(seen.viewerInstall === 0, `no install offered without servers:write, not ${seen.viewerInstall}`);
        await viewer.evaluate(() => { location.hash = '#sessions'; });
        await viewer.locator('#not-granted').waitFor();
        seen.viewerRefused = await viewer.locator('#not-granted').textContent();
        await viewer.getByRole('link', { name: 'Servers' }).click();
        await viewer.locator('td[data-server="everything"]').waitFor();
        seen.viewerActions = await viewer.locator('#server-list button').count();
        expect(seen.viewerActions === 0, `no logs, restart or remove offered, not ${seen.viewerActions}`);
        await viewer.screenshot({ path: `${artifacts}/viewer-servers.png`, fullPage: true });
        // What the page does not offer, the gateway refuses all the same.
        const direct = await fetch(`${base}/admin/v1/servers/everything/logs`, { headers: { authorization: `Bearer ${viewerToken}` } });
        seen.viewerDirect = direct.status;
        expect(direct.status === 403, `the viewer's own request for logs refused (403), not ${direct.status}`);
        await context.close();
    }

    step('a call through /mcp');
    const connect = async () => {
        const client = new Client({ name: 'gatehouse-console-e2e', version: '1' }, { capabilities: {} });
        await client.connect(new StreamableHTTPClientTransport(new URL(`${base}/mcp`), {
            requestInit: { headers: { authorization: `Bearer ${clientToken}` } },
        }));
        clients.push(client);
        return client;
    };
    // A session sees the servers of when it opened; npx may still be fetching the package.
    let client = null;
    for (let i = 0; i < 180 && !client; i++) {
        const c = await connect();
        const names = (await c.listTools()).tools.map(t => t.name);
        if (names.includes('everything__echo')) client = c;
        else { await c.close(); await new Promise(r => setTimeout(r, 1000)); }
    }
    expect(client, 'the installed server\'s tools through /mcp');
    const echo = await client.callTool({ name: 'everything__echo', arguments: { message: 'from the console' } });
    seen.echo = echo.content.map(c => c.text).join('');
    expect(seen.echo === 'Echo: from the console', `the echo, not ${seen.echo}`);
    const denied = await client.callTool({ name: 'example__echo', arguments: { text: 'rm -rf /' } }).then(
        r => JSON.stringify(r), e => String(e));
    seen.denied = denied;
    expect(denied.includes('no shell commands'), `the policy's denial, not ${denied}`);

    step('logs');
    await page.getByRole('button', { name: 'Logs of everything' }).click();
    const logs = page.locator('#log-text');
    await page.waitForFunction(() => {
        const t = document.querySelector('#log-text');
        return t && t.textContent.trim() !== '' && t.textContent !== '(no output yet)';
    }, null, { timeout: 30_000 });
    seen.logs = (await logs.textContent()).slice(0, 400);
    expect(await page.getByLabel('Follow (live tail)').isChecked(), 'live tail on by default');
    await shot('logs');

    step('sessions');
    await page.getByRole('link', { name: 'Sessions' }).click();
    await page.locator('#session-list td', { hasText: 'alice' }).first().waitFor();
    seen.sessions = await page.locator('#session-list tbody tr').count();
    expect(seen.sessions >= 1, 'the session listed');
    await shot('sessions');

    step('activity');
    await page.getByRole('link', { name: 'Activity' }).click();
    await page.locator('#activity-list td', { hasText: '/admin/v1/registry/install' }).first().waitFor();
    await page.getByLabel('Only policy denials').check();
    const denial = page.locator('#activity-list tbody tr', { hasText: 'no shell commands' }).first();
    await denial.waitFor();
    seen.denialRow = await denial.textContent();
    expect(seen.denialRow.includes('alice') && seen.denialRow.includes('policy'), `the denial's principal and plugin in ${seen.denialRow}`);
    expect(await page.locator('#activity-list tbody tr', { hasText: 'allowed' }).count() === 0, 'only denials once filtered');
    await shot('activity');

    step('plugins');
    await page.getByRole('link', { name: 'Plugins' }).click();
    // The activity page's rows name the plugin too: read the plugins page once it is shown.
    await page.getByRole('heading', { name: 'Modules' }).waitFor();
    const module = page.locator('tr', { hasText: 'tool_policy' });
    await module.first().waitFor();
    seen.plugin = await module.first().textContent();
    expect(seen.plugin.includes('on-request'), `the plugin's hooks in ${seen.plugin}`);
    seen.chain = await page.locator('tr', { hasText: 'guard' }).first().textContent();
    expect(seen.chain.includes('tools/call') && seen.chain.includes('tool_policy'), `the chain's methods and plugins in ${seen.chain}`);
    await shot('plugins');

    step('uninstall');
    await page.getByRole('link', { name: 'Servers' }).click();
    page.once('dialog', d => d.accept());
    await page.getByRole('button', { name: 'Remove everything' }).click();
    await phase.waitFor({ state: 'detached', timeout: 30_000 });
    const after = await fetch(`${base}/admin/v1/servers/everything`, { headers: { authorization: `Bearer ${adminToken}` } });
    seen.afterRemove = after.status;
    expect(after.status === 404, `the server gone (404), not ${after.status}`);
    await shot('servers-after-uninstall');

    step('sign out');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.locator('#sign-in').waitFor();
    seen.tokenKept = await page.evaluate(() => sessionStorage.length);
    expect(seen.tokenKept === 0, 'no token kept after signing out');
    seen.status = await status();

    seen.errors = errors;
    expect(errors.length === 0, `no script or policy error on the page: ${errors}`);
    seen.violations = await page.evaluate(() => window.__violations);
    expect(seen.violations.length === 0, `nothing blocked by the page's policy: ${seen.violations}`);
} finally {
    for (const c of clients) await c.close().catch(() => {});
    await browser.close();
}
console.log(JSON.stringify(seen));
