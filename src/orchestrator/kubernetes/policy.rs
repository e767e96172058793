//! What a server definition may ask of the cluster. The operator decides, not the definition:
//! anyone who can write an `McpServer` resource or call the admin API must not gain the
//! gateway's service account, a token the operator did not allow, or unbounded resources.

use std::collections::{BTreeMap, BTreeSet};

use crate::orchestrator::egress::{
    EgressPreset, EgressSpec, contains, overlaps, parse_cidr, private_overlap, unmapped,
};
use crate::orchestrator::spec::{ResolvedServer, SpecError};

/// Service account of the gateway in `deploy/base/serviceaccount.yaml`: never given to a server.
pub const DEPLOYED_GATEWAY_ACCOUNT: &str = "gatehouse";
/// Where the kubelet mounts the gateway's own token in its pod.
pub const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The operator's rules for server pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    /// Accounts a definition may name in `serviceAccountName` (besides [`Self::default_account`]).
    pub allowed_accounts: BTreeSet<String>,
    /// Account of a pod whose definition names none.
    pub default_account: String,
    /// Whether a pod running as an allowed account may mount its token.
    pub allow_token_mount: bool,
    /// Accounts no server may run as: the gateway's own.
    pub forbidden_accounts: BTreeSet<String>,
    /// Requests of a resource the definition sets neither a request nor a limit for.
    pub default_requests: BTreeMap<String, String>,
    /// Limits of a resource the definition sets no limit for.
    pub default_limits: BTreeMap<String, String>,
    /// `sizeLimit` of the pod's `/tmp` emptyDir.
    pub tmp_size_limit: String,
    /// Egress of a server whose definition declares none (`None`: no policy of its own).
    pub default_egress: Option<EgressPreset>,
    /// The cluster runs Cilium: host names in egress rules are enforced by a
    /// CiliumNetworkPolicy (`toFQDNs`) rather than opened to public addresses.
    pub cilium: bool,
    /// Private, cluster or metadata ranges a definition's egress may name (a `cidr` rule
    /// that reaches any such address must lie inside one of these).
    pub egress_private_cidrs: Vec<String>,
    /// More ranges "public" excludes, besides the private ones: the cluster's own public
    /// addresses (API server, nodes, load balancers).
    pub egress_except: Vec<String>,
}

impl Default for PodPolicy {
    fn default() -> Self {
        PodPolicy {
            allowed_accounts: BTreeSet::new(),
            default_account: "default".into(),
            allow_token_mount: false,
            forbidden_accounts: BTreeSet::from([DEPLOYED_GATEWAY_ACCOUNT.to_string()]),
            default_requests: BTreeMap::from([
                ("cpu".into(), "50m".into()),
                ("memory".into(), "64Mi".into()),
            ]),
            default_limits: BTreeMap::from([
                ("cpu".into(), "1".into()),
                ("memory".into(), "512Mi".into()),
            ]),
            tmp_size_limit: "64Mi".into(),
            default_egress: None,
            cilium: false,
            egress_private_cidrs: Vec::new(),
            egress_except: Vec::new(),
        }
    }
}

impl PodPolicy {
    /// Refuses a remote URL that reaches the cluster's insides or private, metadata or
    /// loopback addresses the operator did not allow (the gateway's pod connects to it, with
    /// none of a server pod's egress policy): a literal address must lie in the operator's
    /// `egress_private_cidrs`, and a cluster name (no dot, `.svc`, `.cluster.local`,
    /// `.internal`, `localhost`) is never a remote (such a server runs as a pod here).
    fn admit_remote(&self, url: &str) -> Result<(), SpecError> {
        let refuse = |message: String| SpecError {
            field: "remote.url".into(),
            message,
        };
        let uri: http::Uri = url.parse().map_err(|_| refuse("is not a URL".into()))?;
        let host = uri.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => self.remote_address(ip).map_err(refuse)?,
            Err(_) => {
                let name = bare.trim_end_matches('.').to_ascii_lowercase();
                let inside = !name.contains('.')
                    || [".svc", ".cluster.local", ".internal", ".localhost"]
                        .iter()
                        .any(|s| name.ends_with(s));
                if inside {
                    return Err(refuse(format!(
                        "{name} names something inside the cluster or this host: run such a server as a pod, not a remote"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses an address a remote's host is (or resolves to) when it is private, cluster,
    /// metadata or loopback and outside the operator's `egress_private_cidrs`, or in the
    /// cluster's own public ranges (`egress_except`), which no server pod may reach either.
    pub fn remote_address(&self, ip: std::net::IpAddr) -> Result<(), String> {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        if ip.is_unspecified() {
            // `::` and `0.0.0.0` reach this pod's own ports.
            return Err(format!("{ip} is this host (unspecified)"));
        }
        let range = (ip, if ip.is_ipv4() { 32 } else { 128 });
        let allowed = |cidrs: &[String]| {
            cidrs
                .iter()
                .filter_map(|a| parse_cidr(a).ok())
                .any(|a| contains(a, range))
        };
        if allowed(&self.egress_except) && !allowed(&self.egress_private_cidrs) {
            return Err(format!(
                "{ip} is one of the cluster's own addresses the operator excepts from public egress (GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT)"
            ));
        }
        match private_overlap(range) {
            Some(private)
                if !self
                    .egress_private_cidrs
                    .iter()
                    .filter_map(|a| parse_cidr(a).ok())
                    .any(|a| contains(a, range)) =>
            {
                Err(format!(
                    "{ip} is a private, cluster or metadata address ({private}) the operator does not allow (GATEHOUSE_ORCHESTRATOR_EGRESS_PRIVATE_CIDRS)"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a `cidr` rule that reaches private, cluster or metadata addresses the operator
    /// did not allow, or the cluster's own public ones (`egress_except`): a definition (an
    /// `McpServer`, the admin API) must not open the way to the cloud's credentials or the
    /// cluster's insides.
    fn admit_egress(&self, egress: &EgressSpec) -> Result<(), SpecError> {
        for (i, rule) in egress.allow.iter().enumerate() {
            let Some(range) = rule.cidr.as_deref().and_then(|c| parse_cidr(c).ok()) else {
                continue;
            };
            let allowed = self
                .egress_private_cidrs
                .iter()
                .filter_map(|a| parse_cidr(a).ok())
                .any(|a| contains(a, range));
            let cidr = rule.cidr.as_deref().unwrap_or_default();
            if let Some(private) = private_overlap(range)
                && !allowed
            {
                return Err(SpecError {
                    field: format!("egress.allow[{i}].cidr"),
                    message: format!(
                        "{cidr} reaches private, cluster or metadata addresses ({private}); the operator allows {} (GATEHOUSE_ORCHESTRATOR_EGRESS_PRIVATE_CIDRS)",
                        if self.egress_private_cidrs.is_empty() {
                            "none".to_owned()
                        } else {
                            self.egress_private_cidrs.join(", ")
                        }
                    ),
                });
            }
            // The cluster's own public addresses (its API server, nodes, load balancers) are
            // held back from every server pod, and the `ipBlock` a rule becomes carries no
            // exceptions: a rule reaching any of them is refused, as a remote there is.
            if !allowed
                && let Some(own) = self
                    .egress_except
                    .iter()
                    .find(|e| parse_cidr(e).is_ok_and(|e| overlaps(e, unmapped(range))))
            {
                return Err(SpecError {
                    field: format!("egress.allow[{i}].cidr"),
                    message: format!(
                        "{cidr} reaches {own}, one of the cluster's own addresses the operator excepts from public egress (GATEHOUSE_ORCHESTRATOR_EGRESS_EXCEPT)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The egress a server gets: its own, else the operator's default preset.
    pub fn egress(&self, server: &ResolvedServer) -> Option<EgressSpec> {
        server.spec.egress.clone().or_else(|| {
            self.default_egress.map(|preset| EgressSpec {
                preset,
                allow: Vec::new(),
            })
        })
    }
}

/// Whether `s` is a DNS subdomain (the form of a service account name).
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The service account named by a token's `sub` claim (`system:serviceaccount:NS:NAME`).
pub fn account_of_token(jwt: &str) -> Option<String> {
    use base64::Engine;
    let payload = jwt.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    let mut parts = sub.strip_prefix("system:serviceaccount:")?.split(':');
    let (_ns, name) = (parts.next()?, parts.next()?);
    Some(name.to_string())
}

impl PodPolicy {
    /// Checks the operator's own settings: an account both allowed and the gateway's is a mistake.
    pub fn validate(&self) -> Result<(), String> {
        for a in self.allowed_accounts.iter().chain([&self.default_account]) {
            if !is_dns_subdomain(a) {
                return Err(format!("{a:?} is not a service account name"));
            }
            if self.forbidden_accounts.contains(a) {
                return Err(format!(
                    "{a:?} is the gateway's own service account: servers never run as it"
                ));
            }
        }
        Ok(())
    }

    /// Checks a definition against what this backend and the operator allow (every
    /// definition passes here before anything is applied); returns the account its pod runs as.
    pub fn admit(&self, server: &ResolvedServer) -> Result<String, SpecError> {
        let spec = &server.spec;
        if !spec.sharing.is_shared() {
            return Err(SpecError {
                field: "sharing".into(),
                message: format!(
                    "{} needs the local backend: on Kubernetes a server is one shared pod",
                    spec.sharing
                ),
            });
        }
        let err = |field: &str, message: String| SpecError {
            field: field.into(),
            message,
        };
        if let Some(egress) = &spec.egress {
            self.admit_egress(egress)?;
        }
        if let Some(remote) = &spec.remote {
            self.admit_remote(&remote.url)?;
        }
        let account = match spec.service_account_name.as_deref() {
            None => self.default_account.clone(),
            Some(a) if !is_dns_subdomain(a) => {
                return Err(err(
                    "serviceAccountName",
                    format!("{a:?} is not a service account name"),
                ));
            }
            Some(a) if self.forbidden_accounts.contains(a) => {
                return Err(err(
                    "serviceAccountName",
                    format!("{a:?} is the gateway's own service account"),
                ));
            }
            Some(a) if a != self.default_account && !self.allowed_accounts.contains(a) => {
                return Err(err(
                    "serviceAccountName",
                    format!(
                        "{a:?} is not allowed by the operator (allowed: {:?})",
                        self.allowed_accounts
                    ),
                ));
            }
            Some(a) => a.to_string(),
        };
        if self.forbidden_accounts.contains(&account) {
            return Err(err(
                "serviceAccountName",
                format!(
                    "the default account {account:?} is the gateway's own; name an allowed account"
                ),
            ));
        }
        if spec.automount_service_account_token
            && !(self.allow_token_mount && self.allowed_accounts.contains(&account))
        {
            return Err(err(
                "automountServiceAccountToken",
                format!(
                    "the operator does not allow mounting the token of {account:?} (it needs token mounting on and the account in the allowed list)"
                ),
            ));
        }
        Ok(account)
    }

    /// The definition's resources completed with the operator's defaults, so no pod is unbounded.
    ///
    /// Per resource: a missing limit is the definition's request when it gives one (never
    /// below the request), else the default limit; a missing request stays missing when a
    /// limit was given (Kubernetes then requests the limit), else it is the default request.
    pub fn resources(
        &self,
        server: &ResolvedServer,
    ) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let (mut requests, mut limits) = server
            .spec
            .resources
            .as_ref()
            .map(|r| (r.requests.clone(), r.limits.clone()))
            .unwrap_or_default();
        for (k, limit) in &self.default_limits {
            if limits.contains_key(k) {
                continue;
            }
            match requests.get(k) {
                Some(req) => limits.insert(k.clone(), req.clone()),
                None => {
                    if let Some(req) = self.default_requests.get(k) {
                        requests.insert(k.clone(), req.clone());
                    }
                    limits.insert(k.clone(), limit.clone())
                }
            };
        }
        (requests, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::spec::ServerDef;

    fn server(yaml: &str) -> ResolvedServer {
        serde_saphyr::from_str::<ServerDef>(yaml)
            .unwrap()
            .resolve_declared()
            .unwrap()
    }

    #[test]
    fn a_remote_reaches_neither_the_cluster_nor_private_addresses_unless_allowed() {
        let mut p = PodPolicy::default();
        let remote = |url: &str| server(&format!("name: a\nremote: {{ url: '{url}' }}"));
        assert!(p.admit(&remote("https://mcp.example.com/mcp")).is_ok());
        assert!(p.admit(&remote("https://93.184.216.34/mcp")).is_ok());
        // A metadata address is no remote anywhere: refused with the definition itself.
        let metadata = serde_saphyr::from_str::<ServerDef>(
            "name: a\nremote: { url: 'http://[fd00:ec2::254]/mcp' }",
        )
        .unwrap();
        assert!(metadata.resolve_declared().is_err());
        for url in [
            "http://10.1.2.3:8080/mcp",
            "http://127.0.0.1:9000/mcp",
            "http://[::1]:9000/mcp",
            "http://[::ffff:10.0.0.1]/mcp",
            "https://kubernetes.default.svc/api",
            "http://mcp-other.mcp.svc.cluster.local:8080/mcp",
            "http://gatehouse:9000/mcp",
            "http://localhost:9000/mcp",
            "http://metadata.google.internal/computeMetadata/v1",
        ] {
            let e = p.admit(&remote(url)).unwrap_err();
            assert_eq!(e.field, "remote.url", "{url}: {e}");
        }
        // What a name resolves to is checked the same way; `::` is this pod.
        for ip in [
            "::",
            "0.0.0.0",
            "10.0.0.1",
            "169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(p.remote_address(ip.parse().unwrap()).is_err(), "{ip}");
        }
        assert!(p.remote_address("93.184.216.34".parse().unwrap()).is_ok());
        // The operator's private ranges are allowed, and only those.
        p.egress_private_cidrs = vec!["10.1.0.0/16".into()];
        assert!(p.admit(&remote("http://10.1.2.3:8080/mcp")).is_ok());
        assert!(p.admit(&remote("http://10.2.0.1:8080/mcp")).is_err());
        // The cluster's own public addresses (its API server, nodes, load balancers) are no
        // remote's, as they are no server pod's to reach.
        p.egress_except = vec!["203.0.113.0/24".into()];
        let e = p.admit(&remote("https://203.0.113.7/mcp")).unwrap_err();
        assert!(e.message.contains("EGRESS_EXCEPT"), "{e}");
        assert!(p.remote_address("203.0.113.9".parse().unwrap()).is_err());
        assert!(
            p.remote_address("::ffff:203.0.113.9".parse().unwrap())
                .is_err()
        );
        assert!(p.remote_address("203.0.114.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn an_ipv4_mapped_range_is_checked_as_the_ipv4_range_it_is() {
        let mut p = PodPolicy::default();
        // The definition's own check refuses such a range; admission does not rely on it.
        let mut s = server("name: a\nimage: x");
        for cidr in [
            "::ffff:0.0.0.0/96",
            "::ffff:169.254.169.254/128",
            "::ffff:10.0.0.0/104",
        ] {
            s.spec.egress = Some(EgressSpec {
                preset: EgressPreset::None,
                allow: vec![crate::orchestrator::egress::EgressRule {
                    cidr: Some(cidr.into()),
                    ..Default::default()
                }],
            });
            let e = p.admit(&s).unwrap_err();
            assert_eq!(e.field, "egress.allow[0].cidr", "{cidr}: {e}");
            assert!(e.message.contains("private"), "{cidr}: {e}");
        }
        // An operator's IPv4 range does not open its mapped form either.
        p.egress_private_cidrs = vec!["10.0.0.0/8".into()];
        assert!(p.admit(&s).is_err());
    }

    /// A `cidr` rule reaching the cluster's own public addresses is refused: the `ipBlock` it
    /// becomes would let the pod reach them, which no server pod may.
    #[test]
    fn an_egress_rule_reaching_the_clusters_own_addresses_is_refused() {
        let p = PodPolicy {
            egress_except: vec!["203.0.113.10/32".into()],
            ..PodPolicy::default()
        };
        let with = |cidr: &str| {
            let mut s = server("name: a\nimage: x");
            s.spec.egress = Some(EgressSpec {
                preset: EgressPreset::None,
                allow: vec![crate::orchestrator::egress::EgressRule {
                    cidr: Some(cidr.into()),
                    ..Default::default()
                }],
            });
            s
        };
        for cidr in [
            "203.0.113.10/32",
            "203.0.113.0/24",
            "203.0.0.0/8",
            "::ffff:203.0.113.0/120",
        ] {
            let e = p.admit(&with(cidr)).unwrap_err();
            assert_eq!(e.field, "egress.allow[0].cidr", "{cidr}: {e}");
            assert!(e.message.contains("EGRESS_EXCEPT"), "{cidr}: {e}");
        }
        // Beside them, a public range is the definition's to open.
        assert!(p.admit(&with("203.0.113.11/32")).is_ok());
        assert!(p.admit(&with("198.51.100.0/24")).is_ok());
    }

    #[test]
    fn accounts_are_the_operators_choice() {
        let mut p = PodPolicy::default();
        let field = |p: &PodPolicy, yaml: &str| p.admit(&server(yaml)).unwrap_err().field;
        assert_eq!(p.admit(&server("name: a\nimage: x")).unwrap(), "default");
        assert_eq!(
            field(&p, "name: a\nimage: x\nserviceAccountName: gatehouse"),
            "serviceAccountName"
        );
        assert_eq!(
            field(&p, "name: a\nimage: x\nserviceAccountName: ci-bot"),
            "serviceAccountName"
        );
        assert_eq!(
            field(&p, "name: a\nimage: x\nautomountServiceAccountToken: true"),
            "automountServiceAccountToken"
        );
        p.allowed_accounts.insert("ci-bot".into());
        let named =
            "name: a\nimage: x\nserviceAccountName: ci-bot\nautomountServiceAccountToken: true";
        assert_eq!(field(&p, named), "automountServiceAccountToken");
        p.allow_token_mount = true;
        assert_eq!(p.admit(&server(named)).unwrap(), "ci-bot");
        // Token mounting is for allowed accounts only, not the default one.
        assert_eq!(
            field(&p, "name: a\nimage: x\nautomountServiceAccountToken: true"),
            "automountServiceAccountToken"
        );
        p.allowed_accounts.insert("gatehouse".into());
        assert!(p.validate().unwrap_err().contains("gateway's own"));
    }

    #[test]
    fn one_pod_per_server_means_shared_only() {
        let p = PodPolicy::default();
        for sharing in ["per-principal", "per-session"] {
            let err = p
                .admit(&server(&format!("name: a\nimage: x\nsharing: {sharing}")))
                .unwrap_err();
            assert_eq!(err.field, "sharing");
            assert!(err.message.contains(sharing), "{}", err.message);
        }
        assert!(
            p.admit(&server("name: a\nimage: x\nsharing: shared"))
                .is_ok()
        );
    }

    #[test]
    fn resources_get_defaults_that_respect_what_was_given() {
        let p = PodPolicy::default();
        let (req, lim) = p.resources(&server("name: a\nimage: x"));
        assert_eq!(
            (req["cpu"].as_str(), req["memory"].as_str()),
            ("50m", "64Mi")
        );
        assert_eq!(
            (lim["cpu"].as_str(), lim["memory"].as_str()),
            ("1", "512Mi")
        );
        let (req, lim) = p.resources(&server(
            "name: a\nimage: x\nresources: {requests: {memory: 2Gi}, limits: {cpu: 250m}}",
        ));
        assert_eq!(lim["memory"], "2Gi", "never a limit below the request");
        assert_eq!(lim["cpu"], "250m");
        assert!(!req.contains_key("cpu"), "Kubernetes requests the limit");
    }

    #[test]
    fn reads_the_account_of_a_token() {
        use base64::Engine;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"sub":"system:serviceaccount:gh:gatehouse-x"}"#);
        assert_eq!(
            account_of_token(&format!("h.{claims}.s")).as_deref(),
            Some("gatehouse-x")
        );
        assert_eq!(account_of_token("garbage"), None);
    }
}
