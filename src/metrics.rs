//! Prometheus metrics: requests by method, server and outcome; latency; sessions; upstream health.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of one MCP request: every value is static so recording never allocates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// MCP method (known methods; anything else is `other`).
    pub method: &'static str,
    /// Upstream server name, or `gateway` for requests answered by the gateway itself.
    pub server: &'static str,
    /// `ok`, `error` (a JSON-RPC error from the server) or `failed` (the gateway could not complete it).
    pub outcome: &'static str,
}

/// Labels of a latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// MCP method.
    pub method: &'static str,
    /// Upstream server name.
    pub server: &'static str,
}

/// Labels naming one upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    /// Upstream server name.
    pub server: &'static str,
}

/// Labels of an HTTP response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status code.
    pub status: u16,
}

/// Labels naming a kind of long-lived client stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `get` (a session's GET stream), `listen` (`subscriptions/listen`) or `sse` (an
    /// HTTP+SSE client's stream).
    pub stream: &'static str,
}

/// All gateway metrics.
pub struct Metrics {
    registry: Registry,
    /// Spans lost before export (handed to the tracer).
    pub trace_spans_dropped: Counter,
    /// Audit lines lost before export to a collector (handed to the audit trail).
    pub audit_export_dropped: Counter,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    /// Open downstream sessions.
    pub sessions: Gauge,
    upstream_up: Family<ServerLabels, Gauge>,
    http_responses: Family<StatusLabels, Counter>,
    /// The series of the statuses most responses have, resolved on first use: the family's
    /// lookup (a lock and a SipHash) is not made per response.
    common_statuses: [std::sync::OnceLock<Counter>; COMMON_STATUSES.len()],
    tool_changes: Family<ServerLabels, Counter>,
    /// Tools whose definitions wait for an operator's approval (changed, or new).
    pub tools_unapproved: Gauge,
    wake_latency: Family<ServerLabels, Histogram>,
    asleep: Family<ServerLabels, Gauge>,
    asleep_seconds: Family<ServerLabels, Gauge>,
    wakes: Family<ServerLabels, Gauge>,
    streams_stalled: Family<StreamLabels, Counter>,
    credentials_refused: Family<ServerLabels, Counter>,
}

/// Statuses whose series [`Metrics::http_response`] keeps at hand.
const COMMON_STATUSES: [u16; 4] = [200, 202, 400, 404];

const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
];

/// Maps a method to a static label value, bounding label cardinality.
pub fn method_label(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// Outcomes of a request, as metric labels.
const OUTCOMES: [&str; 4] = ["ok", "error", "failed", "denied"];

/// The request metrics of one server, each (method, outcome) pair resolved once: recording is
/// then an atomic add and a histogram observation, not two family lookups (a lock and a hash
/// of every label) per call.
pub struct ServerMetrics {
    server: &'static str,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    /// By `method index * OUTCOMES.len() + outcome index`; the last method is "other".
    slots: Box<[OnceLock<(Counter, Histogram)>]>,
}

impl ServerMetrics {
    /// Counts one request of `method` (a [`method_label`]) that ended with `outcome`.
    pub fn record(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        let m = KNOWN_METHODS
            .iter()
            .position(|k| *k == method)
            .unwrap_or(KNOWN_METHODS.len());
        let (Some(o), true) = (
            OUTCOMES.iter().position(|k| *k == outcome),
            m < KNOWN_METHODS.len() || method == "other",
        ) else {
            // Not a label of ours: the families take it as it is.
            self.requests
                .get_or_create(&RequestLabels {
                    method,
                    server: self.server,
                    outcome,
                })
                .inc();
            self.latency
                .get_or_create(&LatencyLabels {
                    method,
                    server: self.server,
                })
                .observe(elapsed.as_secs_f64());
            return;
        };
        let (count, latency) = self.slots[m * OUTCOMES.len() + o].get_or_init(|| {
            let labels = RequestLabels {
                method,
                server: self.server,
                outcome,
            };
            let latency = LatencyLabels {
                method,
                server: self.server,
            };
            (
                self.requests.get_or_create(&labels).clone(),
                self.latency.get_or_create(&latency).clone(),
            )
        });
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        Self::with_collectors(Vec::new())
    }

    /// [`Self::new`], with families others keep, read at each scrape (the plugins' counters).
    pub fn with_collectors(
        collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("gatehouse");
        for collector in collectors {
            registry.register_collector(collector);
        }
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mcp_requests",
            "MCP requests by method, server and outcome",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        registry.register(
            "mcp_request_duration_seconds",
            "MCP request latency",
            latency.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions_active", "Open MCP sessions", sessions.clone());
        let upstream_up = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "upstream_up",
            "1 when the last attempt to reach the upstream succeeded, 0 when it failed",
            upstream_up.clone(),
        );
        let http_responses = Family::<StatusLabels, Counter>::default();
        registry.register(
            "http_responses",
            "HTTP responses by status",
            http_responses.clone(),
        );
        let credentials_refused = Family::<ServerLabels, Counter>::default();
        registry.register(
            "upstream_credentials_refused",
            "Requests an upstream refused (401, 403) for the caller's own credentials: the caller's failure, which leaves upstream_up as it was",
            credentials_refused.clone(),
        );
        let tool_changes = Family::<ServerLabels, Counter>::default();
        registry.register(
            "tool_definition_changes",
            "Tool definitions that differed from the approved one when the gateway saw them",
            tool_changes.clone(),
        );
        let tools_unapproved = Gauge::default();
        registry.register(
            "tools_unapproved",
            "Tools whose definition waits for approval (changed since approved, or new)",
            tools_unapproved.clone(),
        );
        let wake_latency = Family::<ServerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0])
        });
        registry.register(
            "server_wake_duration_seconds",
            "From a call finding an idle server asleep to the server ready",
            wake_latency.clone(),
        );
        let asleep = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "server_asleep",
            "1 while an idle server is stopped until the next call",
            asleep.clone(),
        );
        let asleep_seconds = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "server_asleep_seconds",
            "Seconds an idle-capable server has spent asleep since the gateway started",
            asleep_seconds.clone(),
        );
        let wakes = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "server_wakes",
            "Times an idle-capable server was woken since the gateway started",
            wakes.clone(),
        );
        let trace_spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: the queue was full or the collector failed",
            trace_spans_dropped.clone(),
        );
        let audit_export_dropped = Counter::default();
        registry.register(
            "audit_export_dropped",
            "Audit lines not shipped to the OTLP collector: the queue was full or the export failed (the trail itself has them)",
            audit_export_dropped.clone(),
        );
        let streams_stalled = Family::<StreamLabels, Counter>::default();
        registry.register(
            "streams_stalled",
            "Long-lived client streams ended because their reader took nothing while messages waited",
            streams_stalled.clone(),
        );
        Arc::new(Metrics {
            streams_stalled,
            credentials_refused,
            audit_export_dropped,
            trace_spans_dropped,
            tool_changes,
            tools_unapproved,
            registry,
            requests,
            latency,
            sessions,
            upstream_up,
            http_responses,
            common_statuses: Default::default(),
            wake_latency,
            asleep,
            asleep_seconds,
            wakes,
        })
    }

    /// Counts a long-lived stream of kind `stream` ended for its stalled reader.
    pub fn stream_stalled(&self, stream: &'static str) {
        self.streams_stalled
            .get_or_create(&StreamLabels { stream })
            .inc();
    }

    /// The counter of streams of kind `stream` ended for their stalled readers, for a task
    /// that counts them itself.
    pub fn stalled_streams(&self, stream: &'static str) -> Counter {
        self.streams_stalled
            .get_or_create(&StreamLabels { stream })
            .clone()
    }

    /// Records how long a call waited for a sleeping server to wake.
    pub fn record_wake(&self, server: &'static str, elapsed: Duration) {
        self.wake_latency
            .get_or_create(&ServerLabels { server })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets an idle-capable server's sleep figures (at scrape time).
    pub fn set_sleep(&self, server: &'static str, asleep: bool, slept: Duration, wakes: u64) {
        let labels = ServerLabels { server };
        self.asleep.get_or_create(&labels).set(i64::from(asleep));
        self.asleep_seconds
            .get_or_create(&labels)
            .set(i64::try_from(slept.as_secs()).unwrap_or(i64::MAX));
        self.wakes
            .get_or_create(&labels)
            .set(i64::try_from(wakes).unwrap_or(i64::MAX));
    }

    /// Records one finished MCP request.
    pub fn record(
        &self,
        method: &'static str,
        server: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                server,
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels { method, server })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets an upstream's health.
    /// The request metrics of `server`, with handles resolved as they are first used.
    pub fn server(&self, server: &'static str) -> ServerMetrics {
        ServerMetrics {
            server,
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            slots: (0..(KNOWN_METHODS.len() + 1) * OUTCOMES.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    pub fn set_upstream_up(&self, server: &'static str, up: bool) {
        self.upstream_up
            .get_or_create(&ServerLabels { server })
            .set(i64::from(up));
    }

    /// Counts a request `server` refused for the caller's own credentials.
    pub fn credentials_refused(&self, server: &'static str) {
        self.credentials_refused
            .get_or_create(&ServerLabels { server })
            .inc();
    }

    /// Counts a tool definition seen changed.
    pub fn tool_changed(&self, server: &'static str) {
        self.tool_changes
            .get_or_create(&ServerLabels { server })
            .inc();
    }

    /// Counts an HTTP response.
    pub fn http_response(&self, status: u16) {
        let family = || self.http_responses.get_or_create(&StatusLabels { status });
        match COMMON_STATUSES.iter().position(|s| *s == status) {
            // A clone shares the series' value.
            Some(i) => self.common_statuses[i]
                .get_or_init(|| family().clone())
                .inc(),
            None => family().inc(),
        };
    }

    /// Renders the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn responses_count_by_status_kept_at_hand_or_not_and_only_statuses_seen_show() {
        let m = Metrics::new();
        m.http_response(200);
        m.http_response(200);
        m.http_response(503);
        let text = m.render();
        let count = |status: u16| {
            line(
                &text,
                &format!("gatehouse_http_responses_total{{status=\"{status}\"}}"),
            )
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(count(200).as_deref(), Some("2"), "{text}");
        assert_eq!(count(503).as_deref(), Some("1"), "{text}");
        assert_eq!(
            count(404),
            None,
            "a status kept at hand shows once seen: {text}"
        );
    }

    #[test]
    fn handles_count_into_the_same_series_as_the_families() {
        let m = Metrics::new();
        let a = m.server("a");
        let again = m.server("a");
        for _ in 0..3 {
            a.record("tools/call", "ok", Duration::from_micros(50));
        }
        again.record("tools/call", "ok", Duration::from_micros(50));
        a.record("tools/call", "denied", Duration::from_micros(50));
        // Labels that are not ours still count, through the families.
        a.record("custom", "odd", Duration::from_micros(50));
        let text = m.render();
        let series = |labels: &str| {
            line(&text, &format!("gatehouse_mcp_requests_total{{{labels}}}"))
                .unwrap_or_else(|| panic!("no series {labels} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            series(r#"method="tools/call",server="a",outcome="ok""#),
            "4"
        );
        assert_eq!(
            series(r#"method="tools/call",server="a",outcome="denied""#),
            "1"
        );
        assert_eq!(series(r#"method="custom",server="a",outcome="odd""#), "1");
        let count = line(
            &text,
            r#"gatehouse_mcp_request_duration_seconds_count{method="tools/call",server="a"}"#,
        )
        .unwrap();
        assert!(count.ends_with(" 5"), "{count}");
    }
}
