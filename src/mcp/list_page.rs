//! One page of a server's list (`tools/list`, `prompts/list`, `resources/list`,
//! `resources/templates/list`) read once: its items with the name each is listed under, and
//! where the list goes on. A session keeps what it made of each server's cached first page
//! ([`crate::mcp::session::Session::list_page`]), so a call judged by how its target is listed
//! reads an index, not the page.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::OnceLock;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A list page's items, by name.
pub struct ListPage {
    /// The page, held: item texts are ranges of it, and its address tells it apart.
    page: Bytes,
    /// Each item's name (empty when it has none) and where its text is in the page, in order.
    items: Vec<(Box<str>, Range<usize>)>,
    /// The first item listed under each name.
    by_name: HashMap<Box<str>, usize>,
    next_cursor: Option<String>,
    /// Each item's description and labels, read when first asked for (`None`: unreadable).
    described: Vec<OnceLock<Option<Described>>>,
}

/// What a list filter judges an item by besides its name: its description, and labels from
/// its behaviour hints (`destructive`, `read-only`, `idempotent`, `open-world` when the hint
/// is true) and from `_meta["gatehouse/labels"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Described {
    /// The item's description.
    pub description: Option<String>,
    /// Its labels.
    pub labels: Vec<String>,
}

/// The members of a listed item that clients, the pins and the gateway read.
const ITEM_MEMBERS: [&str; 12] = [
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
    "arguments",
    "uri",
    "uriTemplate",
    "mimeType",
    "icons",
    "_meta",
];

/// Why clients could read listed item `raw` otherwise than the gateway: a key a lenient
/// decoder reads as one of its members without being it (`Name`, `DESCRIPTION`,
/// `inputschema\u0000`), a key that is no text, or a member given twice (clients read the
/// last, a plugin could be shown the first or none). Such an item could show a client another
/// name or description than the gateway prefixed, pinned and judged. `None` for an item with
/// none.
pub fn misread_member(raw: &str) -> Option<String> {
    let mut found = None;
    // One bit per member of `ITEM_MEMBERS` seen.
    let mut seen = 0u16;
    let _ = crate::json_scan::members(raw, crate::json_scan::MAX_DEPTH, |key, _| {
        if found.is_some() {
            return;
        }
        let Ok(k) = crate::json_scan::unquote(key) else {
            found = Some(format!("its key {key} is no text"));
            return;
        };
        match crate::mcp::lookalike::read_as(&k, &ITEM_MEMBERS) {
            Some(member) if member == k => {
                let bit = 1 << ITEM_MEMBERS.iter().position(|m| *m == member).unwrap_or(0);
                if seen & bit != 0 {
                    found = Some(format!("its member {member} is given twice"));
                }
                seen |= bit;
            }
            Some(member) => {
                found = Some(format!(
                    "its key {:?} is read as {member} by lenient clients",
                    crate::mcp::lookalike::shown(&k)
                ));
            }
            None => {}
        }
    });
    found
}

impl Described {
    fn read(item: &str) -> Option<Described> {
        Described::read_listed(item, "").map(|(_, d)| d)
    }

    /// Reads an item of a `key` page (`tools`, `resources`, ...): the name it is listed under
    /// (a URI for resources) and its description and labels. `None` for an item that cannot be
    /// read so (a member of another type, or any [`misread_member`]): what a client would
    /// show of it is not known, so a list filter cannot judge it.
    pub fn read_listed(item: &str, key: &str) -> Option<(Option<String>, Described)> {
        #[derive(Deserialize)]
        struct Item<'a> {
            name: Option<String>,
            uri: Option<String>,
            #[serde(rename = "uriTemplate")]
            uri_template: Option<String>,
            description: Option<String>,
            // Read as text: a server's annotations are never a value tree of its choosing.
            #[serde(borrow)]
            annotations: Option<BTreeMap<Cow<'a, str>, &'a RawValue>>,
            #[serde(borrow, rename = "_meta")]
            meta: Option<BTreeMap<Cow<'a, str>, &'a RawValue>>,
        }
        if misread_member(item).is_some() {
            return None;
        }
        let it: Item<'_> = serde_json::from_str(item).ok()?;
        let annotations = it.annotations.unwrap_or_default();
        let mut labels: Vec<String> = [
            ("destructiveHint", "destructive"),
            ("readOnlyHint", "read-only"),
            ("idempotentHint", "idempotent"),
            ("openWorldHint", "open-world"),
        ]
        .iter()
        .filter(|(hint, _)| annotations.get(*hint).is_some_and(|v| v.get() == "true"))
        .map(|(_, label)| (*label).to_owned())
        .collect();
        if let Some(extra) = it
            .meta
            .as_ref()
            .and_then(|m| m.get("gatehouse/labels"))
            .and_then(|raw| serde_json::from_str::<Vec<String>>(raw.get()).ok())
        {
            labels.extend(extra);
        }
        let name = match key {
            "resources" => it.uri,
            "resourceTemplates" => it.uri_template,
            _ => it.name,
        };
        let described = Described {
            description: it.description,
            labels,
        };
        Some((name, described))
    }
}

/// The members a page and an item are read for.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow, default)]
    tools: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    prompts: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    resources: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default, rename = "resourceTemplates")]
    resource_templates: Option<Vec<&'a RawValue>>,
    #[serde(default, rename = "nextCursor")]
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    uri: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "uriTemplate")]
    uri_template: Option<Cow<'a, str>>,
}

impl ListPage {
    /// Reads `page` (a list result) for its items under `key` (`tools`, `prompts`,
    /// `resources` or `resourceTemplates`), each named by its `name`, `uri` or `uriTemplate`
    /// member as `key` says. `None`: not a list page (what it would have listed is not
    /// listed).
    pub fn read(page: Bytes, key: &str) -> Option<ListPage> {
        let (items, next_cursor) = {
            let text = std::str::from_utf8(&page).ok()?;
            let read: Page<'_> = serde_json::from_str(text).ok()?;
            let items = match key {
                "tools" => read.tools,
                "prompts" => read.prompts,
                "resources" => read.resources,
                "resourceTemplates" => read.resource_templates,
                _ => None,
            };
            let base = text.as_ptr() as usize;
            let items: Vec<(Box<str>, Range<usize>)> = items
                .unwrap_or_default()
                .into_iter()
                .map(|item| {
                    let named: Option<Named<'_>> = serde_json::from_str(item.get()).ok();
                    let name = named.and_then(|n| match key {
                        "resources" => n.uri,
                        "resourceTemplates" => n.uri_template,
                        _ => n.name,
                    });
                    // A borrowed raw value is a slice of the page's text.
                    let start = item.get().as_ptr() as usize - base;
                    (
                        name.map(|n| n.into_owned().into_boxed_str())
                            .unwrap_or_default(),
                        start..start + item.get().len(),
                    )
                })
                .collect();
            (items, read.next_cursor)
        };
        let mut by_name = HashMap::with_capacity(items.len());
        for (i, (name, _)) in items.iter().enumerate() {
            if !name.is_empty() {
                by_name.entry(name.clone()).or_insert(i);
            }
        }
        let described = (0..items.len()).map(|_| OnceLock::new()).collect();
        Some(ListPage {
            page,
            items,
            by_name,
            next_cursor,
            described,
        })
    }

    /// The page it was read from.
    pub fn page(&self) -> &Bytes {
        &self.page
    }

    /// The text of the first item listed under `name`.
    pub fn find(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(|i| self.text(&self.items[*i].1))
    }

    /// The description and labels of item `i` (in [`Self::items`]' order); `None` when it
    /// cannot be read as clients would read it (see [`Described::read_listed`]).
    pub fn described(&self, i: usize) -> Option<&Described> {
        self.described[i]
            .get_or_init(|| Described::read(self.text(&self.items[i].1)))
            .as_ref()
    }

    /// The description and labels of the first item listed under `name`, if it can be read.
    pub fn find_described(&self, name: &str) -> Option<&Described> {
        self.by_name.get(name).and_then(|&i| self.described(i))
    }

    /// Each item's name and text, in order.
    pub fn items(&self) -> impl Iterator<Item = (&str, &str)> {
        self.items.iter().map(|(n, r)| (&**n, self.text(r)))
    }

    /// Where the list goes on, if it does.
    pub fn next_cursor(&self) -> Option<&str> {
        self.next_cursor.as_deref()
    }

    fn text(&self, range: &Range<usize>) -> &str {
        // The page was read as UTF-8 and each range is a whole JSON value of it.
        std::str::from_utf8(&self.page[range.clone()]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_clients_would_read_otherwise_are_not_read() {
        for (item, why) in [
            (r#"{"name":"a","Name":"b"}"#, Some("read as name")),
            (
                r#"{"name":"a","description":"x","description":"y"}"#,
                Some("description is given twice"),
            ),
            (
                r#"{"name":"a","inputSchema":{},"inputSchema":{"type":"object"}}"#,
                Some("inputSchema is given twice"),
            ),
            (
                r#"{"name":"a","descriptio\u006e":"x","description":"y"}"#,
                Some("description is given twice"),
            ),
            (r#"{"name":"a","other":1,"other":2}"#, None),
            (r#"{"name":"a","description":"x","annotations":null}"#, None),
        ] {
            let found = misread_member(item);
            assert_eq!(found.is_some(), why.is_some(), "{item}: {found:?}");
            if let (Some(found), Some(why)) = (&found, why) {
                assert!(found.contains(why), "{item}: {found}");
            }
            assert_eq!(
                Described::read_listed(item, "tools").is_none(),
                why.is_some(),
                "{item}"
            );
        }
        // A member of another type than clients expect: not read either.
        assert!(Described::read_listed(r#"{"name":"a","description":5}"#, "tools").is_none());
        let (name, d) = Described::read_listed(
            r#"{"name":"a","annotations":{"readOnlyHint":true}}"#,
            "tools",
        )
        .unwrap();
        assert_eq!(
            (name.as_deref(), d.labels.as_slice()),
            (Some("a"), &["read-only".to_owned()][..])
        );
    }

    #[test]
    fn items_are_found_by_the_name_they_are_listed_under() {
        let page = Bytes::from_static(
            br#"{"tools":[{"name":"a","description":"first \"a\""},{"description":"no name"},{"name":"b"},{"name":"a","description":"second"}],"nextCursor":"c2","other":[1,{"x":[]}]}"#,
        );
        let read = ListPage::read(page.clone(), "tools").unwrap();
        assert_eq!(
            read.find("a"),
            Some(r#"{"name":"a","description":"first \"a\""}"#)
        );
        assert_eq!(read.find("b"), Some(r#"{"name":"b"}"#));
        assert_eq!(read.find("c"), None);
        assert_eq!(read.next_cursor(), Some("c2"));
        let names: Vec<&str> = read.items().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "", "b", "a"]);
        assert_eq!(read.page().as_ptr(), page.as_ptr());
        let templates = Bytes::from_static(
            br#"{"resourceTemplates":[{"uriTemplate":"file:///{p}","name":"files"}]}"#,
        );
        let read = ListPage::read(templates, "resourceTemplates").unwrap();
        assert!(read.find("files").is_none(), "named by its template");
        assert!(read.find("file:///{p}").is_some());
        assert_eq!(read.next_cursor(), None);
        assert!(ListPage::read(Bytes::from_static(b"[1]"), "tools").is_none());
        let empty = ListPage::read(Bytes::from_static(b"{}"), "tools").unwrap();
        assert_eq!(empty.items().count(), 0);
    }
}
