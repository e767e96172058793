//! The host names of a server's egress as a `CiliumNetworkPolicy` (`toFQDNs`), written when
//! the operator says the cluster runs Cilium: a NetworkPolicy cannot name hosts, Cilium can,
//! by watching the pod's DNS answers (which is why DNS goes through its proxy here).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::orchestrator::egress::EgressSpec;

/// The part of Cilium's `CiliumNetworkPolicy` (cilium.io/v2) the orchestrator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNetworkPolicy",
    namespaced,
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct CiliumNetworkPolicySpec {
    /// The pods it applies to.
    pub endpoint_selector: Selector,
    /// What they may reach.
    pub egress: Vec<EgressRule>,
}

/// Pods by label.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Labels they all carry.
    pub match_labels: BTreeMap<String, String>,
}

/// One allowed destination.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Pods (the cluster's resolver).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<Selector>,
    /// Host names.
    #[serde(rename = "toFQDNs", default, skip_serializing_if = "Vec::is_empty")]
    pub to_fqdns: Vec<Fqdn>,
    /// On which ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
}

/// A host name, exact or with a leading `*.`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Fqdn {
    /// An exact name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    /// A pattern (`*.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

/// Ports, and what is allowed on them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// The ports.
    pub ports: Vec<Port>,
    /// Layer-7 rules (DNS: which names the pod may look up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

/// A port and its protocol.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Port {
    /// The port number, as Cilium writes it (a string).
    pub port: String,
    /// `TCP`, `UDP` or `ANY`.
    pub protocol: String,
}

/// Layer-7 rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct L7Rules {
    /// DNS names the pod may look up.
    pub dns: Vec<DnsRule>,
}

/// A DNS name pattern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsRule {
    /// `*` for any name.
    pub match_pattern: String,
}

/// The policy for `egress`'s host rules (`None`: it names no host), on the pods `pod_labels`
/// select, with metadata `meta`. DNS to the cluster resolver goes through Cilium's proxy, so
/// that it learns the addresses behind each allowed name.
pub fn render(
    pod_labels: BTreeMap<String, String>,
    egress: &EgressSpec,
    meta: ObjectMeta,
) -> Option<CiliumNetworkPolicy> {
    if !egress.has_hosts() {
        return None;
    }
    let mut rules = vec![EgressRule {
        to_endpoints: vec![Selector {
            match_labels: BTreeMap::from([
                (
                    "k8s:io.kubernetes.pod.namespace".to_owned(),
                    "kube-system".to_owned(),
                ),
                ("k8s:k8s-app".to_owned(), "kube-dns".to_owned()),
            ]),
        }],
        to_ports: vec![PortRule {
            ports: vec![Port {
                port: "53".to_owned(),
                protocol: "ANY".to_owned(),
            }],
            rules: Some(L7Rules {
                dns: vec![DnsRule {
                    match_pattern: "*".to_owned(),
                }],
            }),
        }],
        ..Default::default()
    }];
    for rule in &egress.allow {
        let Some(host) = &rule.host else { continue };
        let fqdn = match host.starts_with("*.") {
            true => Fqdn {
                match_pattern: Some(host.clone()),
                match_name: None,
            },
            false => Fqdn {
                match_name: Some(host.clone()),
                match_pattern: None,
            },
        };
        let to_ports = match rule.ports.is_empty() {
            true => Vec::new(),
            false => vec![PortRule {
                ports: rule
                    .ports
                    .iter()
                    .map(|p| Port {
                        port: p.to_string(),
                        protocol: "TCP".to_owned(),
                    })
                    .collect(),
                rules: None,
            }],
        };
        rules.push(EgressRule {
            to_fqdns: vec![fqdn],
            to_ports,
            ..Default::default()
        });
    }
    let mut policy = CiliumNetworkPolicy::new(
        meta.name.as_deref().unwrap_or_default(),
        CiliumNetworkPolicySpec {
            endpoint_selector: Selector {
                match_labels: pod_labels,
            },
            egress: rules,
        },
    );
    policy.metadata = meta;
    Some(policy)
}
