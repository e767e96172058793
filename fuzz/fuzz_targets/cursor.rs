//! The list cursor codec: a cursor from a client never panics the decoder, decodes only to known
//! upstreams, and what the gateway encodes decodes back.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use gatehouse::config::PrefixNames;
use gatehouse::mcp::cursor::{decode_cursor, encode_cursor};
use gatehouse::mcp::router::Router;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 3] = ["files", "git", "web-search"];

fn router() -> &'static Router {
    static R: OnceLock<Router> = OnceLock::new();
    R.get_or_init(|| {
        let names = NAMES.iter().map(|n| n.to_string()).collect();
        Router::new(names, "__".into(), PrefixNames::Auto)
    })
}

fuzz_target!(|input: (&str, Vec<(u8, String)>)| {
    let (client, next) = input;
    if let Some(targets) = decode_cursor(router(), client) {
        assert!(!targets.is_empty());
        assert!(targets.iter().all(|(i, c)| *i < NAMES.len() && c.is_some()));
        let pairs: Vec<(String, String)> = targets
            .iter()
            .map(|(i, c)| (router().name(*i).to_owned(), c.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            decode_cursor(router(), &encode_cursor(&pairs)),
            Some(targets)
        );
    }

    // What the gateway hands out: each upstream's own cursor, by upstream name (last one wins).
    let pairs: Vec<(String, String)> = next
        .into_iter()
        .map(|(i, c)| (NAMES[usize::from(i) % NAMES.len()].to_owned(), c))
        .collect();
    let want: BTreeMap<usize, Option<String>> = pairs
        .iter()
        .map(|(n, c)| (router().index_of(n).expect("known"), Some(c.clone())))
        .collect();
    let got = decode_cursor(router(), &encode_cursor(&pairs));
    if pairs.is_empty() {
        assert_eq!(got, None);
    } else {
        let got: BTreeMap<_, _> = got.expect("our own cursor decodes").into_iter().collect();
        assert_eq!(got, want);
    }
});
