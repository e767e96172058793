//! `initialize`: the revision both sides speak, every upstream connected with the client's own
//! capabilities, and one merged answer.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::Services;
use crate::mcp::revision;
use crate::mcp::session::{Session, capability_bits, caps};

use super::{Fields, fields, json_string, string_field};

/// What a client's `initialize` asks for, negotiated: the revision both speak, the params
/// each upstream is initialized with (the client's own capabilities), and whether the client
/// offers roots.
pub struct Negotiated {
    /// The protocol revision of the session.
    pub version: &'static str,
    /// `initialize` params for the upstreams.
    pub init_params: Bytes,
    /// The client offers `roots`.
    pub offers_roots: bool,
}

/// The most a client's capabilities and info may take together. A session keeps them for its
/// life (each server it reaches is initialized with them), so a bound on the body alone would
/// let each of a principal's sessions hold a body's worth of memory; real clients send well
/// under a kilobyte, and icons as data URIs fit.
pub const MAX_CLIENT_OFFER: usize = 64 * 1024;

/// Reads a client's `initialize` params and picks the revision.
pub fn negotiate(params: Option<&[u8]>) -> Result<Negotiated, String> {
    let f = fields(params)?;
    let requested = string_field(&f, "protocolVersion")?;
    let version = revision::SUPPORTED
        .iter()
        .copied()
        .find(|v| *v == requested)
        .unwrap_or(revision::LATEST);
    // Both go upstream as they are: objects only.
    let client_caps = f.get("capabilities").map_or("{}", |r| r.get());
    if !client_caps.starts_with('{') {
        return Err("params.capabilities must be an object".into());
    }
    let client_info = f
        .get("clientInfo")
        .map_or(r#"{"name":"unknown","version":"0"}"#, |r| r.get());
    if !client_info.starts_with('{') {
        return Err("params.clientInfo must be an object".into());
    }
    if client_caps.len() + client_info.len() > MAX_CLIENT_OFFER {
        return Err(format!(
            "params.capabilities and params.clientInfo take {} bytes together; at most {MAX_CLIENT_OFFER} are kept for a session",
            client_caps.len() + client_info.len()
        ));
    }
    let init_params = Bytes::from(format!(
        r#"{{"protocolVersion":"{version}","capabilities":{client_caps},"clientInfo":{client_info}}}"#
    ));
    // A client that offers roots gets roots/list at any time, unrelated to a call: listen for it
    // upstream from the start instead of racing the client's own GET stream.
    let offers_roots = f
        .get("capabilities")
        .and_then(|c| serde_json::from_str::<Fields<'_>>(c.get()).ok())
        .is_some_and(|c| c.contains_key("roots"));
    Ok(Negotiated {
        version,
        init_params,
        offers_roots,
    })
}

/// What a session's servers offer together: merged capabilities (a JSON object) and their
/// instructions, each prefixed with its server's name when names are prefixed.
pub struct Offer {
    /// Capability bits of every server reached.
    bits: u8,
    /// The servers' instructions, joined; empty when none has any.
    pub instructions: String,
}

/// Connects every upstream of `session` and merges what they offer. With pinning on, each
/// server's instructions are pinned like a tool's definition (clients often put them in the
/// model's system prompt): changed ones are left out while they wait for approval.
pub async fn offer(sv: Services<'_>, session: &Arc<Session>) -> Offer {
    // A profile's session connects only its own servers.
    let served: Vec<usize> = (0..session.topology().servers.len())
        .filter(|i| session.serves(*i))
        .collect();
    // A sleeping server offers what it last offered; a new session does not wake it.
    let results = futures_util::future::join_all(served.iter().map(|&i| async move {
        match session.resting(i) {
            Some((_, init)) => Ok((capability_bits(&init), Some(init))),
            None => session.connect(i).await.map(|b| (b, None)),
        }
    }))
    .await;

    let mut bits = 0u8;
    let mut instructions = String::new();
    for (&i, r) in served.iter().zip(&results) {
        let name = session.topology().router.name(i);
        match r {
            Ok((b, resting)) => {
                bits |= b;
                let server = &session.topology().servers[i];
                let init = resting.clone().or_else(|| session.links()[i].init_result());
                if let Some(text) = init.as_deref().and_then(instructions_of).filter(|text| {
                    sv.pins.is_none_or(|pins| {
                        let item = crate::pins::instructions_item(text);
                        pins.observe(&server.name, server.label, &item, sv.audit, sv.metrics)
                    })
                }) {
                    if !instructions.is_empty() {
                        instructions.push_str("\n\n");
                    }
                    if session.topology().router.prefixing() {
                        instructions.push_str(&format!("[{name}] "));
                    }
                    instructions.push_str(&text);
                }
            }
            Err(e) => {
                if let Some(more) = session.topology().servers[i].failure_logged() {
                    tracing::warn!(session = %session.log_id(), upstream = name, "upstream unavailable: {e}{more}");
                }
            }
        }
    }
    if bits == 0 {
        // Nothing reachable yet: advertise the basics so the client still asks later.
        bits = caps::TOOLS | caps::PROMPTS | caps::RESOURCES;
    }
    Offer { bits, instructions }
}

impl Offer {
    /// The merged `capabilities` object: change notifications and resource subscriptions
    /// included (a session hears them on its GET stream, a stateless client on its listen
    /// streams).
    pub fn capabilities(&self) -> String {
        let mut c = Vec::new();
        if self.has(caps::TOOLS) {
            c.push(r#""tools":{"listChanged":true}"#);
        }
        if self.has(caps::PROMPTS) {
            c.push(r#""prompts":{"listChanged":true}"#);
        }
        if self.has(caps::RESOURCES) {
            c.push(r#""resources":{"subscribe":true,"listChanged":true}"#);
        }
        if self.has(caps::LOGGING) {
            c.push(r#""logging":{}"#);
        }
        if self.has(caps::COMPLETIONS) {
            c.push(r#""completions":{}"#);
        }
        format!("{{{}}}", c.join(","))
    }

    /// Whether some server offers capability `bit` (see [`caps`]).
    pub fn has(&self, bit: u8) -> bool {
        self.bits & bit != 0
    }
}

/// The gateway's own `serverInfo`.
pub const SERVER_INFO: &str = concat!(
    r#"{"name":"gatehouse","title":"Gatehouse MCP gateway","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}"#
);

/// Handles `initialize` of a new session: connects every upstream with the client's own
/// capabilities, and merges what they offer into the result.
pub async fn initialize(sv: Services<'_>, session: &Arc<Session>) -> Bytes {
    let offer = offer(sv, session).await;
    if let Some(pins) = sv.pins {
        pins.flush().await;
    }
    let mut result = format!(
        r#"{{"protocolVersion":"{}","capabilities":{},"serverInfo":{SERVER_INFO}"#,
        session.protocol_version,
        offer.capabilities(),
    );
    if !offer.instructions.is_empty() {
        result.push_str(",\"instructions\":");
        result.push_str(json_string(&offer.instructions).get());
    }
    result.push('}');
    Bytes::from(result)
}

fn instructions_of(init_result: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct R {
        instructions: Option<String>,
    }
    serde_json::from_slice::<R>(init_result)
        .ok()?
        .instructions
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(caps: &str, info: &str) -> Vec<u8> {
        format!(r#"{{"protocolVersion":"2025-11-25","capabilities":{caps},"clientInfo":{info}}}"#)
            .into_bytes()
    }

    #[test]
    fn a_client_offer_is_kept_only_up_to_its_bound() {
        let info = |pad: usize| {
            format!(
                r#"{{"name":"c","version":"1","pad":"{}"}}"#,
                "x".repeat(pad)
            )
        };
        let fixed = "{}".len() + info(0).len();
        let at_bound = params("{}", &info(MAX_CLIENT_OFFER - fixed));
        let kept = negotiate(Some(&at_bound)).expect("at the bound");
        assert!(kept.init_params.len() > MAX_CLIENT_OFFER);
        let over = params("{}", &info(MAX_CLIENT_OFFER - fixed + 1));
        let refused = negotiate(Some(&over)).err().expect("over the bound");
        assert!(
            refused.contains("params.capabilities and params.clientInfo take 65537 bytes"),
            "{refused}"
        );
        // Large capabilities count as much as a large clientInfo.
        let caps = format!(
            r#"{{"experimental":{{"pad":"{}"}}}}"#,
            "x".repeat(MAX_CLIENT_OFFER)
        );
        assert!(negotiate(Some(&params(&caps, &info(0)))).is_err());
    }
}
