// The Gatehouse console: a client of the admin API. Everything the gateway says reaches the
// page as text (textContent), never as markup, so no entry, log line or principal can run
// script here.
"use strict";

const TOKEN_KEY = "gatehouse.admin-token";
const SCOPES_KEY = "gatehouse.admin-scopes";
const OFFICIAL = "io.modelcontextprotocol.registry/official";
const PAGES = { catalog: catalogPage, servers: serversPage, sessions: sessionsPage, activity: activityPage, plugins: pluginsPage };
/** The admin scope each page reads with. */
const PAGE_SCOPES = { catalog: "registry:read", servers: "servers:read", sessions: "sessions:read", activity: "audit:read", plugins: "plugins:read" };

/** Whether the signed-in token grants `scope` (an area's name grants all of it). The
 * gateway decides; this only keeps the page from offering what it would refuse. */
function grants(scope) {
  let scopes = [];
  try { scopes = JSON.parse(sessionStorage.getItem(SCOPES_KEY) || "[]"); } catch { scopes = []; }
  return Array.isArray(scopes) && (scopes.includes(scope) || scopes.includes(scope.split(":")[0]));
}

/** Asks the gateway who the token is, keeping its scopes for this tab. */
async function learnScopes() {
  const me = await api("GET", "/admin/v1/whoami");
  sessionStorage.setItem(SCOPES_KEY, JSON.stringify(Array.isArray(me && me.scopes) ? me.scopes : []));
}

/** Attributes a browser follows or loads as a URL. */
const URL_ATTRIBUTES = new Set(["href", "src", "action", "formaction", "xlink:href", "srcset", "poster", "data", "ping", "background"]);

/** An element with attributes (`on…` are listeners, `text` its text) and children (strings become text). */
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    // Handlers are functions, never attribute text.
    if (k.toLowerCase().startsWith("on")) {
      if (typeof v !== "function") throw new Error(`${k} must be a function`);
      e.addEventListener(k.slice(2).toLowerCase(), v);
    }
    else if (k === "text") e.textContent = v;
    // A link leads only within the console (a fragment or a path of this origin): whatever
    // data reaches an attribute can never make it `javascript:` or another site.
    else if (URL_ATTRIBUTES.has(k.toLowerCase()) && !/^(#[\w-]*|\/(?![\/\\])[^\s]*)$/.test(String(v))) {
      throw new Error(`${k} must be a fragment or a path of this console, not ${JSON.stringify(String(v).slice(0, 64))}`);
    }
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/** A table with a caption (for screen readers), column headings and rows of cells. */
function table(caption, headings, rows, empty) {
  if (rows.length === 0) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headings.map(t => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map(cells => h("tr", {}, cells.map(c => c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c))))));
}

function say(text, error) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Calls the admin API with the signed-in token; a refused token signs out. */
async function api(method, path, body) {
  const headers = { authorization: "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "") };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) });
  const type = r.headers.get("content-type") || "";
  const data = type.includes("json") ? await r.json().catch(() => null) : await r.text();
  if (r.status === 401) {
    signOut("The admin token was refused: sign in again.");
    throw new ApiError(401, "the admin token was refused");
  }
  if (!r.ok) {
    const message = (data && data.error) || (typeof data === "string" && data.trim()) || r.statusText;
    throw new ApiError(r.status, `${message} (HTTP ${r.status})`);
  }
  return data;
}

const seg = s => encodeURIComponent(s);

// ---------------------------------------------------------------- signing in and routing

let refresh = null; // the current page's periodic reload
let generation = 0; // bumped on every navigation: late answers of an old page are dropped

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(SCOPES_KEY);
  stop();
  document.getElementById("nav").hidden = true;
  document.getElementById("page").hidden = true;
  document.getElementById("page").replaceChildren();
  document.getElementById("sign-in").hidden = false;
  document.getElementById("token").focus();
  say(message || "Signed out.", Boolean(message));
}

function stop() {
  if (refresh) clearInterval(refresh);
  refresh = null;
  generation++;
}

/** Runs `load` now and every `ms` while the page is shown (never two at once: a slow
 * answer is waited for, not piled on); failures are said, not thrown. */
function every(ms, load) {
  const mine = generation;
  let running = false;
  const run = async () => {
    if (running) return;
    running = true;
    try { await load(() => mine === generation); } catch (e) { if (mine === generation && e.status !== 401) say(e.message, true); }
    finally { running = false; }
  };
  refresh = setInterval(run, ms);
  return run();
}

async function show() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return signOut("");
  stop();
  if (sessionStorage.getItem(SCOPES_KEY) === null) {
    try { await learnScopes(); } catch (e) { if (e.status !== 401) say(e.message, true); return; }
  }
  const allowed = Object.keys(PAGES).filter(p => grants(PAGE_SCOPES[p]));
  const asked = location.hash.slice(1);
  const name = Object.hasOwn(PAGES, asked) && allowed.includes(asked) ? asked : allowed[0];
  document.getElementById("sign-in").hidden = true;
  document.getElementById("nav").hidden = false;
  for (const a of document.querySelectorAll("nav a")) {
    const target = a.getAttribute("href").slice(1);
    a.parentElement.hidden = !allowed.includes(target);
    if (target === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = document.getElementById("page");
  page.hidden = false;
  page.replaceChildren();
  if (!name) {
    document.title = "Gatehouse console";
    page.append(h("p", {}, "This token grants none of the console's pages."));
    return;
  }
  if (Object.hasOwn(PAGES, asked) && asked !== name) {
    page.append(h("p", { id: "not-granted", class: "muted" }, `This token does not grant ${PAGE_SCOPES[asked]}: ${asked} is not shown.`));
  }
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · Gatehouse console`;
  try {
    await PAGES[name](page, generation);
  } catch (e) {
    if (e.status !== 401) say(e.message, true);
  }
}

document.getElementById("sign-in-form").addEventListener("submit", async e => {
  e.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  try {
    // Any admin token may ask who it is, whatever its scopes.
    await learnScopes();
  } catch (err) {
    if (err.status !== 401) { sessionStorage.removeItem(TOKEN_KEY); say(err.message, true); }
    return;
  }
  input.value = "";
  say("Signed in.");
  if (!location.hash) location.hash = "#catalog"; else show();
  document.getElementById("main").focus();
});
document.getElementById("sign-out").addEventListener("click", () => signOut(""));
window.addEventListener("hashchange", () => { show(); document.getElementById("main").focus(); });
show();

// ---------------------------------------------------------------- catalog and install

async function catalogPage(page) {
  const search = h("input", { id: "search", type: "search", name: "search", placeholder: "name or description" });
  const list = h("div", { id: "catalog-list" });
  const form = h("section", { id: "install", class: "panel", hidden: true, "aria-labelledby": "install-title" });
  const more = h("button", { type: "button", id: "catalog-more", hidden: true, onclick: () => safely(() => load(more.dataset.cursor)) }, "Show more");
  let debounce = null;
  const safely = f => f().catch(e => { if (e.status !== 401) say(e.message, true); });
  search.addEventListener("input", () => { clearTimeout(debounce); debounce = setTimeout(() => safely(() => load()), 250); });
  page.append(
    h("h2", {}, "Catalog"),
    h("form", { role: "search", onsubmit: e => { e.preventDefault(); safely(() => load()); } },
      h("label", { for: "search" }, "Search the catalog"), search, h("button", { type: "submit" }, "Search")),
    list, more, form);
  const mine = generation;
  let shown = [];
  /** The first page (or, with `cursor`, the next one after what is shown). */
  async function load(cursor) {
    const q = new URLSearchParams({ version: "latest", limit: "100" });
    if (search.value.trim()) q.set("search", search.value.trim());
    if (cursor) q.set("cursor", cursor);
    const [catalog, running] = await Promise.all([
      api("GET", "/admin/v1/registry/servers?" + q),
      api("GET", "/admin/v1/servers").catch(() => ({ servers: [] })),
    ]);
    if (mine !== generation) return;
    shown = cursor ? shown.concat(catalog.servers) : catalog.servers;
    const next = catalog.metadata && catalog.metadata.nextCursor;
    more.hidden = !next;
    if (next) more.dataset.cursor = next;
    const installed = new Map(running.servers.filter(s => s.installed).map(s => [s.installed.entry, s.name]));
    list.replaceChildren(table("Catalog entries", ["Name", "Version", "Description", "Status", ""],
      shown.map(({ server, _meta }) => {
        const status = (_meta && _meta[OFFICIAL] && _meta[OFFICIAL].status) || "active";
        const as = installed.get(server.name);
        return [
          h("td", {}, h("strong", {}, server.title || server.name), server.title ? [h("br"), h("code", { class: "muted" }, server.name)] : null),
          server.version,
          server.description || "",
          status,
          h("td", { class: "actions" }, as
            ? h("a", { href: "#servers" }, `Installed as ${as}`)
            // Installing runs a server: a token without servers:write is not offered it.
            : grants("servers:write")
              ? h("button", { type: "button", disabled: status !== "active", "aria-label": `Install ${server.name}`, onclick: () => installForm(form, server) }, "Install")
              : null),
        ];
      }), "No entry matches."));
    say(`${shown.length} ${shown.length === 1 ? "entry" : "entries"} shown${next ? " (more to show)" : ""}.`);
  }
  await load();
}

/** What an install of remote `r` asks for: its URL's variables, and its headers (or the
 *  variables a header's value is made from). */
function remoteInputs(r) {
  const named = vars => Object.entries(vars || {}).map(([name, v]) => ({ ...v, name }));
  return named(r.variables).concat((r.headers || []).flatMap(hd =>
    hd.variables && Object.keys(hd.variables).length ? named(hd.variables) : [hd]));
}

/** The install form of `server`, built from its packages' environment variables or its
 *  remotes' variables and headers. */
function installForm(section, server) {
  const packages = server.packages || [];
  const remotes = server.remotes || [];
  const choices = packages.map((p, i) => ({ value: `package:${i}`, text: `${p.registryType} ${p.identifier}${p.version ? "@" + p.version : ""}`, inputs: p.environmentVariables || [] }))
    .concat(remotes.map((r, i) => ({ value: `remote:${i}`, text: `remote (${r.type}) ${r.url}`, inputs: remoteInputs(r) })));
  const pick = h("select", { id: "install-package", name: "package" },
    choices.map(c => h("option", { value: c.value }, c.text)));
  const fields = h("div", { class: "contents", id: "install-variables" });
  const error = h("p", { id: "install-error", class: "error", role: "alert" });
  const name = h("input", { id: "install-name", name: "name", placeholder: "default: from the entry's name", pattern: "[a-z0-9]([a-z0-9\\-]*[a-z0-9])?", title: "lower-case letters, digits and dashes" });
  const variables = () => (choices.find(c => c.value === pick.value) || { inputs: [] }).inputs;
  const renderVariables = () => {
    fields.replaceChildren(...variables().flatMap((v, i) => {
      const id = `install-var-${i}`;
      const hint = v.description ? h("p", { class: "hint", id: id + "-hint" }, v.description) : null;
      const attrs = { id, name: v.name, required: Boolean(v.isRequired), "aria-describedby": hint ? id + "-hint" : null };
      const input = Array.isArray(v.choices) && v.choices.length
        ? h("select", attrs, v.isRequired ? null : h("option", { value: "" }, "(none)"), v.choices.map(c => h("option", { value: c, selected: c === v.default }, c)))
        : h("input", { ...attrs, type: v.isSecret ? "password" : "text", autocomplete: "off", value: v.isSecret ? null : v.default });
      return [h("label", { for: id }, v.name, v.isRequired ? " (required)" : "", v.isSecret ? " (secret)" : ""), input, hint];
    }).filter(Boolean));
  };
  pick.addEventListener("change", renderVariables);
  renderVariables();
  const submit = async e => {
    e.preventDefault();
    error.textContent = "";
    const values = {};
    for (const el of fields.querySelectorAll("input, select")) if (el.value !== "") values[el.name] = el.value;
    const body = { entry: server.name, version: server.version, values };
    // With one choice, the gateway picks it (and says so if it cannot run it).
    const [kind, index] = pick.value.split(":");
    if (choices.length > 1) body[kind] = Number(index);
    if (name.value.trim()) body.name = name.value.trim();
    try {
      const view = await api("POST", "/admin/v1/registry/install", body);
      say(`Installing ${server.name} as ${view.name}…`);
      location.hash = "#servers";
    } catch (err) {
      error.textContent = err.message;
    }
  };
  section.replaceChildren(
    h("h3", { id: "install-title" }, `Install ${server.title || server.name} ${server.version}`),
    h("form", { class: "fields", onsubmit: submit },
      h("label", { for: "install-name" }, "Server name"), name,
      choices.length > 1 ? [h("label", { for: "install-package" }, "Package or remote"), pick] : null,
      fields,
      h("div", { class: "actions" },
        h("button", { type: "submit", class: "primary" }, "Install"),
        h("button", { type: "button", onclick: () => { section.hidden = true; } }, "Cancel"))),
    error);
  section.hidden = false;
  name.focus();
}

// ---------------------------------------------------------------- running servers

function phaseText(status) {
  let text = status.phase;
  if (status.reason) text += ` (${typeof status.reason === "string" ? status.reason : JSON.stringify(status.reason)})`;
  if (status.retry_in) text += `, retry in ${status.retry_in}`;
  return text;
}

async function serversPage(page) {
  const list = h("div", { id: "server-list" });
  const logs = h("section", { id: "logs", class: "panel", hidden: true, "aria-labelledby": "logs-title" });
  page.append(h("h2", {}, "Servers"), list, logs);
  let following = null;
  await every(2000, async current => {
    const data = await api("GET", "/admin/v1/servers");
    if (!current()) return;
    // Keep the keyboard where it was across the reload.
    const focused = document.activeElement && document.activeElement.dataset.key;
    list.replaceChildren(
      h("p", { class: "muted" }, `Backend: ${data.backend}`),
      table("Running servers", ["Name", "Phase", "Restarts", "Since", "Source", "Installed from", ""],
        data.servers.map(s => [
          h("td", {}, h("strong", {}, s.name)),
          h("td", { class: `phase phase-${s.status.phase}`, "data-server": s.name }, phaseText(s.status),
            s.status.message ? h("div", { class: "muted" }, s.status.message) : null),
          String(s.status.restarts),
          s.status.since,
          s.source,
          s.installed ? `${s.installed.entry} ${s.installed.version}` : "",
          h("td", { class: "actions" },
            grants("servers:logs") ? h("button", { type: "button", "data-key": `logs:${s.name}`, "aria-label": `Logs of ${s.name}`, onclick: () => openLogs(s.name) }, "Logs") : null,
            s.source === "runtime" && grants("servers:restart")
              ? h("button", { type: "button", "data-key": `restart:${s.name}`, "aria-label": `Restart ${s.name}`, onclick: () => act("POST", s.name, "restart", `Restarting ${s.name}.`) }, "Restart")
              : null,
            s.source === "runtime" && grants("servers:write")
              ? h("button", { type: "button", class: "danger", "data-key": `remove:${s.name}`, "aria-label": `Remove ${s.name}`, onclick: () => {
                if (confirm(`Remove ${s.name}? Its process or pod stops and its secrets are deleted.`)) act("DELETE", s.name, "", `Removed ${s.name}.`);
              } }, "Remove")
              : null),
        ]), "No server runs. Install one from the catalog."));
    if (focused) { const again = list.querySelector(`[data-key="${CSS.escape(focused)}"]`); if (again) again.focus(); }
    if (following && !data.servers.some(s => s.name === following.name)) closeLogs();
  });

  async function act(method, name, verb, done) {
    try {
      await api(method, `/admin/v1/servers/${seg(name)}${verb ? "/" + verb : ""}`);
      say(done);
    } catch (e) { say(e.message, true); }
  }

  function closeLogs() {
    if (following) clearInterval(following.timer);
    following = null;
    logs.hidden = true;
  }

  function openLogs(name) {
    closeLogs();
    const pre = h("pre", { class: "logs", id: "log-text", tabindex: "0", "aria-label": `Output of ${name}` });
    const follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
    const mine = generation;
    let reading = false;
    const load = async () => {
      if (mine !== generation) return closeLogs();
      if (reading) return;
      reading = true;
      try {
        const text = await api("GET", `/admin/v1/servers/${seg(name)}/logs?tail=500`);
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = text || "(no output yet)";
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      } catch (e) { pre.textContent = e.message; } finally { reading = false; }
    };
    following = { name, timer: setInterval(() => { if (follow.checked) load(); }, 1000) };
    logs.replaceChildren(
      h("h3", { id: "logs-title" }, `Logs of ${name}`),
      h("form", { onsubmit: e => e.preventDefault() },
        follow, h("label", { for: "log-follow" }, "Follow (live tail)"),
        h("button", { type: "button", onclick: closeLogs }, "Close")),
      pre);
    logs.hidden = false;
    load();
  }
}

// ---------------------------------------------------------------- sessions, activity, plugins

async function sessionsPage(page) {
  const list = h("div", { id: "session-list" });
  page.append(h("h2", {}, "Sessions"), list);
  await every(3000, async current => {
    const data = await api("GET", "/admin/v1/sessions");
    if (!current()) return;
    list.replaceChildren(
      h("p", { class: "muted" }, `${data.count} open session${data.count === 1 ? "" : "s"}.`),
      table("Open sessions", ["Session", "Principal", "Revision", "Profile", "Idle", "Requests running", "Listening"],
        data.sessions.map(s => [h("code", {}, s.id + "…"), s.principal || "(anonymous)", s.revision, s.profile || "", `${s.idle_seconds} s`, String(s.inflight), s.listening ? "yes" : "no"]),
        "No open session."));
  });
}

async function activityPage(page) {
  const list = h("div", { id: "activity-list" });
  const denials = h("input", { type: "checkbox", id: "only-denials" });
  page.append(h("h2", {}, "Activity"),
    h("form", { onsubmit: e => e.preventDefault() }, denials, h("label", { for: "only-denials" }, "Only policy denials")),
    list);
  let last = null;
  const render = () => {
    if (!last) return;
    if (!last.on) {
      list.replaceChildren(h("p", {}, "The audit trail is off: set ", h("code", {}, "audit"), " in the gateway's configuration to see calls, policy decisions and admin changes here."));
      return;
    }
    const records = last.records.filter(r => r.kind !== "checkpoint" && (!denials.checked || r.decision === "denied"));
    list.replaceChildren(table("Recent audit records", ["Time", "Kind", "Principal", "Method", "Name", "Server", "Decision", "By", "Outcome"],
      records.map(r => [r.time || "", r.kind, r.principal || "", r.method || "", r.name || "", r.server || "",
        h("td", { class: r.decision ? `decision-${r.decision}` : null }, r.decision || ""), r.by || "", r.outcome || ""]),
      denials.checked ? "No denial among the recent records." : "No record yet."));
  };
  // Denials come from the decisions the gateway keeps apart: a flood of calls or of
  // anonymous refusals cannot push them out of this view.
  const load = async current => {
    const data = await api("GET", `/admin/v1/audit?limit=200${denials.checked ? "&only=decisions" : ""}`);
    if (!current()) return;
    last = data;
    render();
  };
  const mine = generation;
  denials.addEventListener("change", () => { render(); load(() => mine === generation).catch(e => say(e.message, true)); });
  await every(3000, load);
}

async function pluginsPage(page) {
  const data = await api("GET", "/admin/v1/plugins");
  const list = (xs) => (xs && xs.length ? xs.join(", ") : "any");
  page.append(h("h2", {}, "Plugins"),
    h("h3", {}, "Modules"),
    table("Policy plugins", ["Name", "Hooks", "Component", "On failure", "Deadline", "Calls", "Denials", "Rewrites", "Faults"],
      data.modules.map(m => [h("strong", {}, m.name), m.hooks.join(", "), h("code", {}, m.path), m.fail_open ? "skip (fail open)" : "deny (fail closed)",
        `${m.deadline_ms} ms`, String(m.calls), String(m.denials), String(m.rewrites), String(m.faults)]),
      "No plugin is loaded."),
    h("h3", {}, "Chains"),
    table("Plugin chains", ["Chain", "Methods", "Servers", "Tools", "Profiles", "Runs, in order"],
      data.chains.map(c => [c.name || "(unnamed)", list(c.methods), list(c.servers), list(c.tools), list(c.profiles), c.plugins.join(" → ")]),
      "No chain is configured: every request passes."));
}
