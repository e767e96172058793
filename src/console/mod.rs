//! The operator console at `/ui/`: a page and its script and style, embedded in the binary
//! (no build step, no CDN). The page holds no data: it signs in with an admin token and reads
//! and changes everything through the admin API, so it is exactly as open as that API.

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderValue, Method, Response, StatusCode};

use crate::body::Body;

/// Where the console is.
pub const PREFIX: &str = "/ui";

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// Only the console's own script and style run, it talks only to its own origin, and no other
/// site may frame it (an admin page in someone's iframe is a clickjacking target).
/// Trusted Types make the browser refuse any HTML or script built from a string (the script
/// never does, and now cannot).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types 'none'";

/// Answers a request for `path` (under [`PREFIX`]).
pub fn serve(method: &Method, path: &str) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the console's files are read with GET\n",
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let (body, kind) = match path {
        "/ui" => {
            let mut r = crate::body::response(Body::Empty);
            *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/ui/"));
            return r;
        }
        "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return plain(StatusCode::NOT_FOUND, "no such console file\n"),
    };
    let mut r = crate::body::response(if method == Method::HEAD {
        Body::Empty
    } else {
        Body::full(body)
    });
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Small, and new with every build: revalidated each time rather than kept stale.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = crate::body::response(Body::full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files_and_cannot_be_framed() {
        let r = serve(&Method::GET, "/ui/");
        assert_eq!(r.status(), StatusCode::OK);
        let csp = r.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("require-trusted-types-for 'script'"));
        assert_eq!(r.headers()[X_FRAME_OPTIONS], "DENY");
        // Everything the page names is served from the binary, and nothing from elsewhere.
        for file in ["/ui/console.js", "/ui/console.css"] {
            assert!(INDEX.contains(file), "{file} is referenced");
            assert_eq!(serve(&Method::GET, file).status(), StatusCode::OK);
        }
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(
            !INDEX.contains("<script>"),
            "no inline script: the policy would block it"
        );
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        assert_eq!(
            serve(&Method::GET, "/ui").status(),
            StatusCode::PERMANENT_REDIRECT
        );
        assert_eq!(
            serve(&Method::GET, "/ui/../admin").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            serve(&Method::GET, "/ui/x.js").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            serve(&Method::POST, "/ui/").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn the_script_never_writes_markup_from_data() {
        // Every text from the gateway reaches the page as text (textContent), never parsed
        // as HTML: an entry's description cannot carry a script.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "console.js uses {sink}");
        }
    }
}
