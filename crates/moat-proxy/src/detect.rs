//! Protocol detection: read the first bytes a client sends (waiting a short while) and decide
//! between HTTP/2 (the connection preface), HTTP/1 (a request line) and opaque TCP. The bytes
//! read are replayed by [`Prefixed`], so nothing is lost.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// How long to wait for a client's first bytes before treating the connection as opaque TCP
/// (server-first protocols send nothing until the server speaks).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// What a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

/// Classifies `buf`; `None` when more bytes are needed to tell.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Protocol::Http1);
        }
        if buf.len() < m.len() && m.starts_with(buf) {
            return None;
        }
    }
    Some(Protocol::Tcp)
}

/// Reads until the protocol is known, the peer stops sending for [`DETECT_TIMEOUT`], or it
/// closes. Returns the protocol and the bytes read.
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<(Protocol, Vec<u8>)> {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let mut chunk = [0u8; 64];
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Ok((Protocol::Tcp, buf)),
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok((classify(&buf).unwrap_or(Protocol::Tcp), buf));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
    }
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Some(Protocol::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Tcp));
        assert_eq!(classify(b"hello"), Some(Protocol::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Tcp));
    }

    #[tokio::test]
    async fn detects_and_replays() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt as _;
        a.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        let (p, seen) = detect(&mut b).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut replay = Prefixed::new(seen, b);
        let mut out = [0u8; 18];
        replay.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"POST /x HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn silent_client_is_tcp() {
        let (_a, mut b) = tokio::io::duplex(1024);
        let (p, seen) = detect(&mut b).await.unwrap();
        assert_eq!((p, seen.len()), (Protocol::Tcp, 0));
    }
}
