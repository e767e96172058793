//! `gatehouse plugin check FILE.wasm [--input SAMPLE.json]`: validates a
//! component against the plugin interface and runs it once.
//!
//! The sample is a JSON object; every member is optional:
//!
//! ```json
//! {
//!   "config":    {"rules": []},                  // handed to init
//!   "hook":      "on-request",                   // on-request | on-response | filter-list
//!   "context":   {"method": "tools/call", "server": "example", "name": "add",
//!                 "principal": "alice", "session_id": "check", "profile": null},
//!   "arguments": {"a": 1},                       // on-request
//!   "result":    {"content": []},                // on-response
//!   "entries":   [{"kind": "tool", "name": "add", "description": "...", "labels": []}]
//! }
//! ```
//! Without a sample (or a `hook`), the first hook the plugin implements runs
//! on a `tools/call` of a tool named `example` with empty arguments.

use std::path::Path;

use serde::Deserialize;

use super::config::{ChainConfig, PluginConfig, PluginsConfig};
use super::error::PluginError;
use super::{CallContext, Decision, EntryKind, ListEntry, PluginSet, engine};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Sample {
    #[serde(default)]
    config: serde_json::Value,
    hook: Option<String>,
    #[serde(default)]
    context: SampleContext,
    arguments: Option<serde_json::Value>,
    result: Option<serde_json::Value>,
    #[serde(default)]
    entries: Vec<SampleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SampleContext {
    method: String,
    server: String,
    name: Option<String>,
    principal: Option<String>,
    session_id: String,
    profile: Option<String>,
    groups: Vec<Box<str>>,
    scopes: Vec<Box<str>>,
}

impl Default for SampleContext {
    fn default() -> Self {
        SampleContext {
            method: "tools/call".into(),
            server: "example".into(),
            name: Some("example".into()),
            principal: None,
            session_id: "plugin-check".into(),
            profile: None,
            groups: Vec::new(),
            scopes: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleEntry {
    #[serde(default = "tool")]
    kind: String,
    name: String,
    description: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
}

fn tool() -> String {
    "tool".into()
}

fn entry_kind(s: &str) -> Result<EntryKind, PluginError> {
    Ok(match s {
        "tool" => EntryKind::Tool,
        "prompt" => EntryKind::Prompt,
        "resource" => EntryKind::Resource,
        "resource-template" => EntryKind::ResourceTemplate,
        "server" => EntryKind::Server,
        other => return Err(PluginError::Input(format!("unknown entry kind {other:?}"))),
    })
}

/// Validates the component at `path` against `gatehouse:plugin/plugin`,
/// initialises it, runs one hook on the sample at `input` (or a default
/// sample) and returns a human-readable report ending with the decision.
pub fn check(path: &Path, input: Option<&Path>) -> Result<String, PluginError> {
    let sample: Sample = match input {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| PluginError::Input(format!("{}: {e}", p.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| PluginError::Input(format!("{}: {e}", p.display())))?
        }
        None => Sample::default(),
    };
    let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
        plugin: "check".into(),
        path: path.to_path_buf(),
        source,
    })?;
    let mut plugin = PluginConfig::new("check", path);
    plugin.config = sample.config.clone();
    let cfg = PluginsConfig {
        modules: vec![plugin],
        chains: vec![ChainConfig {
            plugins: vec!["check".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let set = PluginSet::load(&cfg)?;
    let (_, hooks) = set.plugins().remove(0);

    let mut out = String::new();
    out.push_str(&format!("component: {}\n", path.display()));
    out.push_str(&format!(
        "sha256: {} ({} bytes)\n",
        engine::sha256_hex(&bytes),
        bytes.len()
    ));
    out.push_str("interface: gatehouse:plugin/plugin@0.3.0 ok\n");
    let mut names = Vec::new();
    if hooks.on_request {
        names.push("on-request");
    }
    if hooks.on_response {
        names.push("on-response");
    }
    if hooks.filter_list {
        names.push("filter-list");
    }
    out.push_str(&format!(
        "init: ok, hooks: {}\n",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ));

    let hook = match sample.hook.as_deref() {
        Some(h) => h.to_string(),
        None => match names.first() {
            Some(h) => h.to_string(),
            None => return Ok(out),
        },
    };
    let c = &sample.context;
    let ctx = CallContext {
        method: &c.method,
        server: &c.server,
        name: c.name.as_deref(),
        principal: c.principal.as_deref(),
        session_id: &c.session_id,
        profile: c.profile.as_deref(),
        groups: &c.groups,
        scopes: &c.scopes,
    };
    let target = format!("{} {}", c.method, c.name.as_deref().unwrap_or(""));
    let line = match hook.as_str() {
        "on-request" => {
            let args = sample
                .arguments
                .unwrap_or_else(|| serde_json::json!({}))
                .to_string();
            format!(
                "on-request ({}): {}",
                target.trim(),
                describe(&set.on_request_blocking(&ctx, args.as_str()))
            )
        }
        "on-response" => {
            let result = sample
                .result
                .unwrap_or_else(|| serde_json::json!({"content": []}))
                .to_string();
            format!(
                "on-response ({}): {}",
                target.trim(),
                describe(&set.on_response_blocking(&ctx, result.as_str()))
            )
        }
        "filter-list" => {
            let entries = sample
                .entries
                .into_iter()
                .map(|e| {
                    Ok(ListEntry {
                        kind: entry_kind(&e.kind)?,
                        name: e.name,
                        description: e.description,
                        labels: e.labels,
                    })
                })
                .collect::<Result<Vec<_>, PluginError>>()?;
            match set.filter_list_blocking(&ctx, &entries) {
                Ok(visible) => {
                    let shown: Vec<String> = entries
                        .iter()
                        .zip(&visible)
                        .map(|(e, v)| {
                            format!("{}={}", e.name, if *v { "visible" } else { "hidden" })
                        })
                        .collect();
                    format!("filter-list ({}): [{}]", c.method, shown.join(", "))
                }
                Err(denied) => format!(
                    "filter-list ({}): {}",
                    c.method,
                    describe(&Decision::Deny(denied))
                ),
            }
        }
        other => {
            return Err(PluginError::Input(format!(
                "unknown hook {other:?} (on-request, on-response, filter-list)"
            )));
        }
    };
    out.push_str(&line);
    out.push('\n');
    Ok(out)
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Allow => "allow".into(),
        Decision::Rewrite(json) => format!("rewrite {json}"),
        Decision::Deny(denied) => match denied.fault {
            Some(kind) => format!(
                "deny (plugin fault: {kind:?}, code {}): {}",
                denied.code, denied.message
            ),
            None => format!("deny (code {}): {}", denied.code, denied.message),
        },
    }
}
