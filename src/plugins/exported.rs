//! The plugins' counters ([`super::metrics`]) on the gateway's `/metrics`: Prometheus
//! counters labelled by plugin, read from their atomics at each scrape.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;

use super::metrics::MetricsSnapshot;
use super::reload::Plugins;

/// The plugins' counters as Prometheus counters labelled by plugin (`gatehouse_plugin_*`), read
/// from their atomics at each scrape.
pub struct Exported(pub Arc<Plugins>);

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exported")
    }
}

type Read = fn(&MetricsSnapshot) -> u64;

/// A plugin's name as a label value, escaped as the text format asks: the encoder writes
/// values as they are, and a name is whatever the configuration says (a quote or a line
/// break in it would otherwise end the series and start another, or break the page).
struct LabelText<'a>(&'a str);

impl EncodeLabelValue for LabelText<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0;
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Each counter family: name, help, and how to read it.
const FAMILIES: [(&str, &str, Read); 6] = [
    (
        "plugin_calls",
        "Hook calls, run by the plugin or answered with a kept decision",
        |m| m.calls,
    ),
    (
        "plugin_reused",
        "Hook calls answered with a kept decision, the plugin not run (reuse_decisions)",
        |m| m.reused,
    ),
    ("plugin_denials", "Hook calls that denied", |m| m.denials),
    ("plugin_rewrites", "Hook calls that rewrote", |m| m.rewrites),
    (
        "plugin_fail_open_skips",
        "Failed hook calls skipped (fail_open)",
        |m| m.fail_open_skips,
    ),
    (
        "plugin_instances",
        "Instances created (first load, after a fault, after recycling)",
        |m| m.instances,
    ),
];

impl Collector for Exported {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.current().metrics();
        for (name, help, read) in FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (plugin, m) in &counters {
                let labels = [("plugin", LabelText(plugin))];
                ConstCounter::new(read(m)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut faults = encoder.encode_descriptor(
            "plugin_faults",
            "Failed hook calls and instances, by kind",
            None,
            MetricType::Counter,
        )?;
        for (plugin, m) in &counters {
            for (kind, n) in [
                ("deadline", m.faults_deadline),
                ("memory", m.faults_memory),
                ("trap", m.faults_trap),
                ("malformed", m.faults_malformed),
                ("init", m.faults_init),
                ("unavailable", m.faults_unavailable),
            ] {
                let labels = [("plugin", LabelText(plugin)), ("kind", LabelText(kind))];
                ConstCounter::new(n).encode(faults.encode_family(&labels)?)?;
            }
        }
        let mut time = encoder.encode_descriptor(
            "plugin_call",
            "Time spent running hook calls",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for (plugin, m) in &counters {
            let labels = [("plugin", LabelText(plugin))];
            let seconds = m.call_nanos as f64 / 1e9;
            ConstCounter::new(seconds).encode(time.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_plugin_name_is_one_label_value_whatever_its_characters() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("gatehouse");
        let plugins = Plugins::new(super::super::PluginSet::empty());
        let odd = "a\"} 1\nforged_total 9\\";
        plugins
            .current()
            .shared
            .metrics_for(odd)
            .calls
            .fetch_add(3, Ordering::Relaxed);
        registry.register_collector(Box::new(Exported(plugins)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"gatehouse_plugin_calls_total{plugin="a\"} 1\nforged_total 9\\"} 3"#),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("forged")), "{text}");
    }
}
