//! Decisions a plugin would make again (`reuse_decisions`). A hook call that read of the call
//! nothing but its method, server, name, principal, profile, groups and scopes (and, for the
//! one-entry visibility check before a call, the entry), used no state, clock, randomness or
//! log, and answered allow, deny or a visibility, is kept; the next call alike in all of those
//! gets the same answer without running the plugin. The host sees the guest's host calls
//! (`host::Unkeyed`), so a plugin that looks at the arguments, or counts calls in its state, is
//! asked every time; what the host cannot see, memory the guest keeps between calls (what it
//! read in `init` included), is why an operator turns this on for a plugin rather than the
//! gateway for all.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use super::CallContext;
use super::bindings::{self, EntryKind};

/// Most answers kept for one plugin, and most bytes their questions and reasons take. Past
/// either they are all forgotten and kept anew: callers, names and entries are the client's
/// to choose, and must not grow the gateway's memory.
pub(crate) const MAX_KEPT: usize = 4096;
pub(crate) const MAX_KEPT_BYTES: usize = 4 << 20;
/// Largest question and answer kept (a long name or reason, or hundreds of groups, are asked
/// again each time).
pub(crate) const MAX_ONE_BYTES: usize = 16 << 10;

/// What a plugin was asked, besides the call's fields.
#[derive(Clone, Copy)]
pub(crate) enum Asked<'a> {
    /// `on-request`.
    Request,
    /// `on-response`.
    Response,
    /// `filter-list` over one entry.
    Visible(&'a bindings::ListEntry<'a>),
}

/// A plugin's kept answers.
pub(crate) struct Decisions {
    hasher: foldhash::fast::RandomState,
    kept: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    answers: foldhash::HashMap<u64, Kept>,
    /// What the kept questions and reasons take, in bytes.
    bytes: usize,
}

/// The hash of a question not answered from the kept ones, to keep its answer under.
pub(crate) struct Miss(u64);

struct Kept {
    question: Question,
    answer: Answer,
    /// [`Question::bytes`] and the reason's.
    bytes: usize,
}

/// An answer worth keeping (a rewrite depends on the payload, which is never kept).
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// `allow`.
    Allow,
    /// `deny`, with the plugin's code and reason.
    Deny(bindings::Denial),
    /// Whether `filter-list` showed its one entry.
    Visible(bool),
}

/// A question as kept: the call's fields and the entry.
struct Question {
    hook: u8,
    method: Box<str>,
    server: Box<str>,
    name: Option<Box<str>>,
    principal: Option<Box<str>>,
    profile: Option<Box<str>>,
    groups: Box<[Box<str>]>,
    scopes: Box<[Box<str>]>,
    entry: Option<Entry>,
}

struct Entry {
    kind: u8,
    name: Box<str>,
    description: Option<Box<str>>,
    labels: Box<[Box<str>]>,
}

fn hook_of(asked: Asked<'_>) -> u8 {
    match asked {
        Asked::Request => 0,
        Asked::Response => 1,
        Asked::Visible(_) => 2,
    }
}

fn kind_of(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Tool => 0,
        EntryKind::Prompt => 1,
        EntryKind::Resource => 2,
        EntryKind::ResourceTemplate => 3,
        EntryKind::Server => 4,
    }
}

/// The bytes a list of texts keeps: each text and its box.
fn text_bytes(items: &[impl AsRef<str>]) -> usize {
    items
        .iter()
        .map(|s| s.as_ref().len() + std::mem::size_of::<Box<str>>())
        .sum()
}

fn boxed(items: &[impl AsRef<str>]) -> Box<[Box<str>]> {
    items.iter().map(|s| s.as_ref().into()).collect()
}

fn same(kept: &[Box<str>], asked: &[impl AsRef<str>]) -> bool {
    kept.len() == asked.len() && kept.iter().zip(asked).all(|(k, a)| **k == *a.as_ref())
}

impl Question {
    /// The bytes the question would keep, with its place in the book.
    fn bytes(asked: Asked<'_>, ctx: &CallContext<'_>) -> usize {
        let entry = match asked {
            Asked::Visible(e) => {
                e.name.len() + e.description.map_or(0, str::len) + text_bytes(e.labels)
            }
            Asked::Request | Asked::Response => 0,
        };
        std::mem::size_of::<(u64, Kept)>()
            + std::mem::size_of::<Entry>()
            + ctx.method.len()
            + ctx.server.len()
            + ctx.name.map_or(0, str::len)
            + ctx.principal.map_or(0, str::len)
            + ctx.profile.map_or(0, str::len)
            + text_bytes(ctx.groups)
            + text_bytes(ctx.scopes)
            + entry
    }

    fn of(asked: Asked<'_>, ctx: &CallContext<'_>) -> Question {
        Question {
            hook: hook_of(asked),
            method: ctx.method.into(),
            server: ctx.server.into(),
            name: ctx.name.map(Into::into),
            principal: ctx.principal.map(Into::into),
            profile: ctx.profile.map(Into::into),
            groups: boxed(ctx.groups),
            scopes: boxed(ctx.scopes),
            entry: match asked {
                Asked::Visible(e) => Some(Entry {
                    kind: kind_of(e.kind),
                    name: e.name.into(),
                    description: e.description.map(Into::into),
                    labels: boxed(e.labels),
                }),
                Asked::Request | Asked::Response => None,
            },
        }
    }

    fn is(&self, asked: Asked<'_>, ctx: &CallContext<'_>) -> bool {
        let entry = match (asked, &self.entry) {
            (Asked::Visible(e), Some(k)) => {
                kind_of(e.kind) == k.kind
                    && e.name == &*k.name
                    && e.description == k.description.as_deref()
                    && same(&k.labels, e.labels)
            }
            (Asked::Request | Asked::Response, None) => true,
            _ => false,
        };
        entry
            && self.hook == hook_of(asked)
            && *self.method == *ctx.method
            && *self.server == *ctx.server
            && self.name.as_deref() == ctx.name
            && self.principal.as_deref() == ctx.principal
            && self.profile.as_deref() == ctx.profile
            && same(&self.groups, ctx.groups)
            && same(&self.scopes, ctx.scopes)
    }
}

impl Decisions {
    pub(crate) fn new() -> Decisions {
        Decisions {
            hasher: foldhash::fast::RandomState::default(),
            kept: Mutex::default(),
        }
    }

    fn hash(&self, asked: Asked<'_>, ctx: &CallContext<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        hook_of(asked).hash(&mut h);
        ctx.method.hash(&mut h);
        ctx.server.hash(&mut h);
        ctx.name.hash(&mut h);
        ctx.principal.hash(&mut h);
        ctx.profile.hash(&mut h);
        ctx.groups.hash(&mut h);
        ctx.scopes.hash(&mut h);
        if let Asked::Visible(e) = asked {
            kind_of(e.kind).hash(&mut h);
            e.name.hash(&mut h);
            e.description.hash(&mut h);
            e.labels.hash(&mut h);
        }
        h.finish()
    }

    /// The kept answer to this question, or where to keep the plugin's.
    pub(crate) fn answer(&self, asked: Asked<'_>, ctx: &CallContext<'_>) -> Result<Answer, Miss> {
        let hash = self.hash(asked, ctx);
        let book = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        match book.answers.get(&hash) {
            // Another question of the same hash (never seen, but not assumed away) is a miss.
            Some(k) if k.question.is(asked, ctx) => Ok(k.answer.clone()),
            _ => Err(Miss(hash)),
        }
    }

    /// Keeps the plugin's answer to a question it answered from the keyed fields alone.
    pub(crate) fn keep(&self, miss: Miss, asked: Asked<'_>, ctx: &CallContext<'_>, answer: Answer) {
        let reason = match &answer {
            Answer::Deny(denial) => denial.message.len(),
            Answer::Allow | Answer::Visible(_) => 0,
        };
        let bytes = Question::bytes(asked, ctx) + reason;
        if bytes > MAX_ONE_BYTES {
            return;
        }
        let question = Question::of(asked, ctx);
        let mut book = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let new = !book.answers.contains_key(&miss.0);
        if new && (book.answers.len() >= MAX_KEPT || book.bytes + bytes > MAX_KEPT_BYTES) {
            book.answers.clear();
            book.bytes = 0;
        }
        if let Some(old) = book.answers.insert(
            miss.0,
            Kept {
                question,
                answer,
                bytes,
            },
        ) {
            book.bytes -= old.bytes;
        }
        book.bytes += bytes;
    }

    /// Answers kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .answers
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(
        name: &'a str,
        principal: Option<&'a str>,
        groups: &'a [Box<str>],
    ) -> CallContext<'a> {
        CallContext {
            method: "tools/call",
            server: "files",
            name: Some(name),
            principal,
            session_id: "s",
            profile: None,
            groups,
            scopes: &[],
        }
    }

    /// Asks `c`, which must miss, and keeps an allow for it.
    fn keep_allow(d: &Decisions, c: &CallContext<'_>) {
        let miss = d.answer(Asked::Request, c).expect_err("not kept yet");
        d.keep(miss, Asked::Request, c, Answer::Allow);
    }

    fn allowed(answer: Result<Answer, Miss>) -> Option<bool> {
        match answer.ok()? {
            Answer::Allow => Some(true),
            Answer::Deny(_) => Some(false),
            Answer::Visible(_) => None,
        }
    }

    #[test]
    fn an_answer_stands_only_for_a_question_alike_in_every_keyed_field() {
        let d = Decisions::new();
        let admins: [Box<str>; 1] = ["admins".into()];
        let alice = ctx("fs_read", Some("alice"), &admins);
        let miss = d
            .answer(Asked::Request, &alice)
            .expect_err("nothing kept yet");
        let deny = Answer::Deny(bindings::Denial {
            code: Some(-32050),
            message: "no".into(),
        });
        d.keep(miss, Asked::Request, &alice, deny);
        match d.answer(Asked::Request, &alice) {
            Ok(Answer::Deny(denial)) => {
                assert_eq!((denial.code, denial.message.as_str()), (Some(-32050), "no"));
            }
            _ => panic!("the kept denial, with its code and reason"),
        }
        // Each field tells questions apart; so does the hook.
        let others = [
            ctx("fs_write", Some("alice"), &admins),
            ctx("fs_read", Some("bob"), &admins),
            ctx("fs_read", None, &admins),
            ctx("fs_read", Some("alice"), &[]),
            CallContext {
                server: "other",
                ..alice
            },
            CallContext {
                method: "prompts/get",
                ..alice
            },
            CallContext {
                profile: Some("p"),
                ..alice
            },
            CallContext {
                scopes: &admins,
                ..alice
            },
            CallContext {
                name: None,
                ..alice
            },
        ];
        for other in &others {
            assert!(d.answer(Asked::Request, other).is_err(), "{other:?}");
        }
        assert!(d.answer(Asked::Response, &alice).is_err());
        // The session is not a keyed field: a plugin that reads it is not kept at all.
        let other_session = CallContext {
            session_id: "t",
            ..alice
        };
        assert_eq!(
            allowed(d.answer(Asked::Request, &other_session)),
            Some(false)
        );
    }

    #[test]
    fn a_visibility_is_kept_per_entry() {
        let d = Decisions::new();
        let c = ctx("t", Some("alice"), &[]);
        let labels = ["destructive"];
        let entry = bindings::ListEntry {
            kind: EntryKind::Tool,
            name: "t",
            description: None,
            labels: &labels,
        };
        let miss = d.answer(Asked::Visible(&entry), &c).unwrap_err();
        d.keep(miss, Asked::Visible(&entry), &c, Answer::Visible(false));
        assert!(matches!(
            d.answer(Asked::Visible(&entry), &c),
            Ok(Answer::Visible(false))
        ));
        let unlabelled = bindings::ListEntry {
            labels: &[],
            ..entry
        };
        let described = bindings::ListEntry {
            description: Some("d"),
            ..entry
        };
        let prompt = bindings::ListEntry {
            kind: EntryKind::Prompt,
            ..entry
        };
        for other in [unlabelled, described, prompt] {
            assert!(d.answer(Asked::Visible(&other), &c).is_err());
        }
        assert!(d.answer(Asked::Request, &c).is_err());
    }

    #[test]
    fn kept_answers_stay_bounded_whatever_names_clients_choose() {
        let d = Decisions::new();
        for i in 0..MAX_KEPT * 2 + 7 {
            let name = format!("tool-{i}");
            let c = ctx(&name, Some("alice"), &[]);
            keep_allow(&d, &c);
            assert!(d.len() <= MAX_KEPT);
        }
        // The newest is kept.
        let last = format!("tool-{}", MAX_KEPT * 2 + 6);
        assert_eq!(
            allowed(d.answer(Asked::Request, &ctx(&last, Some("alice"), &[]))),
            Some(true)
        );
        // Long names: the bytes bound holds before the count's, and a name longer than one
        // question may be is asked again each time.
        let d = Decisions::new();
        for i in 0..2 * MAX_KEPT_BYTES / 2000 {
            let name = format!("{i:02000}");
            let c = ctx(&name, Some("alice"), &[]);
            keep_allow(&d, &c);
            let book = d.kept.lock().unwrap();
            assert!(book.bytes <= MAX_KEPT_BYTES && book.answers.len() < MAX_KEPT_BYTES / 2000);
        }
        let long = "x".repeat(MAX_ONE_BYTES);
        let c = ctx(&long, Some("alice"), &[]);
        keep_allow(&d, &c);
        assert!(d.answer(Asked::Request, &c).is_err());
    }
}
