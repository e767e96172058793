//! `redact`: rewrites results to mask secrets and personal data.
//!
//! Every string in the JSON result is scanned; matches are replaced with
//! `[REDACTED:<kind>]`. Kinds: `api-key` (provider key formats, JWTs,
//! bearer tokens, private key blocks, `secret=...`-style assignments),
//! `email`, `card` (13-19 digits, spaces or dashes allowed, Luhn-checked).
//!
//! ```json
//! {"api_keys": true, "emails": true, "cards": true,
//!  "patterns": [{"name": "employee-id", "regex": "EMP-[0-9]{6}"}]}
//! ```
//! The result is rewritten only when something was masked.
use gatehouse_plugin::serde_json::{self, Value};
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin, parse_config};
use regex::{Captures, Regex};
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    api_keys: bool,
    emails: bool,
    cards: bool,
    patterns: Vec<PatternConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_keys: true,
            emails: true,
            cards: true,
            patterns: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatternConfig {
    name: String,
    regex: String,
}

/// Provider formats of keys and tokens.
const KEY_PATTERNS: &[&str] = &[
    // OpenAI / Anthropic / Stripe style secret keys.
    r"\b(?:sk|rk|pk)[-_](?:live[-_]|test[-_]|proj[-_]|ant[-_])?[A-Za-z0-9_-]{16,}",
    // AWS access key ids.
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    // GitHub tokens.
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",
    // Slack tokens.
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    // Google API keys.
    r"\bAIza[0-9A-Za-z_-]{35}",
    // JSON Web Tokens.
    r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}",
    // Bearer tokens in headers or text.
    r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}",
    // PEM private keys.
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
];

/// `password: hunter2`-style assignments: only the value is masked.
const ASSIGNMENT: &str = r#"(?i)\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password|passwd|client[_-]?secret)["']?\s*[:=]\s*["']?)([^\s"',;]{6,})"#;

const EMAIL: &str = r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b";

const CARD: &str = r"\b\d(?:[ -]?\d){12,18}\b";

pub struct Redact {
    keys: Vec<Regex>,
    assignment: Option<Regex>,
    email: Option<Regex>,
    card: Option<Regex>,
    custom: Vec<(String, Regex)>,
}

/// The Luhn checksum used by payment card numbers.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    let mut double = false;
    for c in digits.chars().rev() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
    }
    sum.is_multiple_of(10)
}

/// Applies `re` to `text`, keeping it borrowed while nothing changes.
fn replace(text: &mut Cow<'_, str>, re: &Regex, mut f: impl FnMut(&Captures) -> String) {
    let replaced = match re.replace_all(text, |c: &Captures| f(c)) {
        Cow::Owned(s) => Some(s),
        Cow::Borrowed(_) => None,
    };
    if let Some(s) = replaced
        && s != **text
    {
        *text = Cow::Owned(s);
    }
}

fn mask(kind: &str) -> String {
    format!("[REDACTED:{kind}]")
}

impl Redact {
    /// Masks one string; `None` when nothing matched.
    pub fn redact_text(&self, text: &str) -> Option<String> {
        let mut out = Cow::Borrowed(text);
        for re in &self.keys {
            replace(&mut out, re, |_| mask("api-key"));
        }
        if let Some(re) = &self.assignment {
            replace(&mut out, re, |c| format!("{}{}", &c[1], mask("api-key")));
        }
        if let Some(re) = &self.email {
            replace(&mut out, re, |_| mask("email"));
        }
        if let Some(re) = &self.card {
            replace(&mut out, re, |c| {
                let digits: String = c[0].chars().filter(char::is_ascii_digit).collect();
                if (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
                    mask("card")
                } else {
                    c[0].to_string()
                }
            });
        }
        for (name, re) in &self.custom {
            replace(&mut out, re, |_| mask(name));
        }
        match out {
            Cow::Borrowed(_) => None,
            Cow::Owned(s) => Some(s),
        }
    }

    /// Masks every string in a JSON value; whether anything changed.
    fn redact_value(&self, v: &mut Value) -> bool {
        match v {
            Value::String(s) => match self.redact_text(s) {
                Some(new) => {
                    *s = new;
                    true
                }
                None => false,
            },
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |changed, i| self.redact_value(i) | changed),
            Value::Object(map) => map
                .values_mut()
                .fold(false, |changed, i| self.redact_value(i) | changed),
            _ => false,
        }
    }
}

fn compile(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("bad pattern {pattern:?}: {e}"))
}

impl Plugin for Redact {
    fn init(config: &str) -> Result<Self, String> {
        let cfg: Config = parse_config(config)?;
        let keys = if cfg.api_keys {
            KEY_PATTERNS
                .iter()
                .map(|p| compile(p))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let custom = cfg
            .patterns
            .into_iter()
            .map(|p| Ok((p.name, compile(&p.regex)?)))
            .collect::<Result<_, String>>()?;
        Ok(Redact {
            keys,
            assignment: cfg.api_keys.then(|| compile(ASSIGNMENT)).transpose()?,
            email: cfg.emails.then(|| compile(EMAIL)).transpose()?,
            card: cfg.cards.then(|| compile(CARD)).transpose()?,
            custom,
        })
    }

    fn on_response(&mut self, _ctx: &CallContext, result: &Payload) -> Decision {
        let Ok(mut value) = serde_json::from_str::<Value>(result.text()) else {
            return Decision::deny("redact: the result is not JSON");
        };
        if self.redact_value(&mut value) {
            Decision::rewrite(&value)
        } else {
            Decision::Allow
        }
    }
}

export_plugin!(Redact: on_response);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> Redact {
        Redact::init("null").unwrap()
    }

    #[test]
    fn masks_keys_emails_cards() {
        let p = plugin();
        let r = |s: &str| p.redact_text(s).unwrap_or_else(|| s.to_string());
        assert_eq!(
            r("key sk-proj-abcdefghijklmnopqrstuv here"),
            "key [REDACTED:api-key] here"
        );
        assert_eq!(r("AKIAABCDEFGHIJKLMNOP"), "[REDACTED:api-key]");
        assert_eq!(r("mail bob@example.com now"), "mail [REDACTED:email] now");
        assert_eq!(r("card 4111 1111 1111 1111."), "card [REDACTED:card].");
        assert_eq!(r("password=hunter2hunter2"), "password=[REDACTED:api-key]");
        // Not a valid Luhn number: kept.
        assert_eq!(r("order 1234 5678 9012 3456"), "order 1234 5678 9012 3456");
        assert!(p.redact_text("nothing to see").is_none());
    }

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("5500005555555559"));
        assert!(!luhn_valid("4111111111111112"));
    }

    #[test]
    fn rewrites_nested_json_only_when_needed() {
        let mut p = plugin();
        let ctx = CallContext::new("tools/call", "s")
            .with_name("t")
            .with_session_id("s");
        let d = p.on_response(
            &ctx,
            &Payload::new(
                r#"{"content":[{"type":"text","text":"reach me at a@b.io"}],"isError":false}"#,
            ),
        );
        match d {
            Decision::Rewrite(s) => {
                let v: Value = serde_json::from_str(&s).unwrap();
                assert_eq!(v["content"][0]["text"], "reach me at [REDACTED:email]");
                assert_eq!(v["isError"], false);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.on_response(
                &ctx,
                &Payload::new(r#"{"content":[{"type":"text","text":"hi"}]}"#)
            ),
            Decision::Allow
        ));
    }
}
