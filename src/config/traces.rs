//! Trace export settings (`traces:`); [`crate::trace`] records and sends the spans.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// OpenTelemetry traces over OTLP/HTTP (JSON encoding).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's traces URL, e.g. `http://otel-collector:4318/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of traces started here (no sampled parent) that are recorded, 0 to 1. A client's
    /// `traceparent` decides for its own traces.
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
    /// Whether a client's `traceparent` decides if its trace is recorded (W3C parent-based
    /// sampling, the default). False: the ratio decides for every request, so clients cannot
    /// make the gateway record (and export) more than the operator chose.
    #[serde(default = "yes")]
    pub honor_client_sampling: bool,
    /// Whether spans carry the caller's principal (`enduser.id`): off unless asked for, as a
    /// principal may be a person's name or address.
    #[serde(default)]
    pub record_principal: bool,
    /// Headers sent with every export (an API key); values may name an environment variable
    /// as `${NAME}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Spans held for export; past this, new spans are dropped (and counted).
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// Longest a finished span waits before it is sent.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
}

fn default_service_name() -> String {
    "gatehouse".into()
}

fn yes() -> bool {
    true
}

fn default_ratio() -> f64 {
    1.0
}

fn default_queue() -> usize {
    4096
}

fn default_flush() -> Duration {
    Duration::from_millis(500)
}

impl TracesConfig {
    /// Checks the settings; the error is (the field at fault, why).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, why: String| (format!("traces.{field}"), why);
        validate_export("traces", &self.endpoint, &self.headers)?;
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(bad("sample_ratio", "must be between 0 and 1".into()));
        }
        if self.max_queue == 0 || self.max_queue > 1_000_000 {
            return Err(bad("max_queue", "must be between 1 and 1000000".into()));
        }
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(60) {
            return Err(bad("flush_interval", "must be between 1ms and 60s".into()));
        }
        if self.service_name.is_empty() {
            return Err(bad("service_name", "must not be empty".into()));
        }
        Ok(())
    }
}

/// Checks an OTLP endpoint and its headers (`prefix` names the section in errors).
pub fn validate_export(
    prefix: &str,
    endpoint: &str,
    headers: &BTreeMap<String, String>,
) -> Result<(), (String, String)> {
    let bad = |field: &str, why: String| (format!("{prefix}.{field}"), why);
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad("endpoint", e.to_string()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(bad("endpoint", "must be an http:// or https:// URL".into()));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(bad(
            "endpoint",
            format!("must not carry credentials (put them in {prefix}.headers)"),
        ));
    }
    for (name, value) in headers {
        http::HeaderName::try_from(name.as_str())
            .map_err(|_| bad(&format!("headers.{name}"), "not a header name".into()))?;
        let value = header_value(value).map_err(|e| bad(&format!("headers.{name}"), e))?;
        http::HeaderValue::try_from(value)
            .map_err(|_| bad(&format!("headers.{name}"), "not a header value".into()))?;
    }
    Ok(())
}

/// Audit records shipped as OTLP logs (`audit.otlp`), besides the file or standard output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditOtlp {
    /// The collector's logs URL, e.g. `http://otel-collector:4318/v1/logs`.
    pub endpoint: String,
    /// `service.name` of the records.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Headers sent with every export; `${NAME}` reads the environment.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Records held for export; past this, new ones are dropped (and counted).
    #[serde(default = "default_audit_queue")]
    pub max_queue: usize,
    /// Longest a record waits before it is sent.
    #[serde(default = "default_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
}

fn default_audit_queue() -> usize {
    65_536
}

impl AuditOtlp {
    /// Checks the settings; the error is (the field at fault, why).
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_export("audit.otlp", &self.endpoint, &self.headers)?;
        if self.max_queue == 0 || self.max_queue > 1_000_000 {
            return Err((
                "audit.otlp.max_queue".into(),
                "must be between 1 and 1000000".into(),
            ));
        }
        if self.flush_interval.is_zero() || self.flush_interval > Duration::from_secs(60) {
            return Err((
                "audit.otlp.flush_interval".into(),
                "must be between 1ms and 60s".into(),
            ));
        }
        Ok(())
    }
}

/// A header value with `${NAME}` read from the environment.
pub fn header_value(value: &str) -> Result<String, String> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(var) => {
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))
        }
        None => Ok(value.to_owned()),
    }
}
