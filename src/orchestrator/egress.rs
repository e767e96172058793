//! A server's egress policy: where its pod may open connections. The kubernetes backend
//! enforces it with one NetworkPolicy per server (and, when the operator enables Cilium, a
//! CiliumNetworkPolicy for host names); the local backend does not enforce it, and says so.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A rule that is not one: `field` names the part at fault (`egress.allow[2].cidr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EgressError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl EgressError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        EgressError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Most rules in one server's `egress.allow`.
pub const MAX_RULES: usize = 64;

/// Where a server may connect.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressSpec {
    /// Where to start from: `none` (nothing, the default) or `dns-and-https` (DNS, and TCP 443
    /// to addresses outside private, cluster and metadata ranges).
    #[serde(default)]
    pub preset: EgressPreset,
    /// Destinations allowed besides the preset's (at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressRule>,
}

/// A starting point of an egress policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EgressPreset {
    /// No connection at all.
    #[default]
    None,
    /// DNS, and HTTPS to public addresses.
    DnsAndHttps,
}

impl EgressPreset {
    /// The preset's name as written in a definition.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressPreset::None => "none",
            EgressPreset::DnsAndHttps => "dns-and-https",
        }
    }

    /// Reads a preset's name (the operator's default, from the environment).
    pub fn parse(s: &str) -> Option<EgressPreset> {
        match s {
            "none" => Some(EgressPreset::None),
            "dns-and-https" => Some(EgressPreset::DnsAndHttps),
            _ => None,
        }
    }
}

/// One allowed destination: an address range or a host name, on some TCP ports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// An address range in CIDR notation (`203.0.113.0/24`, `2001:db8::/32`). Private,
    /// cluster and metadata ranges are reachable only when a rule names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// A host name (`api.github.com`) or a wildcard of one (`*.example.com`): enforced only
    /// where the operator enabled Cilium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP ports (none: every port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Ranges no rule reaches unless it names them: "this network", private networks (where
/// cluster pods and services usually live), link-local (the cloud metadata endpoint),
/// carrier-grade NAT, loopback, IETF protocol assignments (some clouds' metadata), and the
/// benchmarking range.
pub const PRIVATE_V4: [&str; 9] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "192.0.0.0/24",
    "198.18.0.0/15",
];
/// The IPv6 ranges of the same kinds: unique local (AWS's metadata address is in it),
/// link-local, loopback, and the translation ranges that reach IPv4 addresses through a
/// gateway (NAT64, 6to4). IPv4-mapped addresses are IPv4 on the wire: the IPv4 list applies.
pub const PRIVATE_V6: [&str; 6] = [
    "fc00::/7",
    "fe80::/10",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "2002::/16",
];

impl EgressSpec {
    /// Checks the rules: `Err` names the field at fault.
    pub fn validate(&self) -> Result<(), EgressError> {
        if self.allow.len() > MAX_RULES {
            return Err(EgressError::new(
                "egress.allow",
                format!("{} rules (at most {MAX_RULES})", self.allow.len()),
            ));
        }
        for (i, rule) in self.allow.iter().enumerate() {
            let field = format!("egress.allow[{i}]");
            match (&rule.cidr, &rule.host) {
                (Some(cidr), None) => {
                    let range = parse_cidr(cidr)
                        .map_err(|why| EgressError::new(format!("{field}.cidr"), why))?;
                    // The API server and the network plugin read `::ffff:10.0.0.0/104` as
                    // 10.0.0.0/8, while every check here would see an IPv6 range: one form only.
                    if range.0.is_ipv6()
                        && let (IpAddr::V4(v4), len) = unmapped(range)
                    {
                        return Err(EgressError::new(
                            format!("{field}.cidr"),
                            format!(
                                "{cidr} is IPv4-mapped (IPv4 addresses on the wire, where private, cluster and metadata ranges are checked): write it as IPv4, {v4}/{len}"
                            ),
                        ));
                    }
                }
                (None, Some(host)) => {
                    check_host(host)
                        .map_err(|why| EgressError::new(format!("{field}.host"), why))?;
                }
                _ => {
                    return Err(EgressError::new(
                        field,
                        "a rule names exactly one of cidr and host",
                    ));
                }
            };
            if rule.ports.contains(&0) {
                return Err(EgressError::new(
                    format!("{field}.ports"),
                    "0 is not a port (1 to 65535)",
                ));
            }
        }
        Ok(())
    }

    /// Whether any rule names a host (only Cilium can enforce those).
    pub fn has_hosts(&self) -> bool {
        self.allow.iter().any(|r| r.host.is_some())
    }

    /// Whether the pod needs DNS: it may reach something by name or the preset says so.
    pub fn needs_dns(&self) -> bool {
        self.preset == EgressPreset::DnsAndHttps || self.has_hosts()
    }
}

/// A CIDR in canonical form (`10.1.0.0/16`): `Err` says why not one. The address must be
/// the network's own (no host bits), as the API server requires of an ipBlock.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not in CIDR notation (address/length)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = Some(len)
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|l| l.parse().ok())
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{len:?} is not a prefix length (0 to {max})"))?;
    // The host part: the low (max - len) bits.
    let host_bits = match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)) & ((1u128 << (32 - len)) - 1),
        IpAddr::V6(a) => {
            u128::from(a)
                & 1u128
                    .checked_shl(u32::from(128 - len))
                    .map_or(u128::MAX, |b| b - 1)
        }
    };
    if host_bits != 0 {
        return Err(format!(
            "{s:?} has host bits set (write the network's address)"
        ));
    }
    Ok((addr, len))
}

/// What the local backend says of a server that declares egress.
pub const NOT_ENFORCED_LOCALLY: &str = "declared but not enforced: the local backend does not restrict a server's connections (a NetworkPolicy enforces it on Kubernetes)";

impl EgressSpec {
    /// One line for operators: what the policy allows.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("preset {}", self.preset.as_str())];
        for rule in &self.allow {
            let to = rule.cidr.as_deref().or(rule.host.as_deref()).unwrap_or("?");
            let ports = if rule.ports.is_empty() {
                "every port".to_owned()
            } else {
                let p: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
                format!("port {}", p.join(","))
            };
            parts.push(format!("{to} {ports}"));
        }
        parts.join("; ")
    }
}

/// Whether range `outer` holds all of range `inner` (both parsed by [`parse_cidr`]).
pub fn contains(outer: (IpAddr, u8), inner: (IpAddr, u8)) -> bool {
    // Both as 128 bits with the prefix at the top (an IPv4 address in the top 32).
    let bits = |a: IpAddr| match a {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, true),
        IpAddr::V6(a) => (u128::from(a), false),
    };
    let ((o, o_v4), (i, i_v4)) = (bits(outer.0), bits(inner.0));
    if o_v4 != i_v4 || outer.1 > inner.1 {
        return false;
    }
    let mask = u128::MAX.checked_shl(128 - u32::from(outer.1)).unwrap_or(0);
    o & mask == i & mask
}

/// Whether two ranges share an address.
pub fn overlaps(a: (IpAddr, u8), b: (IpAddr, u8)) -> bool {
    contains(a, b) || contains(b, a)
}

/// An IPv4-mapped range (`::ffff:10.0.0.0/104`) as the IPv4 range it is on the wire
/// (`10.0.0.0/8`); any other range as it is.
pub fn unmapped(range: (IpAddr, u8)) -> (IpAddr, u8) {
    match range {
        // A valid range whose network address is mapped has a prefix of 96 or more.
        (IpAddr::V6(a), len) if len >= 96 => a
            .to_ipv4_mapped()
            .map_or(range, |v4| (IpAddr::V4(v4), len - 96)),
        _ => range,
    }
}

/// The private, cluster and metadata ranges a rule overlaps (see [`PRIVATE_V4`]); an
/// IPv4-mapped range is compared as the IPv4 range it is.
pub fn private_overlap(range: (IpAddr, u8)) -> Option<&'static str> {
    let range = unmapped(range);
    PRIVATE_V4
        .iter()
        .chain(PRIVATE_V6.iter())
        .copied()
        .find(|p| parse_cidr(p).is_ok_and(|p| overlaps(p, range)))
}

/// Whether `s` is a host name or a `*.` wildcard of one (RFC 1123 labels).
fn check_host(s: &str) -> Result<(), String> {
    let name = s.strip_prefix("*.").unwrap_or(s);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').count() >= 2
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a host name (labels of letters, digits and '-', at least two; `*.` may lead)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_checked_naming_the_field() {
        let rule = |cidr: Option<&str>, host: Option<&str>, ports: &[u16]| EgressSpec {
            preset: EgressPreset::None,
            allow: vec![EgressRule {
                cidr: cidr.map(str::to_owned),
                host: host.map(str::to_owned),
                ports: ports.to_vec(),
            }],
        };
        assert!(rule(Some("10.0.0.0/8"), None, &[5432]).validate().is_ok());
        assert!(rule(Some("2001:db8::/32"), None, &[]).validate().is_ok());
        assert!(rule(Some("0.0.0.0/0"), None, &[]).validate().is_ok());
        assert!(rule(Some("203.0.113.7/32"), None, &[]).validate().is_ok());
        assert!(rule(None, Some("*.github.com"), &[443]).validate().is_ok());
        for (spec, field, says) in [
            (
                rule(Some("10.0.0.1/8"), None, &[]),
                "egress.allow[0].cidr",
                "host bits",
            ),
            (
                rule(Some("10.0.0.0/33"), None, &[]),
                "egress.allow[0].cidr",
                "prefix length",
            ),
            (
                rule(Some("10.0.0.0"), None, &[]),
                "egress.allow[0].cidr",
                "CIDR notation",
            ),
            (
                rule(Some("ten/8"), None, &[]),
                "egress.allow[0].cidr",
                "not an IP",
            ),
            (
                rule(None, Some("localhost"), &[]),
                "egress.allow[0].host",
                "not a host name",
            ),
            (
                rule(None, Some("a..b"), &[]),
                "egress.allow[0].host",
                "not a host name",
            ),
            (
                rule(None, Some("*"), &[]),
                "egress.allow[0].host",
                "not a host name",
            ),
            (
                rule(Some("10.0.0.0/8"), Some("a.b"), &[]),
                "egress.allow[0]",
                "exactly one",
            ),
            (rule(None, None, &[]), "egress.allow[0]", "exactly one"),
            (
                rule(None, Some("a.example"), &[0]),
                "egress.allow[0].ports",
                "not a port",
            ),
            (
                rule(Some("::ffff:0.0.0.0/96"), None, &[]),
                "egress.allow[0].cidr",
                "write it as IPv4, 0.0.0.0/0",
            ),
            (
                rule(Some("::ffff:169.254.169.254/128"), None, &[]),
                "egress.allow[0].cidr",
                "write it as IPv4, 169.254.169.254/32",
            ),
            (
                rule(Some("::ffff:10.0.0.0/104"), None, &[]),
                "egress.allow[0].cidr",
                "write it as IPv4, 10.0.0.0/8",
            ),
            (
                rule(Some("::ffff:203.0.113.0/120"), None, &[]),
                "egress.allow[0].cidr",
                "write it as IPv4, 203.0.113.0/24",
            ),
        ] {
            let e = spec.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let many = EgressSpec {
            preset: EgressPreset::None,
            allow: vec![rule(None, Some("a.example"), &[]).allow[0].clone(); MAX_RULES + 1],
        };
        assert_eq!(many.validate().unwrap_err().field, "egress.allow");
    }

    #[test]
    fn ranges_contain_and_overlap() {
        let c = |s| parse_cidr(s).unwrap();
        assert!(contains(c("0.0.0.0/0"), c("10.1.0.0/16")));
        assert!(contains(c("10.0.0.0/8"), c("10.1.2.3/32")));
        assert!(!contains(c("10.1.0.0/16"), c("10.0.0.0/8")));
        assert!(!contains(c("::/0"), c("10.0.0.0/8")), "families differ");
        assert!(contains(c("::/0"), c("fc00::/7")));
        assert!(contains(c("10.1.2.3/32"), c("10.1.2.3/32")));
        assert_eq!(private_overlap(c("0.0.0.0/0")), Some("0.0.0.0/8"));
        assert_eq!(
            private_overlap(c("169.254.169.254/32")),
            Some("169.254.0.0/16")
        );
        assert_eq!(private_overlap(c("fd00:ec2::254/128")), Some("fc00::/7"));
        assert_eq!(private_overlap(c("203.0.113.0/24")), None);
        assert_eq!(private_overlap(c("2001:db8::/32")), None);
        // IPv4-mapped ranges are IPv4 on the wire: the IPv4 list applies.
        assert_eq!(private_overlap(c("::ffff:0.0.0.0/96")), Some("0.0.0.0/8"));
        assert_eq!(
            private_overlap(c("::ffff:169.254.169.254/128")),
            Some("169.254.0.0/16")
        );
        assert_eq!(
            private_overlap(c("::ffff:10.0.0.0/104")),
            Some("10.0.0.0/8")
        );
        assert_eq!(private_overlap(c("::ffff:203.0.113.0/120")), None);
        // Only a range inside ::ffff:0:0/96 is IPv4: one around it is an IPv6 range.
        assert_eq!(unmapped(c("::fffe:0:0/95")), c("::fffe:0:0/95"));
        // Every excepted range lies inside the block it is excepted from (the API server
        // refuses an ipBlock whose except is not a strict subset of its cidr).
        for p in PRIVATE_V4 {
            assert!(contains(c("0.0.0.0/0"), c(p)) && c(p).1 > 0, "{p}");
        }
        for p in PRIVATE_V6 {
            assert!(contains(c("::/0"), c(p)) && c(p).1 > 0, "{p}");
        }
    }
}
