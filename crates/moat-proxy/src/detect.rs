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

/// Whether `line` (without its line ending) is an HTTP/1 request line: `method SP target SP
/// HTTP/1.x`, the method any token (RFC 9110: `PROPFIND` and `get` are methods too).
fn is_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    is_method_token(method)
        && !target.is_empty()
        && version.len() == 8
        && version.starts_with(b"HTTP/1.")
        && version[7].is_ascii_digit()
}

/// Classifies `buf`; `None` when more bytes are needed to tell. Empty lines before a request
/// line are skipped, as HTTP/1.1 servers do (RFC 9112 section 2.2). Bytes that still leave it
/// open at a request line's length (a method token without end, empty lines without end) are
/// HTTP/1, for the HTTP server to refuse: nothing is read without end to tell.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    match classify_start(buf) {
        None if buf.len() >= MAX_REQUEST_LINE => Some(Protocol::Http(HttpVersion::Http1)),
        found => found,
    }
}

fn classify_start(buf: &[u8]) -> Option<Protocol> {
    let buf = match buf.iter().position(|&b| b != b'\r' && b != b'\n') {
        Some(0) => buf,
        Some(start) => return classify_http1(&buf[start..]),
        None => return None,
    };
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http(HttpVersion::Http2));
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    classify_http1(buf)
}

/// Classifies `buf` as an HTTP/1 request line or not (see [`classify`]).
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    // A request starts with a method token and a space; anything else is not HTTP/1.
    let token_len = buf
        .iter()
        .position(|&b| !is_method_token(&[b]))
        .unwrap_or(buf.len());
    match buf.get(token_len) {
        None => return None,
        Some(b' ') if token_len > 0 => {}
        Some(_) => return Some(Protocol::Tcp),
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Some(if is_request_line(line) {
                Protocol::Http(HttpVersion::Http1)
            } else {
                Protocol::Tcp
            })
        }
        None => None,
    }
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
/// needed to tell; a peer that closes first is opaque TCP. Cancel-safe: the bytes of a read that
/// completes are appended before it returns.
pub async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Protocol>> {
    let mut chunk = [0u8; 1024];
    let n = io.read(&mut chunk).await?;
    if n == 0 {
        return Ok(Some(classify(buf).unwrap_or(Protocol::Tcp)));
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
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(HTTP1));
        assert_eq!(classify(b"DELE"), None);
        assert_eq!(classify(b"GET /orders HTTP/1.1"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(HTTP2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp));
        assert_eq!(classify(b"hello"), None, "a word alone may start a request");
        assert_eq!(classify(b"hello world\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"\0\0\0\x08"), Some(Protocol::Tcp));
        // Any method token is HTTP: lower case and extension methods too.
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"PROPFIND /admin HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"GET http://b/admin HTTP/1.1\r\n"), Some(HTTP1));
        // Text protocols that are not HTTP stay TCP (memcached, SMTP client lines).
        assert_eq!(classify(b"get key\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"EHLO me\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b" GET / HTTP/1.1\r\n"), Some(Protocol::Tcp));
        // Empty lines before a request line are skipped, as HTTP/1.1 servers skip them.
        assert_eq!(classify(b"\r\n\r\nGET / HTTP/1.1\r\n"), Some(HTTP1));
        assert_eq!(classify(b"\nGET /"), None);
        assert_eq!(classify(b"\r\n\r\n"), None);
        assert_eq!(classify(b"\r\n\x16\x03"), Some(Protocol::Tcp));
        // Nothing is read without end to tell.
        let long = |b: u8| vec![b; MAX_REQUEST_LINE];
        assert_eq!(classify(&long(b'A')), Some(HTTP1));
        assert_eq!(classify(&long(b'\n')), Some(HTTP1));
        let mut line = b"GET /".to_vec();
        line.extend(long(b'a'));
        assert_eq!(classify(&line), Some(HTTP1));
        assert_eq!(classify(&line[..MAX_REQUEST_LINE - 1]), None);
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
