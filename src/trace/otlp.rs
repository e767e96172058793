//! Spans in OTLP's JSON encoding, sent by [`crate::otlp::export`].

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};

use super::context::push_hex;
use super::{AttrValue, ExportQueue, SpanData};
use crate::config::traces::TracesConfig;

/// Drains `queue` into the collector until every [`super::Tracer`] is gone, with the
/// gateway's HTTP client (its outbound TLS settings).
pub async fn export<C>(
    config: TracesConfig,
    queue: ExportQueue,
    client: hyper_util::client::legacy::Client<C, Full<Bytes>>,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let Some(target) = crate::otlp::Target::new(
        &config.endpoint,
        &config.headers,
        config.flush_interval,
        "spans",
    ) else {
        return;
    };
    let service = config.service_name.clone();
    crate::otlp::export(target, queue.spans, queue.dropped, client, move |spans| {
        encode(&service, spans)
    })
    .await;
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding: ids in hex, 64-bit integers as
/// strings, enums as numbers.
pub fn encode(service_name: &str, spans: &[SpanData]) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(span_json).collect();
    let doc = json!({
        "resourceSpans": [{
            "resource": crate::otlp::resource(service_name),
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
