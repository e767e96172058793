//! OTLP/HTTP export with the JSON encoding, shared by traces and the audit trail: items are
//! batched (up to [`MAX_BATCH`], or for at most the flush interval) and POSTed to a collector.
//! A batch the collector refuses or does not take in time is dropped and counted, never
//! retried: nothing on the request path waits on the collector, and memory stays bounded by
//! the queue that feeds the exporter.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::Full;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// Most items in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how often to send.
pub struct Target {
    /// The collector's URL for this signal (`/v1/traces`, `/v1/logs`).
    pub endpoint: http::Uri,
    /// Headers of every export (an API key).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Longest an item waits before it is sent.
    pub flush_interval: Duration,
    /// What is sent, for the warning when the collector fails (`spans`, `audit records`).
    pub what: &'static str,
}

impl Target {
    /// The target of a configured endpoint (validated with the configuration; None if it no
    /// longer parses) with its headers.
    pub fn new(
        endpoint: &str,
        headers: &std::collections::BTreeMap<String, String>,
        flush_interval: Duration,
        what: &'static str,
    ) -> Option<Target> {
        Some(Target {
            endpoint: endpoint.parse().ok()?,
            headers: self::headers(headers),
            flush_interval,
            what,
        })
    }
}

/// Drains `items` into the collector until every sender is gone: `encode` makes one export
/// request's body of a batch; `dropped` counts items lost to a failed export.
pub async fn export<T, C>(
    target: Target,
    mut items: mpsc::Receiver<T>,
    dropped: Counter,
    client: hyper_util::client::legacy::Client<C, Full<Bytes>>,
    encode: impl Fn(&[T]) -> Vec<u8>,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let Some(first) = items.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + target.flush_interval;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, items.recv()).await {
                Ok(Some(item)) => batch.push(item),
                Ok(None) | Err(_) => break,
            }
        }
        let mut req = Request::post(target.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(encode(&batch))))
            .expect("a valid request");
        req.headers_mut().extend(target.headers.iter().cloned());
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await;
        let failure = match sent {
            Ok(Ok(resp)) if resp.status().is_success() => None,
            Ok(Ok(resp)) => Some(format!("the collector answered {}", resp.status())),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        if let Some(why) = failure {
            dropped.inc_by(batch.len() as u64);
            // One warning a minute, not one per batch, while the collector is down.
            let now = tokio::time::Instant::now();
            if last_warning.is_none_or(|t| now - t > Duration::from_secs(60)) {
                last_warning = Some(now);
                tracing::warn!(endpoint = %target.endpoint, "OTLP export of {} failed, dropped: {why}", target.what);
            }
        }
        batch.clear();
    }
}

/// Header pairs from the configuration (`${NAME}` read from the environment; validated with
/// the configuration, so a pair that fails now is skipped).
pub fn headers(
    pairs: &std::collections::BTreeMap<String, String>,
) -> Vec<(HeaderName, HeaderValue)> {
    pairs
        .iter()
        .filter_map(|(k, v)| {
            let v = crate::config::traces::header_value(v).ok()?;
            let mut v = HeaderValue::try_from(v).ok()?;
            v.set_sensitive(true);
            Some((HeaderName::try_from(k).ok()?, v))
        })
        .collect()
}

/// `service.name` and `service.version` as an OTLP resource.
pub fn resource(service_name: &str) -> serde_json::Value {
    serde_json::json!({"attributes": [
        {"key": "service.name", "value": {"stringValue": service_name}},
        {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
    ]})
}
