//! The canonical request path: the one form of a request's path that a rule is matched against
//! AND that the app receives, so that what the allow-list checked is exactly what reaches the
//! app.
//!
//! Rules, in order (docs/policy.md states them for operators):
//! 1. The path must start with `/` (origin-form, or the path of an absolute-form target).
//! 2. Every byte must be visible ASCII (`!` to `~`); a raw `\` is refused.
//! 3. `%XY` must be two hex digits. It is decoded when it encodes an unreserved character
//!    (letters, digits, `-`, `.`, `_`, `~`); it is refused when it encodes `/`, `\`, NUL or
//!    another control character; anything else stays encoded, with upper-case hex digits.
//! 4. Dot segments are removed (RFC 3986 section 5.2.4) after that decoding, so `%2e%2e` is
//!    `..`. A dot segment followed by parameters or another escape (`..;x`, `.;x`, `..%3B`,
//!    `.%20`) is refused, because some servers decode and strip `;` parameters before resolving
//!    dot segments.
//! 5. Nothing else changes: empty segments (`//`), `;` parameters of ordinary segments and the
//!    query are kept as sent.
//!
//! The result never contains a `.` or `..` segment, so a prefix match on it is a real
//! containment: `/public/*` admits only paths under `/public/`.

use std::borrow::Cow;

/// Why a path cannot be made safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path holds a byte that is not visible ASCII (0x{0:02x})")]
    Byte(u8),
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path holds a '%' that is not followed by two hex digits")]
    BadEscape,
    #[error("the path encodes a '/' or '\\' (%2F, %5C)")]
    EncodedSeparator,
    #[error("the path encodes NUL or a control character")]
    EncodedControl,
    #[error("a '.' or '..' segment carries ';' parameters or escapes")]
    DotSegmentParameters,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Checks one byte that is not part of an escape.
fn plain(b: u8) -> Result<(), PathError> {
    match b {
        b'\\' => Err(PathError::Backslash),
        b'!'..=b'~' => Ok(()),
        other => Err(PathError::Byte(other)),
    }
}

/// Whether `raw` is already canonical as far as a quick scan can tell: no escapes, no dot
/// segments, only allowed bytes. Most real requests are, and cost no allocation.
fn already_canonical(raw: &str) -> bool {
    let b = raw.as_bytes();
    b.first() == Some(&b'/')
        && b.iter().all(|&c| c != b'%' && plain(c).is_ok())
        && !b.windows(2).any(|w| w == b"/.")
}

/// One segment with its escapes decoded as far as rule 3 allows.
fn decode_segment(seg: &str) -> Result<Cow<'_, str>, PathError> {
    let b = seg.as_bytes();
    if !b.contains(&b'%') {
        for &c in b {
            plain(c)?;
        }
        return Ok(Cow::Borrowed(seg));
    }
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c != b'%' {
            plain(c)?;
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let v = hi << 4 | lo;
        match v {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(PathError::EncodedControl),
            v if unreserved(v) => out.push(char::from(v)),
            v => {
                const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(DIGITS[usize::from(v >> 4)]));
                out.push(char::from(DIGITS[usize::from(v & 0xf)]));
            }
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

/// The canonical form of a request path (without its query), or why it has none. See the
/// module documentation for the rules.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if already_canonical(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let pieces: Vec<&str> = raw[1..].split('/').collect();
    let last = pieces.len() - 1;
    let mut segments: Vec<Cow<'_, str>> = Vec::with_capacity(pieces.len());
    // Whether the result ends in '/' because its last segment was a dot segment.
    let mut trailing_slash = false;
    for (i, piece) in pieces.into_iter().enumerate() {
        let seg = decode_segment(piece)?;
        match seg.as_ref() {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                // Some servers cut parameters at `;` (or a decoded `%3B`) and only then resolve
                // dot segments.
                let head = s.split([';', '%']).next().unwrap_or(s);
                if head.len() < s.len() && (head == "." || head == "..") {
                    return Err(PathError::DotSegmentParameters);
                }
                segments.push(seg);
                if i == last {
                    trailing_slash = false;
                }
                continue;
            }
        }
        if i == last {
            trailing_slash = true;
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// A canonical path as servers commonly read it: empty segments (`//`) and segment parameters
/// (`;…`) dropped and no trailing `/`. The canonical path keeps those spellings apart (they
/// reach the app as sent), but many servers serve them all as one resource, so a rate limit
/// counts them as one: its buckets are keyed by this path, and a limited rule throttles a
/// request whose path reads as one it admits ([`crate::eval::limiting_rules`]).
pub fn server_path(canonical: &str) -> Cow<'_, str> {
    let plain = canonical
        .split('/')
        .skip(1)
        .all(|seg| !seg.is_empty() && !seg.contains(';'));
    if plain || canonical == "/" {
        return Cow::Borrowed(canonical);
    }
    let mut out = String::with_capacity(canonical.len());
    for segment in canonical.split('/') {
        let segment = segment.split(';').next().unwrap_or("");
        if !segment.is_empty() {
            out.push('/');
            out.push_str(segment);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Whether a request with `method` is forwarded at all. CONNECT is not: it asks for a tunnel,
/// whose target is an authority with no path for a rule to judge and whose bytes the
/// allow-list would never see, and as an HTTP/2 stream it is malformed. Sidecars refuse it
/// before any rule is looked at (403 `method-not-supported`); opaque TCP is what the mesh
/// carries instead, on a port a rule without `http` allows.
pub fn is_forwarded_method(method: &str) -> bool {
    method != "CONNECT"
}

/// Whether `method` is an HTTP method token (RFC 9110 section 9: one or more `tchar`). Methods
/// are case-sensitive: `get` is a method, and not `GET`.
pub fn is_method_token(method: &[u8]) -> bool {
    !method.is_empty()
        && method.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        canonical_path(raw)
            .unwrap_or_else(|e| panic!("{raw}: {e}"))
            .into_owned()
    }

    #[test]
    fn the_table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/public/x", Ok("/public/x")),
            ("/public/a/../b", Ok("/public/b")),
            ("/public/../admin", Ok("/admin")),
            ("/public/%2e%2e/admin", Ok("/admin")),
            ("/public/%2E%2E/admin", Ok("/admin")),
            ("/public/.%2e/admin", Ok("/admin")),
            ("/public/./../admin", Ok("/admin")),
            ("/public/x/../../admin", Ok("/admin")),
            ("/public/x;/../../admin", Ok("/admin")),
            ("/public/./x", Ok("/public/x")),
            ("/public/././x", Ok("/public/x")),
            ("/public/..", Ok("/")),
            ("/public/.", Ok("/public/")),
            ("/public/x/..", Ok("/public/")),
            ("/..", Ok("/")),
            ("/../../etc/passwd", Ok("/etc/passwd")),
            ("/a//b", Ok("/a//b")),
            ("/a//..", Ok("/a/")),
            ("/public/%61dmin", Ok("/public/admin")),
            ("/public/%7e%5f", Ok("/public/~_")),
            ("/public/a%20b", Ok("/public/a%20b")),
            ("/public/a%3fb", Ok("/public/a%3Fb")),
            ("/public/%25", Ok("/public/%25")),
            ("/public/%252e%252e/admin", Ok("/public/%252e%252e/admin")),
            ("/public/x;y=1", Ok("/public/x;y=1")),
            ("/public/..%2fadmin", Err(PathError::EncodedSeparator)),
            ("/public/..%2Fadmin", Err(PathError::EncodedSeparator)),
            ("/public/..%5cadmin", Err(PathError::EncodedSeparator)),
            ("/public/..\\admin", Err(PathError::Backslash)),
            ("/public/%00", Err(PathError::EncodedControl)),
            ("/public/%0a", Err(PathError::EncodedControl)),
            ("/public/%7f", Err(PathError::EncodedControl)),
            ("/public/%", Err(PathError::BadEscape)),
            ("/public/%2", Err(PathError::BadEscape)),
            ("/public/%zz", Err(PathError::BadEscape)),
            ("/public/a b", Err(PathError::Byte(b' '))),
            ("/public/\u{e9}", Err(PathError::Byte(0xc3))),
            ("/public/\t", Err(PathError::Byte(b'\t'))),
            ("/public/..;/admin", Err(PathError::DotSegmentParameters)),
            ("/public/.;x/admin", Err(PathError::DotSegmentParameters)),
            (
                "/public/%2e%2e;/admin",
                Err(PathError::DotSegmentParameters),
            ),
            ("/public/..%3B/admin", Err(PathError::DotSegmentParameters)),
            ("/public/..%3b/admin", Err(PathError::DotSegmentParameters)),
            ("/public/.%20/admin", Err(PathError::DotSegmentParameters)),
            ("/public/x%3B/admin", Ok("/public/x%3B/admin")),
            ("/public/...", Ok("/public/...")),
            ("public/x", Err(PathError::NotAbsolute)),
            ("*", Err(PathError::NotAbsolute)),
            ("", Err(PathError::NotAbsolute)),
        ];
        for (raw, want) in cases {
            let got = canonical_path(raw).map(|c| c.into_owned());
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{raw:?}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed_and_stable() {
        for raw in ["/", "/orders/1", "/a//b", "/x;y", "/.well-known/x", "/a."] {
            assert!(
                matches!(canonical_path(raw), Ok(Cow::Borrowed(_))) || raw.contains("/."),
                "{raw}"
            );
            assert_eq!(ok(&ok(raw)), ok(raw), "{raw}");
        }
        assert_eq!(ok("/.well-known/x"), "/.well-known/x");
    }

    #[test]
    fn method_tokens() {
        for m in ["GET", "get", "PROPFIND", "M-SEARCH", "X!"] {
            assert!(is_method_token(m.as_bytes()), "{m}");
        }
        for m in ["", "G T", "GET/", "GÉT", "G\"T", "(GET)"] {
            assert!(!is_method_token(m.as_bytes()), "{m}");
        }
    }

    #[test]
    fn only_connect_is_never_forwarded() {
        assert!(!is_forwarded_method("CONNECT"));
        // Methods are case-sensitive: `connect` is an extension method, judged like any other.
        for m in ["GET", "POST", "OPTIONS", "PROPFIND", "connect"] {
            assert!(is_forwarded_method(m), "{m}");
        }
    }

    // The security property (what a prefix admits stays under it, even for an app that
    // decodes and resolves the path again) is checked by proptest and libFuzzer in
    // fuzz/checks, which also replays the fuzz corpora.
}
