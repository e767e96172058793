//! Substring searches made on every call, built once.
//!
//! `memchr::memmem::find` builds its searcher on each call, and for the small frames of a
//! call that building is most of what the search costs.

use std::sync::OnceLock;

use memchr::memmem::Finder;

/// A fixed text to look for, with its searcher built on first use.
pub struct Needle {
    text: &'static str,
    finder: OnceLock<Finder<'static>>,
}

impl Needle {
    /// A search for `text`.
    pub const fn new(text: &'static str) -> Needle {
        Needle {
            text,
            finder: OnceLock::new(),
        }
    }

    /// Whether `haystack` contains the text.
    pub fn is_in(&self, haystack: &[u8]) -> bool {
        self.finder
            .get_or_init(|| Finder::new(self.text.as_bytes()))
            .find(haystack)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::Needle;

    #[test]
    fn a_needle_finds_its_text_anywhere_and_nothing_else() {
        static N: Needle = Needle::new("progressToken");
        assert!(N.is_in(b"progressToken"));
        assert!(N.is_in(br#"{"_meta":{"progressToken":1}}"#));
        assert!(!N.is_in(b"progressTokeN"));
        assert!(!N.is_in(b"progress"));
        assert!(!N.is_in(b""));
        let long = format!("{}progressToken", "x".repeat(100_000));
        assert!(N.is_in(long.as_bytes()));
    }
}
