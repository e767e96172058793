//! Routing: which upstream serves a tool, prompt or resource, and how names are prefixed.

use std::sync::RwLock;

use dashmap::DashMap;

use crate::config::PrefixNames;

/// Most resource URIs remembered for routing; beyond this, lookups fall back to a refresh.
const MAX_KNOWN_RESOURCES: usize = 100_000;

/// The routing table of one gateway.
pub struct Router {
    names: Vec<String>,
    separator: String,
    prefixing: bool,
    resource_owner: DashMap<Box<str>, usize>,
    template_prefixes: RwLock<Vec<(String, usize)>>,
}

impl Router {
    /// A router over upstreams with these names.
    pub fn new(names: Vec<String>, separator: String, rule: PrefixNames) -> Self {
        let prefixing = match rule {
            PrefixNames::Always => true,
            PrefixNames::Never => false,
            PrefixNames::Auto => names.len() > 1,
        };
        Router {
            names,
            separator,
            prefixing,
            resource_owner: DashMap::new(),
            template_prefixes: RwLock::new(Vec::new()),
        }
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

    /// Remembers that `uri` belongs to upstream `index`.
    pub fn learn_resource(&self, uri: &str, index: usize) {
        if self.resource_owner.len() < MAX_KNOWN_RESOURCES || self.resource_owner.contains_key(uri)
        {
            self.resource_owner.insert(uri.into(), index);
        }
    }

    /// Remembers a resource template of upstream `index` by its literal prefix.
    pub fn learn_template(&self, template: &str, index: usize) {
        let prefix = template.split('{').next().unwrap_or_default();
        if prefix.is_empty() {
            return;
        }
        let mut t = self
            .template_prefixes
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !t.iter().any(|(p, i)| p == prefix && *i == index) && t.len() < 10_000 {
            t.push((prefix.to_owned(), index));
        }
    }

    /// The upstream that owns `uri`, if known.
    pub fn resource(&self, uri: &str) -> Option<usize> {
        if self.names.len() == 1 {
            return Some(0);
        }
        if let Some(i) = self.resource_owner.get(uri) {
            return Some(*i);
        }
        let t = self
            .template_prefixes
            .read()
            .unwrap_or_else(|e| e.into_inner());
        t.iter()
            .filter(|(p, _)| uri.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, i)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn routes_resources_by_uri_and_template_prefix() {
        let r = Router::new(vec!["a".into(), "b".into()], "__".into(), PrefixNames::Auto);
        r.learn_resource("file:///x", 1);
        r.learn_template("test://t/{id}", 0);
        r.learn_template("test://t/special/{id}", 1);
        assert_eq!(r.resource("file:///x"), Some(1));
        assert_eq!(r.resource("test://t/7"), Some(0));
        assert_eq!(r.resource("test://t/special/7"), Some(1));
        assert_eq!(r.resource("other://"), None);
    }
}
