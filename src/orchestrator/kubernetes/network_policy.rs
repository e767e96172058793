//! A server's egress policy as a NetworkPolicy selecting its pod: egress only, everything
//! not allowed denied. NetworkPolicies add up, so this one restricts the pod only where no
//! other policy of the namespace allows more (deploy/ ships an ingress-only one).

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use std::collections::BTreeMap;

use super::policy::PodPolicy;
use crate::orchestrator::egress::{EgressPreset, EgressSpec, PRIVATE_V4, PRIVATE_V6};

/// The NetworkPolicy enforcing `egress` on the pods `pod_labels` select, with metadata `meta`;
/// host rules are left to a CiliumNetworkPolicy where the operator runs Cilium.
pub fn render(
    pod_labels: BTreeMap<String, String>,
    egress: &EgressSpec,
    meta: ObjectMeta,
    policy: &PodPolicy,
) -> NetworkPolicy {
    let cilium = policy.cilium;
    let public = |ports: &[u16]| public(ports, &policy.egress_except);
    let mut rules = Vec::new();
    if egress.needs_dns() {
        rules.push(dns());
    }
    if egress.preset == EgressPreset::DnsAndHttps {
        rules.push(public(&[443]));
    }
    for rule in egress
        .allow
        .iter()
        .filter(|r| !(cilium && r.host.is_some()))
    {
        rules.push(match (&rule.cidr, &rule.host) {
            (Some(cidr), _) => NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: cidr.clone(),
                        except: None,
                    }),
                    ..Default::default()
                }]),
                ports: tcp(&rule.ports),
            },
            // A NetworkPolicy knows no names: a host's ports are open to public addresses
            // (never private, cluster or metadata ones).
            _ => public(&rule.ports),
        });
    }
    NetworkPolicy {
        metadata: meta,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(pod_labels),
                ..Default::default()
            }),
            policy_types: Some(vec!["Egress".to_owned()]),
            egress: Some(rules),
            ingress: None,
        }),
    }
}

/// DNS to the cluster's resolver (`k8s-app: kube-dns` in `kube-system`, where no one else
/// can label a pod so), UDP and TCP.
fn dns() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [(
                        "kubernetes.io/metadata.name".to_owned(),
                        "kube-system".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some([("k8s-app".to_owned(), "kube-dns".to_owned())].into()),
                ..Default::default()
            }),
            ip_block: None,
        }]),
        ports: Some(
            ["UDP", "TCP"]
                .into_iter()
                .map(|protocol| NetworkPolicyPort {
                    protocol: Some(protocol.to_owned()),
                    port: Some(IntOrString::Int(53)),
                    end_port: None,
                })
                .collect(),
        ),
    }
}

/// Every public address (IPv4 and IPv6; private, cluster and metadata ranges excepted, and
/// the operator's `also_except`) on TCP `ports` (none: every port and protocol).
fn public(ports: &[u16], also_except: &[String]) -> NetworkPolicyEgressRule {
    let block = |cidr: &str, except: &[&str], v4: bool| {
        let extra = also_except
            .iter()
            .filter(|e| e.contains('.') == v4)
            .cloned();
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.to_owned(),
                except: Some(
                    except
                        .iter()
                        .map(|s| (*s).to_owned())
                        .chain(extra)
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    };
    NetworkPolicyEgressRule {
        to: Some(vec![
            block("0.0.0.0/0", &PRIVATE_V4, true),
            block("::/0", &PRIVATE_V6, false),
        ]),
        ports: tcp(ports),
    }
}

fn tcp(ports: &[u16]) -> Option<Vec<NetworkPolicyPort>> {
    (!ports.is_empty()).then(|| {
        ports
            .iter()
            .map(|p| NetworkPolicyPort {
                protocol: Some("TCP".to_owned()),
                port: Some(IntOrString::Int(i32::from(*p))),
                end_port: None,
            })
            .collect()
    })
}
