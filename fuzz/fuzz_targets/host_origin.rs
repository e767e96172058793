//! Host and Origin checks (DNS rebinding): whatever they accept names a host this gateway answers
//! to, by the `http` crate's reading of a plain `host[:port]`, and they accept every such host.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use gatehouse::config::Config;
use gatehouse::mcp::front::{FrontError, check_host_and_origin};
use http::header::{HOST, ORIGIN};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const UPSTREAM: &str = "upstreams: [{name: a, stdio: {command: \"true\"}}]\n";

/// On loopback with no lists: only loopback names, any port.
fn local() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| Config::from_yaml(UPSTREAM).expect("config"))
}

/// Public, with one allowed host and one allowed origin.
fn public() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let yaml = format!(
            "{UPSTREAM}listen: 0.0.0.0:9000\nauth: {{allow_anonymous: true}}\nmcp: {{allowed_hosts: [GW.example.com], allowed_origins: [\"https://app.example.com\"]}}\n"
        );
        Config::from_yaml(&yaml).expect("config")
    })
}

/// The host (lowercase) of a plain `host[:port]` authority, the host as the `http` crate reads it;
/// `None` for anything else (userinfo, a port that is not digits, trailing text).
fn host_of(authority: &str) -> Option<String> {
    let a: http::uri::Authority = authority.parse().ok()?;
    let port = authority.strip_prefix(a.host())?;
    let plain = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
    plain.then(|| a.host().to_ascii_lowercase())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

fuzz_target!(|input: (bool, Option<&[u8]>, Option<&[u8]>)| {
    let (on_loopback, host, origin) = input;
    let mut headers = HeaderMap::new();
    let host = host.and_then(|h| HeaderValue::from_bytes(h).ok());
    let origin = origin.and_then(|o| HeaderValue::from_bytes(o).ok());
    if let Some(h) = &host {
        headers.insert(HOST, h.clone());
    }
    if let Some(o) = &origin {
        headers.insert(ORIGIN, o.clone());
    }
    let host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin = origin.as_ref().map(|o| o.to_str().unwrap_or(""));
    let config = if on_loopback { local() } else { public() };
    let verdict = check_host_and_origin(config, Some(host).filter(|h| !h.is_empty()), &headers);

    let host_ok = match host_of(host) {
        _ if !on_loopback && host.eq_ignore_ascii_case("gw.example.com") => true,
        Some(h) if on_loopback => is_loopback(&h),
        Some(h) => h == "gw.example.com",
        None => false,
    };
    let origin_ok = origin.is_none_or(|o| {
        if on_loopback {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            rest.is_some_and(|r| host_of(r).is_some_and(|h| is_loopback(&h)))
        } else {
            o.eq_ignore_ascii_case("https://app.example.com")
        }
    });
    match verdict {
        Ok(()) => assert!(
            host_ok && origin_ok,
            "accepted Host {host:?} Origin {origin:?}"
        ),
        Err(FrontError::Host(_)) => assert!(!host_ok, "refused Host {host:?}"),
        Err(FrontError::Origin(_)) => assert!(host_ok && !origin_ok, "refused Origin {origin:?}"),
        Err(e) => panic!("unexpected refusal {e}"),
    }
});
