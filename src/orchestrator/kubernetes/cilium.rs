//! The host names of a server's egress as a `CiliumNetworkPolicy` (`toFQDNs`), written when
//! the operator says the cluster runs Cilium: a NetworkPolicy cannot name hosts, Cilium can,
//! by watching the pod's DNS answers (which is why DNS goes through its proxy here). Whoever
//! controls a name controls what it resolves to, so the policy also denies the ranges the
//! NetworkPolicy's "public" excepts (`egressDeny`, which wins over every allow).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

use crate::orchestrator::egress::{EgressSpec, PRIVATE_V4, PRIVATE_V6, contains, parse_cidr};

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
    /// What they may not reach, whatever any policy allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<EgressDenyRule>,
}

/// Destinations denied.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressDenyRule {
    /// Address ranges (outside the cluster: Cilium matches pods and nodes by identity).
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Vec::is_empty")]
    pub to_cidr_set: Vec<CidrRule>,
}

/// An address range, less some ranges inside it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CidrRule {
    /// The range.
    pub cidr: String,
    /// Ranges inside it left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
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
/// that it learns the addresses behind each allowed name; a name never reaches private,
/// cluster or metadata ranges, nor the operator's `also_except`.
pub fn render(
    pod_labels: BTreeMap<String, String>,
    egress: &EgressSpec,
    meta: ObjectMeta,
    also_except: &[String],
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
            // No rule when nothing is left to deny: Cilium reads a rule naming no peer
            // its own way.
            egress_deny: Some(denied(egress, also_except))
                .filter(|set| !set.is_empty())
                .map(|to_cidr_set| EgressDenyRule { to_cidr_set })
                .into_iter()
                .collect(),
        },
    );
    policy.metadata = meta;
    Some(policy)
}

/// The ranges no host name may reach: those the NetworkPolicy's "public" excepts. A deny
/// wins over every allow, the NetworkPolicy's included, so each leaves out the definition's
/// own `cidr` rules (which admission already held to the operator's private ranges), and a
/// range such a rule holds whole is not denied at all.
fn denied(egress: &EgressSpec, also_except: &[String]) -> Vec<CidrRule> {
    let named: Vec<(&str, _)> = egress
        .allow
        .iter()
        .filter_map(|r| r.cidr.as_deref())
        .filter_map(|c| parse_cidr(c).ok().map(|range| (c, range)))
        .collect();
    let mut out: Vec<CidrRule> = Vec::new();
    for cidr in PRIVATE_V4
        .iter()
        .chain(PRIVATE_V6.iter())
        .copied()
        .chain(also_except.iter().map(String::as_str))
    {
        let Ok(range) = parse_cidr(cidr) else {
            continue;
        };
        if out.iter().any(|r| r.cidr == cidr) || named.iter().any(|(_, n)| contains(*n, range)) {
            continue;
        }
        let mut except: Vec<String> = Vec::new();
        for (c, _) in named.iter().filter(|(_, n)| contains(range, *n)) {
            if !except.iter().any(|e| e == c) {
                except.push((*c).to_owned());
            }
        }
        out.push(CidrRule {
            cidr: cidr.to_owned(),
            except,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::egress::{EgressPreset, EgressRule as Rule};

    fn spec(rules: &[(&str, &str)]) -> EgressSpec {
        EgressSpec {
            preset: EgressPreset::None,
            allow: rules
                .iter()
                .map(|(kind, v)| Rule {
                    cidr: (*kind == "cidr").then(|| (*v).to_owned()),
                    host: (*kind == "host").then(|| (*v).to_owned()),
                    ports: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn host_names_never_reach_private_ranges_the_definition_does_not_name() {
        let cnp = |rules: &[(&str, &str)], also: &[&str]| {
            let also: Vec<String> = also.iter().map(|s| (*s).to_owned()).collect();
            render(BTreeMap::new(), &spec(rules), ObjectMeta::default(), &also)
        };
        assert!(cnp(&[("cidr", "203.0.113.0/24")], &[]).is_none());
        let deny = |p: Option<CiliumNetworkPolicy>| {
            let rules = p.unwrap().spec.egress_deny;
            assert_eq!(rules.len(), 1);
            rules[0].to_cidr_set.clone()
        };
        let cidrs = |set: &[CidrRule]| set.iter().map(|r| r.cidr.clone()).collect::<Vec<_>>();
        // Every range the NetworkPolicy's "public" excepts, and the operator's own.
        let set = deny(cnp(
            &[("host", "169.254.169.254.nip.io")],
            &["198.51.100.7/32"],
        ));
        let mut all: Vec<String> = PRIVATE_V4
            .iter()
            .chain(PRIVATE_V6.iter())
            .map(|s| (*s).to_owned())
            .collect();
        all.push("198.51.100.7/32".into());
        assert_eq!(cidrs(&set), all);
        assert!(set.iter().all(|r| r.except.is_empty()));
        // A range the definition names (admitted by the operator) stays reachable: left out
        // of the range around it, or not denied at all when it holds that range whole.
        let set = deny(cnp(
            &[
                ("host", "a.example"),
                ("cidr", "10.9.0.0/16"),
                ("cidr", "10.9.0.0/16"),
                ("cidr", "172.16.0.0/12"),
            ],
            &[],
        ));
        let ten = set.iter().find(|r| r.cidr == "10.0.0.0/8").unwrap();
        assert_eq!(ten.except, ["10.9.0.0/16"]);
        assert!(!cidrs(&set).contains(&"172.16.0.0/12".to_owned()));
        assert!(cidrs(&set).contains(&"169.254.0.0/16".to_owned()));
        // A definition the operator let name everything: no empty deny rule.
        let all = cnp(
            &[
                ("host", "a.example"),
                ("cidr", "0.0.0.0/0"),
                ("cidr", "::/0"),
            ],
            &[],
        );
        assert!(all.unwrap().spec.egress_deny.is_empty());
    }
}
