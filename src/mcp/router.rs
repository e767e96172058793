//! Routing: which upstream serves a tool, prompt or resource, and how names are prefixed.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::config::{PrefixNames, ResourceConflicts};

/// Most resource URIs remembered for routing, shared out evenly between the upstreams so that
/// one server listing endless URIs cannot keep the others' from being learned.
const MAX_KNOWN_RESOURCES: usize = 100_000;

/// Most resource templates remembered for routing, shared out like the URIs.
const MAX_KNOWN_TEMPLATES: usize = 10_000;

/// Longest URI (or template prefix) remembered: the table bounds how many a server lists, this
/// how large each may be (the bound listen streams put on the URIs clients watch).
pub const MAX_LEARNED_URI: usize = 4096;

/// The routing table of one gateway.
pub struct Router {
    names: Vec<String>,
    separator: String,
    prefixing: bool,
    /// Every upstream that listed a URI: resource URIs carry no server prefix, so two servers
    /// can claim the same one, and the router must not let the later claim win.
    resource_owners: DashMap<Box<str>, Vec<usize>>,
    template_prefixes: RwLock<Vec<(String, usize)>>,
    /// What a URI several servers claim is read from.
    conflicts: ResourceConflicts,
    /// URIs learned per upstream, against its share of the limit.
    learned_resources: Box<[AtomicUsize]>,
    /// Templates learned per upstream, against its share of the limit.
    learned_templates: Box<[AtomicUsize]>,
    /// Which of each upstream's lists ([`Listed`]) have been learned to their last page: until
    /// both are, its silence is no evidence that it does not claim a URI too.
    listed: Box<[AtomicU8]>,
}

/// The resource lists of an upstream the router learns from.
#[derive(Debug, Clone, Copy)]
pub enum Listed {
    /// `resources/list`.
    Resources = 1,
    /// `resources/templates/list`.
    Templates = 2,
}

/// Both lists learned.
const LISTED_BOTH: u8 = Listed::Resources as u8 | Listed::Templates as u8;

/// Where a resource URI routes, for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceRoute {
    /// No upstream the session may use is known to serve the URI.
    Unknown,
    /// Exactly one upstream claims it.
    One(usize),
    /// Several upstreams claim it (listed as a resource, or matched by a template): none of
    /// them may take it, since any could be lying.
    Ambiguous(Vec<usize>),
}

impl Router {
    /// A router over upstreams with these names.
    pub fn new(names: Vec<String>, separator: String, rule: PrefixNames) -> Self {
        let prefixing = match rule {
            PrefixNames::Always => true,
            PrefixNames::Never => false,
            PrefixNames::Auto => names.len() > 1,
        };
        let n = names.len();
        Router {
            names,
            separator,
            prefixing,
            resource_owners: DashMap::new(),
            template_prefixes: RwLock::new(Vec::new()),
            conflicts: ResourceConflicts::Refuse,
            learned_resources: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            learned_templates: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            listed: (0..n).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// With `rule` for URIs several servers claim (refused by default).
    pub fn with_resource_conflicts(mut self, rule: ResourceConflicts) -> Self {
        self.conflicts = rule;
        self
    }

    /// Whether tool and prompt names carry their server's name.
    pub fn prefixing(&self) -> bool {
        self.prefixing
    }

    /// Number of upstreams.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Index of the upstream with this name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Name of upstream `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// The client-facing name of `name` on upstream `index`.
    pub fn public_name(&self, index: usize, name: &str) -> String {
        if self.prefixing {
            format!("{}{}{}", self.names[index], self.separator, name)
        } else {
            name.to_owned()
        }
    }

    /// Splits a client-facing name into its upstream and the upstream's own name.
    pub fn resolve<'a>(&self, public: &'a str) -> Option<(usize, &'a str)> {
        if !self.prefixing {
            return if self.names.len() == 1 {
                Some((0, public))
            } else {
                None
            };
        }
        let (server, name) = public.split_once(self.separator.as_str())?;
        Some((self.index_of(server)?, name))
    }

    /// Takes one from upstream `index`'s share of `limit`, counted in `learned`; false once
    /// it is spent.
    fn take_share(&self, learned: &[AtomicUsize], index: usize, limit: usize) -> bool {
        let share = (limit / self.names.len().max(1)).max(1);
        learned[index]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < share).then_some(n + 1)
            })
            .is_ok()
    }

    /// Marks that upstream `index`'s `list` has been learned to its last page (or that it has
    /// no such list).
    pub fn listed(&self, index: usize, list: Listed) {
        self.listed[index].fetch_or(list as u8, Ordering::Relaxed);
    }

    /// Whether upstream `index`'s lists have both been learned to their last page.
    pub fn heard(&self, index: usize) -> bool {
        self.listed[index].load(Ordering::Relaxed) == LISTED_BOTH
    }

    /// Remembers that upstream `index` lists `uri`.
    pub fn learn_resource(&self, uri: &str, index: usize) {
        if uri.len() > MAX_LEARNED_URI {
            return;
        }
        if let Some(mut owners) = self.resource_owners.get_mut(uri) {
            if !owners.contains(&index)
                && self.take_share(&self.learned_resources, index, MAX_KNOWN_RESOURCES)
            {
                owners.push(index);
            }
            return;
        }
        if self.take_share(&self.learned_resources, index, MAX_KNOWN_RESOURCES) {
            let mut owners = self.resource_owners.entry(uri.into()).or_default();
            if !owners.contains(&index) {
                owners.push(index);
            }
        }
    }

    /// Remembers a resource template of upstream `index` by its literal prefix.
    pub fn learn_template(&self, template: &str, index: usize) {
        let prefix = template.split('{').next().unwrap_or_default();
        if prefix.is_empty() || prefix.len() > MAX_LEARNED_URI {
            return;
        }
        let mut t = self
            .template_prefixes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !t.iter().any(|(p, i)| p == prefix && *i == index)
            && self.take_share(&self.learned_templates, index, MAX_KNOWN_TEMPLATES)
        {
            t.push((prefix.to_owned(), index));
        }
    }

    /// Where `uri` routes for a session that may use the upstreams `serves` accepts: to the
    /// one server that claims it, by listing it or by a template that matches it.
    ///
    /// A route counts only once every usable upstream's lists have been learned, but for those
    /// `waived` (else the caller walks them and asks again, waiving all): a router that has
    /// not heard from every server cannot tell that a URI is claimed only once.
    pub fn resource(
        &self,
        uri: &str,
        serves: impl Fn(usize) -> bool,
        waived: impl Fn(usize) -> bool,
    ) -> ResourceRoute {
        if self.names.len() == 1 {
            return if serves(0) {
                ResourceRoute::One(0)
            } else {
                ResourceRoute::Unknown
            };
        }
        let mut claimants: Vec<usize> = self
            .resource_owners
            .get(uri)
            .map(|owners| owners.iter().copied().filter(|i| serves(*i)).collect())
            .unwrap_or_default();
        {
            let t = self
                .template_prefixes
                .read()
                .unwrap_or_else(|e| e.into_inner());
            claimants.extend(
                t.iter()
                    .filter(|(p, i)| uri.starts_with(p.as_str()) && serves(*i))
                    .map(|(_, i)| *i),
            );
        }
        claimants.sort_unstable();
        claimants.dedup();
        let route = match (one_of(claimants.into_iter()), self.conflicts) {
            // Claimants are in configuration order.
            (ResourceRoute::Ambiguous(owners), ResourceConflicts::First) => {
                ResourceRoute::One(owners[0])
            }
            (route, _) => route,
        };
        let unheard = || (0..self.names.len()).any(|i| serves(i) && !self.heard(i) && !waived(i));
        if matches!(route, ResourceRoute::One(_)) && unheard() {
            return ResourceRoute::Unknown;
        }
        route
    }
}

/// The route for a set of distinct claimants.
fn one_of(mut owners: impl Iterator<Item = usize>) -> ResourceRoute {
    let Some(first) = owners.next() else {
        return ResourceRoute::Unknown;
    };
    match owners.next() {
        None => ResourceRoute::One(first),
        Some(second) => {
            ResourceRoute::Ambiguous([first, second].into_iter().chain(owners).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits to hear from every server.
    fn waive_none(_: usize) -> bool {
        false
    }

    /// Hears from nobody more (after a walk).
    fn waive_all(_: usize) -> bool {
        true
    }

    fn two() -> Router {
        Router::new(vec!["a".into(), "b".into()], "__".into(), PrefixNames::Auto)
    }

    #[test]
    fn prefixes_only_with_several_upstreams_by_default() {
        let one = Router::new(vec!["a".into()], "__".into(), PrefixNames::Auto);
        assert_eq!(one.public_name(0, "echo"), "echo");
        assert_eq!(one.resolve("echo"), Some((0, "echo")));
        let two = Router::new(
            vec!["a".into(), "b_c".into()],
            "__".into(),
            PrefixNames::Auto,
        );
        assert_eq!(two.public_name(1, "echo"), "b_c__echo");
        assert_eq!(two.resolve("b_c__echo"), Some((1, "echo")));
        assert_eq!(two.resolve("a__x__y"), Some((0, "x__y")));
        assert_eq!(two.resolve("zz__echo"), None);
        assert_eq!(two.resolve("echo"), None);
    }

    /// Both upstreams heard from, in full.
    fn heard(r: &Router) {
        for i in 0..r.len() {
            r.listed(i, Listed::Resources);
            r.listed(i, Listed::Templates);
        }
    }

    #[test]
    fn routes_resources_by_uri_and_template_prefix() {
        let r = two();
        r.learn_resource("file:///x", 1);
        r.learn_template("test://t/{id}", 0);
        heard(&r);
        let all = |_| true;
        assert_eq!(
            r.resource("file:///x", all, waive_none),
            ResourceRoute::One(1)
        );
        assert_eq!(
            r.resource("test://t/7", all, waive_none),
            ResourceRoute::One(0)
        );
        assert_eq!(
            r.resource("other://", all, waive_none),
            ResourceRoute::Unknown
        );
        // A URI or prefix past the bound is not kept (nor routed by).
        let long = format!("long://{}", "x".repeat(MAX_LEARNED_URI));
        r.learn_resource(&long, 1);
        r.learn_template(&format!("{long}/{{id}}"), 1);
        assert_eq!(r.resource(&long, all, waive_none), ResourceRoute::Unknown);
        assert_eq!(
            r.resource(&format!("{long}/7"), all, waive_none),
            ResourceRoute::Unknown
        );
        assert_eq!(r.resource_owners.len(), 1);
    }

    #[test]
    fn a_uri_two_servers_claim_belongs_to_neither() {
        let r = two();
        heard(&r);
        // Listed by both: the later listing does not take it over.
        r.learn_resource("file:///secret", 0);
        r.learn_resource("file:///secret", 1);
        r.learn_resource("file:///secret", 1);
        let all = |_| true;
        assert_eq!(
            r.resource("file:///secret", all, waive_all),
            ResourceRoute::Ambiguous(vec![0, 1])
        );
        // A session that may use only one of them reads from it.
        assert_eq!(
            r.resource("file:///secret", |i| i == 0, waive_all),
            ResourceRoute::One(0)
        );
        // A longer template prefix of another server does not win over a shorter one.
        r.learn_template("test://t/{id}", 0);
        r.learn_template("test://t/special/{id}", 1);
        assert_eq!(
            r.resource("test://t/special/7", all, waive_all),
            ResourceRoute::Ambiguous(vec![0, 1])
        );
        assert_eq!(
            r.resource("test://t/7", all, waive_all),
            ResourceRoute::One(0)
        );
        // Nor does a URI listed outright under another server's template.
        r.learn_resource("test://t/own", 1);
        assert_eq!(
            r.resource("test://t/own", all, waive_all),
            ResourceRoute::Ambiguous(vec![0, 1])
        );
        // Unless the operator says the claimant configured first serves it.
        let r = r.with_resource_conflicts(ResourceConflicts::First);
        for uri in ["file:///secret", "test://t/special/7", "test://t/own"] {
            assert_eq!(
                r.resource(uri, all, waive_all),
                ResourceRoute::One(0),
                "{uri}"
            );
        }
        assert_eq!(
            r.resource("file:///secret", |i| i == 1, waive_all),
            ResourceRoute::One(1)
        );
    }

    #[test]
    fn a_route_counts_once_every_server_has_been_heard_from() {
        let r = two();
        r.learn_template("file:///{path}", 1);
        let all = |_| true;
        // Server a may list file:///x itself: ask for a refresh first.
        assert_eq!(
            r.resource("file:///x", all, waive_none),
            ResourceRoute::Unknown
        );
        assert_eq!(
            r.resource("file:///x", all, waive_all),
            ResourceRoute::One(1)
        );
        // Its resources alone are not enough: a template of its own may match too.
        r.listed(0, Listed::Resources);
        r.listed(1, Listed::Resources);
        r.listed(1, Listed::Templates);
        assert_eq!(
            r.resource("file:///x", all, waive_none),
            ResourceRoute::Unknown
        );
        r.listed(0, Listed::Templates);
        assert_eq!(
            r.resource("file:///x", all, waive_none),
            ResourceRoute::One(1)
        );
        // Nor is a server waited for that the caller waives (a walk could not hear it).
        let r = two();
        r.learn_template("file:///{path}", 1);
        r.listed(1, Listed::Resources);
        r.listed(1, Listed::Templates);
        assert_eq!(
            r.resource("file:///x", all, |i| i == 0),
            ResourceRoute::One(1)
        );
        assert_eq!(
            r.resource("file:///x", all, |i| i == 1),
            ResourceRoute::Unknown
        );
        // A session that cannot use server a need not hear from it.
        let r = two();
        r.learn_template("file:///{path}", 1);
        r.listed(1, Listed::Resources);
        r.listed(1, Listed::Templates);
        assert_eq!(
            r.resource("file:///x", |i| i == 1, waive_none),
            ResourceRoute::One(1)
        );
    }

    #[test]
    fn one_server_cannot_spend_the_others_share_of_the_table() {
        let r = two();
        for n in 0..MAX_KNOWN_RESOURCES {
            r.learn_resource(&format!("flood://{n}"), 1);
        }
        assert_eq!(r.resource_owners.len(), MAX_KNOWN_RESOURCES / 2);
        r.learn_resource("file:///x", 0);
        assert_eq!(
            r.resource("file:///x", |_| true, waive_all),
            ResourceRoute::One(0)
        );
        for n in 0..MAX_KNOWN_TEMPLATES {
            r.learn_template(&format!("flood://{n}/{{x}}"), 1);
        }
        r.learn_template("mine://{x}", 0);
        assert_eq!(
            r.resource("mine://1", |_| true, waive_all),
            ResourceRoute::One(0)
        );
        // Server b's URIs did not spend its share of templates, nor the reverse.
        r.learn_template("late://{x}", 1);
        assert_eq!(
            r.resource("late://1", |_| true, waive_all),
            ResourceRoute::Unknown
        );
        let fresh = two();
        for n in 0..MAX_KNOWN_RESOURCES {
            fresh.learn_resource(&format!("many://{n}"), 1);
        }
        fresh.learn_template("tmpl://{x}", 1);
        assert_eq!(
            fresh.resource("tmpl://1", |_| true, waive_all),
            ResourceRoute::One(1)
        );
    }
}
