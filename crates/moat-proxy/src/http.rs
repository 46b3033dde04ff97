//! HTTP plumbing shared by inbound and outbound: the body type, hop-by-hop header hygiene,
//! request ids, and the deny responses (403 for HTTP, status 7 for gRPC).

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use moat_policy::eval::Reason;

/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every proxied request and response is converted to.
pub type Body = BoxBody<Bytes, BoxError>;

/// The verified caller identity, set for the app; any copy from outside is removed.
pub const PEER_ID: HeaderName = HeaderName::from_static("x-moat-peer-id");
/// The verified end user (`sub` of the bearer token), set for the app; any copy from outside is
/// removed.
pub const USER: HeaderName = HeaderName::from_static("x-moat-user");
/// The issuer (`iss`) of the token that named [`USER`], set with it; any copy from outside is
/// removed.
pub const USER_ISSUER: HeaderName = HeaderName::from_static("x-moat-user-issuer");
/// Why a request was denied.
pub const DENY_REASON: HeaderName = HeaderName::from_static("x-moat-deny-reason");
/// Between sidecars, on a request carried over HTTP/2 (decision 52): the local client spoke
/// HTTP/1.x, and the far side sends it to its app as HTTP/1.1.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-moat-orig-proto");
/// Request correlation id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Converts any body into [`Body`].
pub fn boxed<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

/// `body` as a [`Body`], keeping `held` (a place in a count of requests in flight) until the
/// body is dropped: when the response has ended or its stream was reset.
pub fn holding<B, T>(body: B, held: T) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
    T: Send + Sync + Unpin + 'static,
{
    boxed(Holding { body, _held: held })
}

struct Holding<B, T> {
    body: B,
    _held: T,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin, T: Unpin> hyper::body::Body for Holding<B, T> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A complete body.
pub fn full(text: impl Into<Bytes>) -> Body {
    boxed(Full::new(text.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}

/// The request's authority: from the URI, else the Host header, else `fallback`.
pub fn request_authority(parts: &http::request::Parts, fallback: &str) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| fallback.to_owned())
}

/// The request's authority ([`request_authority`]) and its path and query, for re-targeting it
/// at the next hop.
pub fn request_target(parts: &http::request::Parts, fallback: &str) -> (String, String) {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    (request_authority(parts, fallback), pq)
}

/// Removes every header the sidecars own (`x-moat-*`) from a request that came from outside,
/// in every spelling with `_` for any `-` (`x_moat_user`, `x_moat-user`, `x-moat_peer_id`):
/// many frameworks fold `-` and `_` into the same name.
pub fn strip_identity_headers(h: &mut HeaderMap) {
    let owned = |n: &HeaderName| {
        let n = n.as_str().as_bytes();
        n.len() >= 7
            && n[..7]
                .iter()
                .map(|b| {
                    if *b == b'_' {
                        b'-'
                    } else {
                        b.to_ascii_lowercase()
                    }
                })
                .eq(b"x-moat-".iter().copied())
    };
    if !h.keys().any(owned) {
        return;
    }
    let names: Vec<HeaderName> = h.keys().filter(|n| owned(n)).cloned().collect();
    for n in names {
        h.remove(n);
    }
}

/// Before an HTTP/1.1 request goes out: hyper sends no body for a GET (HEAD, CONNECT) of unknown
/// length unless the framing is set explicitly, and a body that came must go on, whatever the
/// method.
pub fn keep_body_framing<B: hyper::body::Body>(headers: &mut HeaderMap, body: &B) {
    if !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && !headers.contains_key(http::header::CONTENT_LENGTH)
    {
        headers.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// The headers that belong to one connection, never to the message (RFC 9110 §7.6.1; illegal
/// in HTTP/2).
const HOP_BY_HOP: [HeaderName; 5] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes connection-specific headers, which must not cross a hop (and are illegal in HTTP/2).
/// Most messages carry none, or only `Connection`; one pass over the names finds out before any
/// lookup is made.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Every `TE` line, not only the first: HTTP/2 allows `trailers` alone (a far side that
    // found another value would reset the stream as malformed), and a second line must not
    // ride through on the first one's value.
    let te_ok = h.get_all(http::header::TE).iter().all(|v| v == "trailers");
    if te_ok && !h.keys().any(|n| HOP_BY_HOP.contains(n)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too. Names already in `HOP_BY_HOP` (the
    // usual `keep-alive`) go below anyway: only other names are collected, so the common case
    // allocates nothing.
    // Split as bytes: a value with other bytes in it (obs-text) still names its headers.
    let named: Vec<HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|n| {
            !HOP_BY_HOP
                .iter()
                .any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(n))
        })
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if !te_ok {
        h.remove(http::header::TE);
    }
}

/// Whether a request is gRPC.
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Appends 16 or 8 random bytes to `out` as lowercase hex.
fn push_random_hex<const N: usize>(out: &mut String) {
    use rand::RngCore as _;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    let mut digits = [0u8; 32];
    let digits = &mut digits[..2 * N];
    if hex::encode_to_slice(b, digits).is_ok()
        && let Ok(text) = std::str::from_utf8(digits)
    {
        out.push_str(text);
    }
}

/// Whether a caller's `x-request-id` is kept: 1 to 128 visible ASCII characters without spaces,
/// quotes or backslashes. The id is written unquoted into the access log, so a space in it
/// could add fields of the caller's choosing to the line (`… request_id=x decision=allow`);
/// any other id is replaced by one of ours, which the app then receives.
fn plain_request_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// A request's path as the access log, taps and traces show it: every byte outside visible
/// ASCII percent-encoded. A path the allow-list refuses is still logged, and HTTP lets bytes
/// above ASCII into it (a request line, `:path`): raw, U+2028 or NEL would end the line for a
/// reader that splits on Unicode line breaks, and what followed would read as a line of the
/// caller's making. Paths of visible ASCII (every canonical one) come back unchanged.
pub fn printable_path(raw: &str) -> String {
    // CONTROLS is C0 and DEL; the encoder also encodes every byte above ASCII.
    const UNPRINTABLE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ');
    if raw.bytes().all(|b| b.is_ascii_graphic()) {
        return raw.to_owned();
    }
    percent_encoding::utf8_percent_encode(raw, UNPRINTABLE).to_string()
}

/// Marks the request's `x-request-id` and `traceparent` as never to be indexed by HPACK. Both
/// are new on every request, so on an HTTP/2 hop each one entered the encoder's dynamic table
/// only to push out entries that do repeat (and lengthened the list of same-name entries the
/// encoder compares on every request); sent as never-indexed literals, they leave the table to
/// the headers that repeat. The mark is lost when HTTP/2 decodes a header, so every hop sets it
/// again; it changes nothing on HTTP/1.1.
pub fn not_indexed(h: &mut HeaderMap) {
    for name in [&REQUEST_ID, &TRACEPARENT] {
        if let Some(v) = h.get_mut(name) {
            v.set_sensitive(true);
        }
    }
}

/// Ensures the request has an `x-request-id` and a `traceparent`, both marked [`not_indexed`];
/// returns the request id.
pub fn ensure_request_id(h: &mut HeaderMap) -> String {
    // One lookup per header on this per-request path: each is marked where it is found or made.
    let kept = match h.get_mut(&REQUEST_ID) {
        Some(v) if plain_request_id(v.as_bytes()) => {
            v.set_sensitive(true);
            Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
        }
        _ => None,
    };
    let id = kept.unwrap_or_else(|| {
        let mut id = String::with_capacity(32);
        push_random_hex::<16>(&mut id);
        if let Ok(mut v) = HeaderValue::from_str(&id) {
            v.set_sensitive(true);
            h.insert(REQUEST_ID, v);
        }
        id
    });
    match h.entry(TRACEPARENT) {
        http::header::Entry::Occupied(mut e) => e.get_mut().set_sensitive(true),
        http::header::Entry::Vacant(e) => {
            let mut tp = String::with_capacity(55);
            tp.push_str("00-");
            push_random_hex::<16>(&mut tp);
            tp.push('-');
            push_random_hex::<8>(&mut tp);
            tp.push_str("-01");
            if let Ok(mut v) = HeaderValue::from_str(&tp) {
                v.set_sensitive(true);
                e.insert(v);
            }
        }
    }
    id
}

/// The answer to a refused request. By reason: a missing or unacceptable end-user token gets 401
/// with `WWW-Authenticate` (gRPC 16), a rate limit 429 with `Retry-After` (gRPC 8), a path that
/// cannot be made canonical 400 (gRPC 3), anything else — a CONNECT included — 403 (gRPC 7).
/// All carry the reason in `x-moat-deny-reason`; the HTTP body names the reason, the policy and
/// the request id. None is a 5xx: a refusal is the caller's doing, not the service failing.
pub fn deny(
    reason: Reason,
    policy: Option<&str>,
    request_id: &str,
    grpc: bool,
    retry_after_secs: Option<u64>,
) -> Response<Body> {
    let code = reason.code();
    let detail = match policy {
        Some(p) => format!("{code} (policy {p})"),
        None => code.to_owned(),
    };
    let (status, grpc_status, challenge) = match reason {
        Reason::JwtMissing => (
            StatusCode::UNAUTHORIZED,
            "16",
            Some("Bearer realm=\"moat\"".to_owned()),
        ),
        r if r.is_unauthenticated() => (
            StatusCode::UNAUTHORIZED,
            "16",
            Some(format!(
                "Bearer realm=\"moat\", error=\"invalid_token\", error_description=\"{code}\""
            )),
        ),
        Reason::JwtClaimsNotAllowed => (
            StatusCode::FORBIDDEN,
            "7",
            Some("Bearer realm=\"moat\", error=\"insufficient_scope\"".to_owned()),
        ),
        Reason::RateLimited | Reason::CallerBusy => (StatusCode::TOO_MANY_REQUESTS, "8", None),
        Reason::InvalidPath => (StatusCode::BAD_REQUEST, "3", None),
        _ => (StatusCode::FORBIDDEN, "7", None),
    };
    let mut resp = if grpc {
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(grpc_status));
        if let Ok(v) =
            HeaderValue::from_str(&format!("moat denied: {detail}; request id {request_id}"))
        {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!(
            "{} {}: {detail}\nrequest id: {request_id}\n",
            status.as_u16(),
            status
                .canonical_reason()
                .unwrap_or("refused")
                .to_ascii_lowercase()
        )));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(code) {
        h.insert(DENY_REASON, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID, v);
    }
    if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(http::header::WWW_AUTHENTICATE, c);
    }
    if let Some(secs) = retry_after_secs {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// What the sidecar said in an answer it gave itself ([`answer_here`], [`app_fault`]), kept in
/// the answer's extensions for the direction's `forward`: it puts the request id on the answer
/// and the words in the access log's `detail`.
#[derive(Clone, Debug)]
struct AnsweredHere(String);

/// An answer from the sidecar itself, not from an app: a gateway error (no endpoint, upstream
/// failure: 502/503, gRPC UNAVAILABLE), a target it cannot send on (400, gRPC INVALID_ARGUMENT)
/// or a head too large for the mesh (431, gRPC RESOURCE_EXHAUSTED, as gRPC answers a message over
/// its limit); `why` says what to do. (A 403 would be gRPC PERMISSION_DENIED, but what the mesh
/// refuses as policy goes through [`deny`], with its reason and the request id.)
pub fn answer_here(status: StatusCode, why: &str, grpc: bool) -> Response<Body> {
    let grpc_status = match status {
        StatusCode::BAD_REQUEST => "3",
        StatusCode::FORBIDDEN => "7",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "8",
        _ => "14",
    };
    answer(status, grpc_status, why, grpc)
}

/// 502 for an app's answer the sidecar cannot pass on, after the app ran the request. A gRPC
/// client gets INTERNAL, not UNAVAILABLE: retry policies retry UNAVAILABLE, and a retry would
/// run the request again.
pub fn app_fault(why: &str, grpc: bool) -> Response<Body> {
    answer(StatusCode::BAD_GATEWAY, "13", why, grpc)
}

fn answer(status: StatusCode, grpc_status: &'static str, why: &str, grpc: bool) -> Response<Body> {
    let mut r = if grpc {
        let mut r = Response::new(empty());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(grpc_status));
        if let Ok(v) = HeaderValue::from_str(&format!("moat: {why}")) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{} {why}\n", status.as_u16())));
        *r.status_mut() = status;
        r
    };
    r.extensions_mut().insert(AnsweredHere(why.to_owned()));
    r
}

/// Finishes an answer before it goes back to the local client or calling sidecar: one the
/// sidecar gave itself carries the request id, as its refusals do. Returns what the sidecar
/// said, for the access log's `detail`.
pub fn answered_here(resp: &mut Response<Body>, request_id: &str) -> Option<String> {
    let AnsweredHere(why) = resp.extensions_mut().remove::<AnsweredHere>()?;
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    Some(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        // Each of them alone, and a `TE` other than `trailers` alone, is found too.
        for n in [
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "transfer-encoding",
            "connection",
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("x"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"], "{n}");
        }
        // Names in `Connection` in any case and spacing, beside the hop-by-hop ones it may
        // also name.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Keep-Alive ,X-Other, close,UPGRADE"),
        );
        for n in ["keep-alive", "x-other", "close", "upgrade", "x-keep"] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);
        // A value with a byte outside visible ASCII still names the headers beside it.
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_bytes(b"x-other, \xff").unwrap(),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        // `trailers` on the first line and something else on a later one: all of it goes.
        h.append("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn identity_headers_from_outside_are_removed_in_every_spelling() {
        let mut h = HeaderMap::new();
        for n in [
            "x-moat-peer-id",
            "x_moat_peer_id",
            "x-moat-user",
            "x_moat_user",
            "x_moat-user",
            "x-moat_peer_id",
            "x_moat-peer-id",
            "x-moat-anything",
        ] {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_static("spoofed"),
            );
        }
        h.insert("x-moatish", HeaderValue::from_static("1"));
        h.insert("x_moatish", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_identity_headers(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-keep", "x-moatish", "x_moatish"]);
    }

    #[test]
    fn printable_paths_encode_what_is_not_visible_ascii() {
        assert_eq!(printable_path("/a/b%2F;x?"), "/a/b%2F;x?");
        assert_eq!(
            printable_path("/x\u{2028}y\u{85}z \u{7f}\té"),
            "/x%E2%80%A8y%C2%85z%20%7F%09%C3%A9"
        );
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let tp = h.get(TRACEPARENT).unwrap().to_str().unwrap();
        let fields: Vec<&str> = tp.split('-').collect();
        assert_eq!(
            fields.iter().map(|f| f.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2],
            "{tp}"
        );
        assert_eq!(ensure_request_id(&mut h), id);
        let kept = "0af76519-16cd-43dd:8448/eb21+1c80=319c";
        h.insert(REQUEST_ID, HeaderValue::from_static(kept));
        assert_eq!(ensure_request_id(&mut h), kept);
    }

    /// Both per-request ids leave the HPACK table alone on every hop, whether this side made
    /// them or the caller sent them (decoded values arrive unmarked); other headers are indexed.
    #[test]
    fn request_ids_are_never_indexed() {
        let mut h = HeaderMap::new();
        h.insert(http::header::USER_AGENT, HeaderValue::from_static("curl/8"));
        ensure_request_id(&mut h);
        assert!(h[&REQUEST_ID].is_sensitive());
        assert!(h[&TRACEPARENT].is_sensitive());
        assert!(!h[http::header::USER_AGENT].is_sensitive());

        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("from-the-caller"));
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(ensure_request_id(&mut h), "from-the-caller");
        assert!(h[&REQUEST_ID].is_sensitive());
        assert!(h[&TRACEPARENT].is_sensitive());
    }

    /// An id that would read as more fields in the access log, or as a quoted value, is not
    /// taken from the caller: the request gets one of ours, and the app receives that one.
    #[test]
    fn request_ids_that_could_forge_log_fields_are_replaced() {
        let long = "a".repeat(129);
        for forged in [
            "abc decision=allow",
            "abc\tpeer=spiffe://x",
            "\"quoted\"",
            "back\\slash",
            "",
            long.as_str(),
        ] {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID, HeaderValue::from_str(forged).unwrap());
            let id = ensure_request_id(&mut h);
            assert_ne!(id, forged);
            assert_eq!(id.len(), 32, "{forged:?}");
            assert_eq!(h[&REQUEST_ID], id.as_str());
        }
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(ensure_request_id(&mut h).len(), 32);
    }

    #[test]
    fn denials_carry_the_reason() {
        let r = deny(
            Reason::RouteNotAllowed,
            Some("shop/orders@7"),
            "abc",
            false,
            None,
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[&DENY_REASON], "route-not-allowed");
        let g = deny(Reason::IdentityNotAllowed, None, "abc", true, None);
        assert_eq!(g.headers()["grpc-status"], "7");
        let u = deny(Reason::JwtExpired, None, "abc", false, None);
        assert_eq!(u.status(), StatusCode::UNAUTHORIZED);
        assert!(
            u.headers()[http::header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .contains("error_description=\"jwt-expired\"")
        );
        let l = deny(Reason::RateLimited, None, "abc", true, Some(2));
        assert_eq!(l.headers()["grpc-status"], "8");
        assert_eq!(l.headers()[http::header::RETRY_AFTER], "2");
    }
}
