//! The JSON text a hook judges, shared rather than copied.

use bytes::Bytes;

/// The JSON text a hook judges (a request's arguments, a result), shared with the buffer the
/// gateway read it into: the plugins of a chain see it without a copy each, and a plugin that
/// never asks for it (`call-context.payload`) never has it copied into its memory.
#[derive(Debug, Clone)]
pub struct JsonText(Bytes);

impl JsonText {
    /// `{}`, the arguments or params of a request that gives none.
    pub const EMPTY_OBJECT: JsonText = JsonText(Bytes::from_static(b"{}"));

    /// `text`, shared with `owner` when it lies within it (copied when it does not, as a
    /// default like `{}` does not).
    pub fn within(owner: &Bytes, text: &str) -> JsonText {
        let start = owner.as_ptr() as usize;
        let at = text.as_ptr() as usize;
        if at >= start && at + text.len() <= start + owner.len() {
            JsonText(owner.slice_ref(text.as_bytes()))
        } else {
            JsonText::from(text)
        }
    }

    /// `bytes`, shared when they are UTF-8 (nearly always), else decoded with replacement
    /// characters.
    pub fn from_utf8(bytes: &Bytes) -> JsonText {
        match std::str::from_utf8(bytes) {
            Ok(_) => JsonText(bytes.clone()),
            Err(_) => JsonText::from(String::from_utf8_lossy(bytes).into_owned()),
        }
    }

    /// The text's bytes (UTF-8).
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

impl From<&str> for JsonText {
    fn from(text: &str) -> JsonText {
        if text == "{}" {
            return JsonText::EMPTY_OBJECT;
        }
        JsonText(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl From<String> for JsonText {
    fn from(text: String) -> JsonText {
        JsonText(Bytes::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_within_its_buffer_is_shared_and_other_text_copied() {
        let owner = Bytes::from_static(br#"{"arguments":{"a":1}}"#);
        let inner = &std::str::from_utf8(&owner).unwrap()[13..20];
        let shared = JsonText::within(&owner, inner);
        assert_eq!(shared.as_bytes(), r#"{"a":1}"#);
        assert_eq!(shared.as_bytes().as_ptr(), inner.as_ptr(), "not copied");
        let elsewhere = String::from(r#"{"a":1}"#);
        let copied = JsonText::within(&owner, &elsewhere);
        assert_eq!(copied.as_bytes(), r#"{"a":1}"#);
        assert_ne!(copied.as_bytes().as_ptr(), elsewhere.as_ptr());
        // The whole buffer, and text that ends where it ends, are shared too.
        let all = std::str::from_utf8(&owner).unwrap();
        assert_eq!(
            JsonText::within(&owner, all).as_bytes().as_ptr(),
            owner.as_ptr()
        );
        let tail = &all[all.len() - 2..];
        assert_eq!(
            JsonText::within(&owner, tail).as_bytes().as_ptr(),
            tail.as_ptr()
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_decoded_with_replacements() {
        let ok = Bytes::from_static(b"{\"a\":\"\xc3\xa9\"}");
        assert_eq!(JsonText::from_utf8(&ok).as_bytes().as_ptr(), ok.as_ptr());
        let bad = Bytes::from_static(b"{\"a\":\"\xff\"}");
        assert_eq!(JsonText::from_utf8(&bad).as_bytes(), "{\"a\":\"\u{fffd}\"}");
    }
}
