//! OTLP/HTTP export with the JSON encoding: finished spans are batched (up to
//! [`MAX_BATCH`], or for at most the flush interval) and POSTed to the collector. A batch the
//! collector refuses or does not take in time is dropped and counted, never retried: the
//! request path never waits on the collector, and memory stays bounded by the queue.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::Full;
use serde_json::{Value, json};

use super::context::push_hex;
use super::{AttrValue, ExportQueue, SpanData};
use crate::config::traces::{TracesConfig, header_value};

/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Drains `queue` into the collector until every [`super::Tracer`] is gone, with the
/// gateway's HTTP client (its outbound TLS settings).
pub async fn export<C>(
    config: TracesConfig,
    mut queue: ExportQueue,
    client: hyper_util::client::legacy::Client<C, Full<Bytes>>,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let endpoint: http::Uri = match config.endpoint.parse() {
        Ok(u) => u,
        Err(_) => return, // validated with the configuration
    };
    let headers: Vec<(HeaderName, HeaderValue)> = config
        .headers
        .iter()
        .filter_map(|(k, v)| {
            let v = header_value(v).ok()?;
            Some((
                HeaderName::try_from(k).ok()?,
                HeaderValue::try_from(v).ok()?,
            ))
        })
        .collect();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let Some(first) = queue.spans.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + config.flush_interval;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, queue.spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = encode(&config.service_name, &batch);
        let mut req = Request::post(endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        req.headers_mut().extend(headers.iter().cloned());
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await;
        let failure = match sent {
            Ok(Ok(resp)) if resp.status().is_success() => None,
            Ok(Ok(resp)) => Some(format!("the collector answered {}", resp.status())),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        if let Some(why) = failure {
            queue.dropped.inc_by(batch.len() as u64);
            // One warning a minute, not one per batch, while the collector is down.
            let now = tokio::time::Instant::now();
            if last_warning.is_none_or(|t| now - t > Duration::from_secs(60)) {
                last_warning = Some(now);
                tracing::warn!(endpoint = %config.endpoint, "trace export failed, spans dropped: {why}");
            }
        }
        batch.clear();
    }
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding: ids in hex, 64-bit integers as
/// strings, enums as numbers.
pub fn encode(service_name: &str, spans: &[SpanData]) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(span_json).collect();
    let doc = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": service_name}},
                {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "gatehouse", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&doc).expect("JSON values serialize")
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn span_json(s: &SpanData) -> Value {
    let attributes: Vec<Value> = s
        .attributes
        .iter()
        .map(|(k, v)| {
            let value = match v {
                AttrValue::Str(t) => json!({"stringValue": t}),
                AttrValue::Int(n) => json!({"intValue": n.to_string()}),
            };
            json!({"key": k, "value": value})
        })
        .collect();
    let mut span = json!({
        "traceId": hex(&s.context.trace_id),
        "spanId": hex(&s.context.span_id),
        "name": s.name,
        "kind": s.kind as u8,
        "startTimeUnixNano": s.start_ns.to_string(),
        "endTimeUnixNano": s.end_ns.to_string(),
        "attributes": attributes,
        "status": match &s.error {
            None => json!({"code": 0}),
            Some(why) => json!({"code": 2, "message": why}),
        },
    });
    if let Some(p) = s.parent {
        span["parentSpanId"] = Value::String(hex(&p));
    }
    span
}
