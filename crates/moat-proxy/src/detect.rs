//! Protocol detection: read the first bytes a client sends (waiting a short while) and decide
//! between HTTP/2 (the connection preface), HTTP/1 (a request line: any method token, a target
//! and `HTTP/1.x`) and opaque TCP. The bytes read are replayed by [`Prefixed`], so nothing is
//! lost. Detection only classifies: what opaque TCP may reach is the policy's call (a caller
//! whose rules constrain HTTP is refused, `protocol-not-allowed`), so guessing "TCP" never
//! widens access.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use moat_policy::target::is_method_token;
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};

/// How long to wait for a client's first bytes before treating the connection as opaque TCP
/// (server-first protocols send nothing until the server speaks).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest request line looked at; a longer first line that starts like a request
/// (`TOKEN /…`) is handed to the HTTP server, which refuses it.
const MAX_REQUEST_LINE: usize = 64 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP requests, served by `conn_guard::serve_http`.
    Http(HttpVersion),
    /// Opaque bytes, relayed.
    Tcp,
}

/// Which HTTP a served connection speaks: detection (or ALPN) decides, and the connection is
/// served as that one alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0 or HTTP/1.1: a request line.
    Http1,
    /// HTTP/2: the connection preface, or the mesh's `h2` ALPN.
    Http2,
}

/// Classifies `buf`; `None` when more bytes are needed to tell. Bytes that still leave it open
/// at a request line's length (a method token without end, blank bytes without end) are HTTP/1,
/// for the HTTP server to refuse: nothing is read without end to tell.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    match classify_start(buf) {
        None if buf.len() >= MAX_REQUEST_LINE => Some(Protocol::Http(HttpVersion::Http1)),
        found => found,
    }
}

fn classify_start(mut buf: &[u8]) -> Option<Protocol> {
    // A server configured for the PROXY protocol reads its header and then the request: what
    // follows the headers is what the app takes as the connection's first bytes.
    while let Some(header) = proxy_header(buf) {
        buf = &buf[header?..];
    }
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http(HttpVersion::Http2));
    }
    if may_be_h2_preface(buf) {
        return None;
    }
    classify_http1(buf)
}

/// The signature that starts a PROXY protocol version 2 header.
const PROXY_V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Whether `buf` starts with a PROXY protocol header (version 1, `PROXY …\r\n`, or version 2's
/// binary one, whose length is in its 15th and 16th bytes): `Some` with its length, or with
/// `None` while it is not complete yet; `None` when `buf` does not start with one.
fn proxy_header(buf: &[u8]) -> Option<Option<usize>> {
    if buf.starts_with(b"PROXY ") {
        return Some(buf.iter().position(|&b| b == b'\n').map(|i| i + 1));
    }
    if buf.starts_with(PROXY_V2) {
        let len = buf
            .get(14..16)
            .map(|l| 16 + usize::from(u16::from_be_bytes([l[0], l[1]])));
        return Some(len.filter(|&len| buf.len() >= len));
    }
    PROXY_V2.starts_with(buf).then_some(None)
}

/// Whether `buf` is the start of the HTTP/2 connection preface, not all of it yet.
pub fn may_be_h2_preface(buf: &[u8]) -> bool {
    buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf)
}

/// Classifies `buf` as the start of an HTTP/1 request or not, the way the most lenient servers
/// read one, not the way the standard writes it. Blanks are what any of them skips or splits on:
/// SP, HT, CR, VT, FF, `\x1c`-`\x1f`, NEL and NBSP (Python's `str.split` over Latin-1), and
/// before the method any control byte too. After blanks, a method token and more blanks, it is
/// HTTP when
/// - the target is in origin (`/`) or asterisk (`*`) form, or absolute form with any scheme
///   (`x:/…`: Go, hyper and Node take any scheme and route on the path);
/// - the method is `CONNECT` (any case), or `GET`, which Python's `http.server` takes with a
///   bare target and no version (HTTP/0.9), headers and all;
/// - the line ends with a word that starts with `HTTP/` (any case), whatever the target;
/// - the method is upper case and the target is the line's last word (waitress takes a request
///   line without a version).
///
/// PROXY protocol headers before it are skipped ([`proxy_header`]), and so are bytes 0x7f-0x9f
/// before the method. What this calls HTTP goes to the sidecar's own strict server, which
/// refuses what is malformed; what it calls TCP (`get key`, `ehlo me`, `PING`, `SET k 1`,
/// binary) is a line none of those servers reads as a request.
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    const HTTP1: Option<Protocol> = Some(Protocol::Http(HttpVersion::Http1));
    let blank = |b: u8| {
        matches!(
            b,
            b' ' | b'\t' | b'\r' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0
        )
    };
    // Before the method, every control byte, C1 controls (0x7f-0x9f, which some servers'
    // character classes count as controls) and NBSP.
    let start = buf
        .iter()
        .position(|&b| b > b' ' && !(0x7f..=0xa0).contains(&b))?;
    let buf = &buf[start..];
    let token_len = buf.iter().position(|&b| !is_method_token(&[b]))?;
    if token_len == 0 {
        return Some(Protocol::Tcp);
    }
    let (method, rest) = buf.split_at(token_len);
    let blanks = rest.iter().position(|&b| !blank(b))?;
    if blanks == 0 || rest[blanks] == b'\n' {
        return Some(Protocol::Tcp);
    }
    let target = &rest[blanks..];
    if method.eq_ignore_ascii_case(b"CONNECT")
        || method == b"GET"
        || matches!(target[0], b'/' | b'*')
    {
        return HTTP1;
    }
    match absolute_form(target) {
        Some(true) => return HTTP1,
        None => return None,
        Some(false) => {}
    }
    // Any other target: HTTP when the line's last word is a version, or when the target is the
    // line's only word after an upper-case method (waitress takes a request line without a
    // version, headers and all, and unquotes `%2Fadmin`).
    let line_end = target.iter().position(|&b| b == b'\n')?;
    let mut words = target[..line_end]
        .split(|&b| blank(b))
        .filter(|w| !w.is_empty());
    let last_word = words.next_back().unwrap_or_default();
    let version = b"HTTP/";
    let bare_target = words.next().is_none() && method.iter().all(u8::is_ascii_uppercase);
    Some(
        if bare_target
            || last_word.len() >= version.len()
                && last_word[..version.len()].eq_ignore_ascii_case(version)
        {
            Protocol::Http(HttpVersion::Http1)
        } else {
            Protocol::Tcp
        },
    )
}

/// Whether `target` starts in absolute form: a scheme (a letter, then letters, digits, `+`, `-`
/// or `.`), `:` and `/`. `None` while what has come could still be one.
fn absolute_form(target: &[u8]) -> Option<bool> {
    let (&first, rest) = target.split_first()?;
    if !first.is_ascii_alphabetic() {
        return Some(false);
    }
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b':' => {
                return rest.get(i + 1).map(|&next| next == b'/');
            }
            b if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.') => {}
            _ => return Some(false),
        }
    }
    None
}

/// Whether `buf`, fewer than 9 bytes, could still be the start of an HTTP/2 SETTINGS frame on
/// stream 0 ([`is_h2_settings`]).
pub fn may_be_h2_settings(buf: &[u8]) -> bool {
    buf.len() < 9
        && buf.get(3).is_none_or(|&t| t == 0x04)
        && buf.get(4).is_none_or(|&f| f & !0x01 == 0)
        && buf.iter().skip(5).all(|&b| b == 0)
}

/// Whether `buf` starts with an HTTP/2 SETTINGS frame on stream 0, as an HTTP/2 server's first
/// bytes do (its preface, sent without waiting for the client's).
pub fn is_h2_settings(buf: &[u8]) -> bool {
    buf.len() >= 9 && buf[3] == 0x04 && buf[4] & !0x01 == 0 && buf[5..9] == [0, 0, 0, 0]
}

/// Reads until the protocol is known, the peer stops sending for [`DETECT_TIMEOUT`], or it
/// closes. Returns the protocol, `None` when the deadline came first, and the bytes read.
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(Option<Protocol>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, read_more(io, &mut buf)).await {
            Err(_) => return Ok((None, buf)),
            Ok(r) => {
                if let Some(p) = r? {
                    return Ok((Some(p), buf));
                }
            }
        }
    }
}

/// Reads what `io` has next onto `buf` and classifies all of it: `None` while more bytes are
/// needed to tell; a peer that closes first is classified as if its last line had ended, and is
/// opaque TCP when that still tells nothing. Cancel-safe: the bytes of a read that
/// completes are appended before it returns.
pub async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Protocol>> {
    let mut chunk = [0u8; 1024];
    let n = io.read(&mut chunk).await?;
    if n == 0 {
        // The end of the stream ends a line too: a server reading a request line without its
        // newline takes what came (Python's `readline`).
        let ended = [&buf[..], b"\n"].concat();
        return Ok(Some(classify(&ended).unwrap_or(Protocol::Tcp)));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(classify(buf))
}

/// A stream that first yields `prefix`, then reads from `inner`. Writes go to `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before `inner`'s bytes.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The prefix bytes not replayed yet, and the wrapped stream.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        let mut rest = self.prefix;
        rest.drain(..self.pos);
        (rest, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::forward::forward_writes!(Prefixed, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWrite as _;

    const HTTP1: Protocol = Protocol::Http(HttpVersion::Http1);
    const HTTP2: Protocol = Protocol::Http(HttpVersion::Http2);

    #[test]
    fn classifies() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"GET /orders"), Some(HTTP1));
        assert_eq!(classify(b"DELE"), None);
        assert_eq!(classify(b"GET "), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(HTTP2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Some(Protocol::Tcp)
        );
        assert_eq!(classify(b"hello"), None, "a word alone may start a request");
        assert_eq!(classify(b"hello world\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"\0\0\0\x08"), None, "blank bytes decide nothing");
        assert_eq!(classify(b"\0\0\0\x08\xd2"), Some(Protocol::Tcp));
        // Any method token is HTTP: lower case and extension methods too.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"PROPFIND /admin HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"GET http://b/admin HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"GET HTTPS://b/admin"), Some(HTTP1));
        assert_eq!(classify(b"PUT htt"), None);
        assert_eq!(classify(b"CONNECT b:443 HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), Some(HTTP1));
        // Text protocols that are not HTTP stay TCP (memcached, Redis, SMTP client lines).
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"get user:1\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"get key"), None, "a version may yet end the line");
        assert_eq!(classify(b"MAIL FROM:<a@b> SIZE=1\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"SET http_hits 1\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"ehlo me\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Tcp));
        assert_eq!(
            classify(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nPING\r\n"),
            Some(Protocol::Tcp)
        );
        // After PROXY protocol headers, what a server configured for them reads next.
        let v2 = |rest: &[u8]| {
            let mut h = PROXY_V2.to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
            h.extend_from_slice(rest);
            h
        };
        assert_eq!(classify(&v2(b"POST /admin HTTP/1.1\r\n")), Some(HTTP1));
        assert_eq!(classify(&v2(b"")), None);
        assert_eq!(classify(&v2(b"")[..15]), None);
        assert_eq!(classify(&PROXY_V2[..7]), None);
        assert_eq!(classify(&v2(b"ping\r\n")), Some(Protocol::Tcp));
        assert_eq!(classify(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), None);
        assert_eq!(classify(b"PROXY TCP4 1.2.3.4"), None);
        assert_eq!(
            classify(
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nPROXY UNKNOWN\r\nPOST /admin HTTP/1.1\r\n"
            ),
            Some(HTTP1)
        );
        // Spellings a lenient server reads as a request are HTTP too, for the sidecar's strict
        // server to refuse: leading blanks and controls, tabs, runs of spaces, no version, any
        // version, any scheme, Python's whitespace, a bare target before a version, HTTP/0.9.
        for lenient in [
            &b"GET x://b/admin HTTP/1.1\r\n"[..],
            b"GET a:/admin HTTP/1.1\r\n",
            b"GET\x0c/admin\x0cHTTP/1.1\r\n",
            b"GET\r/admin\rHTTP/1.1\r\n",
            b"\xa0GET /admin HTTP/1.1\r\n",
            b"POST admin HTTP/1.1\r\n",
            b"post admin http/1.0\r\n",
            b"GET admin\r\n",
            &b"\r\n\r\nGET / HTTP/1.1\r\n"[..],
            b" GET / HTTP/1.1\r\n",
            b"\0GET / HTTP/1.1\r\n",
            b"GET\t/admin\tHTTP/1.1\r\n",
            b"GET  /admin HTTP/1.1\r\n",
            b"GET /admin\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / http/1.10\r\n",
            b"POST %2Fadmin\r\n",
            b"DELETE admin \r\n",
            b"\x80POST /admin HTTP/1.1\r\n",
            b"\x7f\x9fGET / HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(lenient), Some(HTTP1), "{lenient:?}");
        }
        assert_eq!(classify(b"\nGET"), None);
        assert_eq!(classify(b"\r\n\r\n"), None);
        // Nothing is read without end to tell.
        let long = |b: u8| vec![b; MAX_REQUEST_LINE];
        assert_eq!(classify(&long(b'A')), Some(HTTP1));
        assert_eq!(classify(&long(b'\n')), Some(HTTP1));
        assert_eq!(classify(&long(b'\n')[..MAX_REQUEST_LINE - 1]), None);
        // An HTTP/2 server's first bytes.
        assert!(is_h2_settings(b"\0\0\x06\x04\0\0\0\0\0\0\x03\0\0\0\x64"));
        assert!(!is_h2_settings(b"220 moat test\r\n"));
        assert!(may_be_h2_settings(b"\0\0\x06\x04"));
        assert!(!may_be_h2_settings(b"220 "));
        assert!(!may_be_h2_settings(b"\x4a\0\0\0\x0a8.0"));
    }

    #[tokio::test]
    async fn detects_and_replays() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt as _;
        a.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        let (p, seen) = detect(&mut b).await.unwrap();
        assert_eq!(p, Some(HTTP1));
        let mut replay = Prefixed::new(seen, b);
        let mut out = [0u8; 18];
        replay.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"POST /x HTTP/1.1\r\n");
    }

    /// Silence, or the start of a request line and then silence, decides nothing: the bytes
    /// seen so far come back for the caller to go on classifying.
    #[tokio::test]
    async fn a_client_silent_before_its_protocol_is_known_is_undecided() {
        let (_a, mut b) = tokio::io::duplex(1024);
        let (p, seen) = detect(&mut b).await.unwrap();
        assert_eq!((p, seen.len()), (None, 0));
        let (mut a, mut b) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt as _;
        a.write_all(b"\r\nGE").await.unwrap();
        let (p, mut seen) = detect(&mut b).await.unwrap();
        assert_eq!((p, seen.as_slice()), (None, &b"\r\nGE"[..]));
        a.write_all(b"T /admin HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read_more(&mut b, &mut seen).await.unwrap(), Some(HTTP1));
    }

    /// A vectored write reaches the socket whole: h2 writes a DATA frame's header and payload
    /// as two slices, which the default `poll_write_vectored` would send one per system call.
    #[tokio::test]
    async fn vectored_writes_reach_the_socket_in_one_call() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut far = accepted.unwrap().0;
        let mut near = Prefixed::new(b"seen".to_vec(), client.unwrap());
        assert!(near.is_write_vectored());
        let (head, payload) = ([0u8, 0, 4, 0, 1, 0, 0, 0, 1], *b"data");
        let n = near
            .write_vectored(&[io::IoSlice::new(&head), io::IoSlice::new(&payload)])
            .await
            .unwrap();
        assert_eq!(n, head.len() + payload.len());
        let mut got = [0u8; 13];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..9], &head);
        assert_eq!(&got[9..], b"data");
    }
}
