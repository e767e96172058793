//! `gatehouse servers …` and `gatehouse registry …`: the admin and registry APIs of a running
//! gateway from the command line, as tables for people or JSON (`--json`) for scripts.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

/// Where the gateway is and how to speak to it.
#[derive(Args, Debug)]
pub struct Target {
    /// The gateway's base URL.
    #[arg(
        long,
        env = "GATEHOUSE_URL",
        default_value = "http://127.0.0.1:9000",
        global = true
    )]
    url: String,
    /// Bearer token of the admin API (and of the registry API, when it takes one). Prefer
    /// the environment or `--token-file`: a command line is visible to every local user.
    #[arg(
        long,
        env = "GATEHOUSE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// A file holding the bearer token (e.g. the embedded default's admin-token file).
    #[arg(
        long,
        env = "GATEHOUSE_ADMIN_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<std::path::PathBuf>,
    /// Send the token over plain HTTP to a host other than this one (refused by default:
    /// anyone on the path would read it).
    #[arg(long, global = true)]
    allow_http: bool,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// Servers the gateway's orchestrator runs.
#[derive(Subcommand, Debug)]
pub enum ServersCommand {
    /// List the servers, their phase and restarts.
    List,
    /// Define (or redefine) a server from a YAML or JSON file holding its spec.
    Add {
        /// The server's name.
        name: String,
        /// The spec (`command`, `args`, `image`, `env`…), as in the config file's `servers`.
        #[arg(long, short)]
        file: std::path::PathBuf,
    },
    /// Print a server's recent output.
    Logs {
        /// The server's name.
        name: String,
        /// The run before the current one.
        #[arg(long)]
        previous: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Keep printing new output as it comes (until interrupted).
        #[arg(long, short)]
        follow: bool,
    },
    /// Restart a server.
    Restart {
        /// The server's name.
        name: String,
    },
    /// Stop and remove a server (and its secrets).
    Remove {
        /// The server's name.
        name: String,
    },
}

/// The private registry.
#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Search the catalog's latest versions by name or description.
    Search {
        /// Words to look for (nothing: every entry).
        query: Option<String>,
    },
    /// Show one entry (its latest version unless told).
    Show {
        /// The entry's name (`io.github.modelcontextprotocol/server-everything`).
        entry: String,
        /// A version.
        #[arg(long, default_value = "latest")]
        version: String,
    },
    /// Install an entry: a server the orchestrator runs; waits until it is ready.
    Install {
        /// The entry's name.
        entry: String,
        /// A version (default: the latest).
        #[arg(long)]
        version: Option<String>,
        /// The server's name behind the gateway.
        #[arg(long)]
        name: Option<String>,
        /// A value of one of its environment variables, or of a remote's URL variable or
        /// header (`KEY=VALUE`; repeatable).
        #[arg(long = "set", value_parser = key_value)]
        values: Vec<(String, String)>,
        /// Which of its packages (by position; default: the first the gateway can run).
        #[arg(long, conflicts_with = "remote")]
        package: Option<usize>,
        /// Which of its remotes (by position), to reach the server where it runs.
        #[arg(long)]
        remote: Option<usize>,
        /// Return once the install is accepted, without waiting for it to be ready.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait until it is ready.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Upgrade an installed server to another version of its entry (default: the latest).
    Upgrade {
        /// The server's name.
        name: String,
        /// The version.
        #[arg(long)]
        version: Option<String>,
    },
    /// Set the operator's labels of one version of an entry (what the registry's filters
    /// see), replacing the ones it had.
    Label {
        /// The entry's name.
        entry: String,
        /// The version.
        version: String,
        /// The labels (`KEY=VALUE`; none: remove them all).
        #[arg(value_parser = key_value)]
        labels: Vec<(String, String)>,
    },
    /// Remove an installed server (and its secrets).
    Uninstall {
        /// The server's name.
        name: String,
    },
    /// Import `server.json` documents: one, a list, or a saved page of a registry's list.
    Import {
        /// The file.
        file: std::path::PathBuf,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: say KEY=VALUE"))
}

/// One API answer.
struct Answer {
    status: http::StatusCode,
    body: Value,
    text: String,
}

struct Api {
    base: String,
    token: Option<String>,
    client: gatehouse::upstream::http::Client,
}

impl Api {
    fn new(target: &Target) -> anyhow::Result<Self> {
        let tls = gatehouse::outbound_tls::client_config(&Default::default())?;
        let token = match (&target.token, &target.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let uri: http::Uri = target
            .url
            .parse()
            .with_context(|| format!("{:?} is not a URL", target.url))?;
        let local = uri.host().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if token.is_some() && uri.scheme_str() == Some("http") && !local && !target.allow_http {
            bail!(
                "{}: the token would cross the network unencrypted; use https (or --allow-http)",
                target.url
            );
        }
        Ok(Api {
            base: target.url.trim_end_matches('/').to_owned(),
            token,
            client: gatehouse::upstream::http::client(&tls),
        })
    }

    async fn send(&self, method: &str, path: &str, body: Option<Bytes>) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", "application/json");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .with_context(|| format!("{url:?} is not a URL"))?;
        let resp = tokio::time::timeout(Duration::from_secs(60), self.client.request(req))
            .await
            .with_context(|| format!("{method} {url}: no answer in 60s"))?
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        // Bounded: a gateway (or whatever answers at that URL) cannot fill this memory.
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{method} {url}: reading the answer: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body, text })
    }

    /// Sends, and turns an error status into an error that says what the gateway said.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let answer = self.send(method, path, body).await?;
        if !answer.status.is_success() {
            let said = answer.body["error"]
                .as_str()
                .or(answer.body["detail"].as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| answer.text.trim().to_owned());
            bail!("{method} {path}: {}: {}", answer.status, printable(&said));
        }
        Ok(answer)
    }
}

/// What a path segment or query value must encode: all but unreserved characters (RFC 3986),
/// so `/` in a registry name is `%2F` and a server name (`my-server`) is sent as written.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

fn print_json(v: &Value) {
    println!("{}", json_text(v));
}

/// `v` as pretty JSON with every control character escaped: serde escapes those below U+0020
/// only, and a server's text could carry DEL or a C1 control (U+009B starts a terminal
/// command as ESC [ does) to the operator's terminal. Outside strings the text has none.
fn json_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    let bad = |c: char| c.is_control() && c != '\n';
    if !text.chars().any(bad) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if bad(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints rows as aligned columns under `headers`.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", printable(c)))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Largest answer read from the gateway.
const MAX_ANSWER: usize = 64 << 20;
/// Most pages a search reads.
const MAX_PAGES: usize = 100;

/// Lines read at each look while following.
const FOLLOW_TAIL: usize = 1000;

/// Prints what a server writes from now on: every second, the lines after those already
/// printed (the newest `FOLLOW_TAIL` lines are read and matched against the last ones seen).
async fn follow_logs(api: &Api, name: &str, seen: String) -> anyhow::Result<()> {
    use std::io::Write;
    let path = format!(
        "/admin/v1/servers/{}/logs?tail={FOLLOW_TAIL}",
        segment(name)
    );
    let mut last: Vec<String> = seen.lines().map(str::to_owned).collect();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now: Vec<String> = match api.call("GET", &path, None).await {
            Ok(a) => a.text.lines().map(str::to_owned).collect(),
            // A restart or a moment's outage: keep following.
            Err(e) => {
                eprintln!("({e}; still following)");
                continue;
            }
        };
        let mut out = std::io::stdout().lock();
        for line in after(&last, &now) {
            writeln!(out, "{}", printable(line))?;
        }
        out.flush()?;
        last = now;
    }
}

/// The lines of `now` after those it shares with the end of `before` (the longest overlap);
/// all of `now` when nothing overlaps (the output started again).
fn after<'a>(before: &[String], now: &'a [String]) -> &'a [String] {
    let most = before.len().min(now.len());
    let overlap = (0..=most)
        .rev()
        .find(|&k| now[..k] == before[before.len() - k..])
        .unwrap_or(0);
    &now[overlap..]
}

/// `text` without the control characters a terminal would act on (a server's output, or a
/// name a registry entry chose, must not rewrite the operator's screen): kept are newlines
/// and tabs; the rest show as `?`.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| if bad(c) { '?' } else { c })
        .collect::<String>()
        .into()
}

fn phase_of(server: &Value) -> String {
    let status = &server["status"];
    let phase = match status["phase"].as_str() {
        Some(p) => match status["reason"].as_str() {
            Some(r) => format!("{p} ({r})"),
            None => p.to_owned(),
        },
        None => "?".into(),
    };
    printable(&phase).into_owned()
}

/// Runs a `servers` command.
pub async fn servers(target: &Target, command: ServersCommand) -> anyhow::Result<()> {
    let api = Api::new(target)?;
    match command {
        ServersCommand::List => {
            let answer = api.call("GET", "/admin/v1/servers", None).await?;
            if target.json {
                print_json(&answer.body);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = answer.body["servers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    vec![
                        s["name"].as_str().unwrap_or_default().to_owned(),
                        phase_of(s),
                        s["status"]["restarts"].to_string(),
                        s["source"].as_str().unwrap_or_default().to_owned(),
                        match s["installed"].as_object() {
                            Some(i) => format!(
                                "{}@{}",
                                i["entry"].as_str().unwrap_or_default(),
                                i["version"].as_str().unwrap_or_default()
                            ),
                            None => String::new(),
                        },
                    ]
                })
                .collect();
            table(
                &["NAME", "PHASE", "RESTARTS", "SOURCE", "INSTALLED FROM"],
                &rows,
            );
        }
        ServersCommand::Add { name, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let spec: Value = serde_saphyr::from_str(&text)
                .with_context(|| format!("{} is not YAML or JSON", file.display()))?;
            let path = format!("/admin/v1/servers/{}", segment(&name));
            let answer = api.call("PUT", &path, Some(spec)).await?;
            report(
                target,
                &answer.body,
                &format!("{name}: {}", phase_of(&answer.body)),
            );
        }
        ServersCommand::Logs {
            name,
            previous,
            tail,
            follow,
        } => {
            let mut query = Vec::new();
            if previous {
                query.push("previous=true".to_owned());
            }
            if let Some(n) = tail {
                query.push(format!("tail={n}"));
            }
            let path = format!(
                "/admin/v1/servers/{}/logs{}{}",
                segment(&name),
                if query.is_empty() { "" } else { "?" },
                query.join("&")
            );
            let answer = api.call("GET", &path, None).await?;
            print!("{}", printable(&answer.text));
            if follow {
                follow_logs(&api, &name, answer.text).await?;
            }
        }
        ServersCommand::Restart { name } => {
            let path = format!("/admin/v1/servers/{}/restart", segment(&name));
            let answer = api.call("POST", &path, None).await?;
            report(target, &answer.body, &format!("{name}: restarting"));
        }
        ServersCommand::Remove { name } => {
            let path = format!("/admin/v1/servers/{}", segment(&name));
            api.call("DELETE", &path, None).await?;
            report(
                target,
                &json!({"removed": name}),
                &format!("{name}: removed"),
            );
        }
    }
    Ok(())
}

fn report(target: &Target, body: &Value, human: &str) {
    if target.json {
        print_json(body);
    } else {
        println!("{}", printable(human));
    }
}

/// Runs a `registry` command.
pub async fn registry(target: &Target, command: RegistryCommand) -> anyhow::Result<()> {
    let api = Api::new(target)?;
    match command {
        RegistryCommand::Search { query } => {
            let mut path = "/v0.1/servers?version=latest&limit=100".to_owned();
            if let Some(q) = &query {
                path.push_str(&format!("&search={}", segment(q)));
            }
            let mut all = Vec::new();
            let mut next = path.clone();
            // Every page: a catalog is small, and a search asks for all of it (up to a bound,
            // said when reached).
            let mut pages = 0;
            loop {
                pages += 1;
                if pages > MAX_PAGES {
                    eprintln!(
                        "(stopped after {MAX_PAGES} pages: narrow the search to see the rest)"
                    );
                    break;
                }
                let answer = api.call("GET", &next, None).await?;
                all.extend(
                    answer.body["servers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                match answer.body["metadata"]["nextCursor"].as_str() {
                    Some(cursor) => next = format!("{path}&cursor={}", segment(cursor)),
                    None => break,
                }
            }
            if target.json {
                print_json(&json!({ "servers": all }));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|e| {
                    let s = &e["server"];
                    let listed = |key: &str, kind: &str| {
                        s[key]
                            .as_array()
                            .map(Vec::as_slice)
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|p| p[kind].as_str())
                            .map(str::to_owned)
                            .collect::<Vec<String>>()
                    };
                    let mut kinds = listed("packages", "registryType");
                    kinds.extend(
                        listed("remotes", "type")
                            .iter()
                            .map(|t| format!("remote:{t}")),
                    );
                    vec![
                        s["name"].as_str().unwrap_or_default().to_owned(),
                        s["version"].as_str().unwrap_or_default().to_owned(),
                        kinds.join(","),
                        s["description"].as_str().unwrap_or_default().to_owned(),
                    ]
                })
                .collect();
            table(&["NAME", "VERSION", "PACKAGES", "DESCRIPTION"], &rows);
        }
        RegistryCommand::Show { entry, version } => {
            let path = format!(
                "/v0.1/servers/{}/versions/{}",
                segment(&entry),
                segment(&version)
            );
            let answer = api.call("GET", &path, None).await?;
            print_json(&answer.body);
        }
        RegistryCommand::Install {
            entry,
            version,
            name,
            values,
            package,
            remote,
            no_wait,
            timeout,
        } => {
            let body = json!({
                "entry": entry,
                "version": version,
                "name": name,
                "package": package,
                "remote": remote,
                "values": values.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            let answer = api
                .call("POST", "/admin/v1/registry/install", Some(body))
                .await?;
            let name = answer.body["name"].as_str().unwrap_or_default().to_owned();
            if !target.json {
                println!("{name}: installed from {entry}; {}", phase_of(&answer.body));
            }
            let last = if no_wait {
                answer.body
            } else {
                converge(&api, target, &name, timeout).await?
            };
            if target.json {
                print_json(&last);
            }
        }
        RegistryCommand::Upgrade { name, version } => {
            let body = json!({ "name": name, "version": version });
            let answer = api
                .call("POST", "/admin/v1/registry/upgrade", Some(body))
                .await?;
            let to = answer.body["installed"]["version"].as_str().unwrap_or("?");
            report(target, &answer.body, &format!("{name}: now at {to}"));
        }
        RegistryCommand::Label {
            entry,
            version,
            labels,
        } => {
            let path = format!(
                "/admin/v1/registry/servers/{}/versions/{}/labels",
                segment(&entry),
                segment(&version)
            );
            let labels: std::collections::BTreeMap<_, _> = labels.into_iter().collect();
            let answer = api
                .call("PUT", &path, Some(json!({ "labels": labels })))
                .await?;
            let shown =
                answer.body["_meta"][gatehouse::registry::catalog::GATEHOUSE_META]["labels"]
                    .as_object()
                    .map(|l| {
                        l.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
            report(
                target,
                &answer.body,
                &format!(
                    "{entry} {version}: labels {}",
                    if shown.is_empty() { "none" } else { &shown }
                ),
            );
        }
        RegistryCommand::Uninstall { name } => {
            let path = format!("/admin/v1/servers/{}", segment(&name));
            api.call("DELETE", &path, None).await?;
            report(
                target,
                &json!({"removed": name}),
                &format!("{name}: uninstalled"),
            );
        }
        RegistryCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let doc: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let answer = api
                .call("POST", "/admin/v1/registry/servers", Some(doc))
                .await?;
            let human = format!(
                "published {} version(s); {} already there",
                answer.body["published"].as_array().map_or(0, Vec::len),
                answer.body["skipped"].as_array().map_or(0, Vec::len)
            );
            report(target, &answer.body, &human);
        }
    }
    Ok(())
}

/// Prints each phase an installed server goes through until it is ready; fails when it
/// fails (with the orchestrator's reason) or does not get there in `timeout`.
async fn converge(
    api: &Api,
    target: &Target,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let path = format!("/admin/v1/servers/{}", segment(name));
    let started = Instant::now();
    let mut said = String::new();
    loop {
        let answer = api.call("GET", &path, None).await?;
        let phase = phase_of(&answer.body);
        if phase != said && !target.json {
            let message = answer.body["status"]["message"]
                .as_str()
                .unwrap_or_default();
            let sep = if message.is_empty() { "" } else { ": " };
            println!(
                "{name}: {phase}{sep}{} ({:.0?})",
                printable(message),
                started.elapsed()
            );
        }
        said = phase;
        match answer.body["status"]["phase"].as_str() {
            Some("ready") => return Ok(answer.body),
            Some("failed") => bail!(
                "{name} failed: {}",
                printable(
                    answer.body["status"]["message"]
                        .as_str()
                        .unwrap_or("no reason given")
                )
            ),
            _ => {}
        }
        if started.elapsed() > timeout {
            bail!(
                "{name} was not ready after {}: last {said}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.split(' ')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn following_prints_each_new_line_once() {
        assert_eq!(after(&lines("a b c"), &lines("b c d e")), lines("d e"));
        assert_eq!(after(&lines("a b c"), &lines("a b c")), lines(""));
        // The window moved past everything seen: all of it is new.
        assert_eq!(after(&lines("a b"), &lines("x y")), lines("x y"));
        assert_eq!(after(&lines(""), &lines("x")), lines("x"));
        // Repeated lines: the longest overlap wins.
        assert_eq!(after(&lines("x x"), &lines("x x x")), lines("x"));
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(printable("\u{1b}]0;pwned\u{7}hi\r"), "?]0;pwned?hi?");
        assert_eq!(printable("\u{9b}31m"), "?31m", "C1 controls too");
        // JSON output escapes them, and still reads as the same value.
        let v = serde_json::json!({"message": "\u{9b}31m\u{7f}\u{1b}]52;c;x\u{7}", "n": [1, 2]});
        let text = json_text(&v);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        assert!(
            text.contains("\\u009b31m\\u007f\\u001b]52;c;x\\u0007"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), v);
        assert_eq!(
            json_text(&serde_json::json!({"a": "b"})),
            "{\n  \"a\": \"b\"\n}"
        );
    }
}
