//! HTTP/2 writes gathered into fewer, larger ones. h2 writes a DATA frame whose payload is over
//! 256 bytes straight from the payload, and must flush it before it can queue the next frame,
//! so every response (and every request with a body) on a busy connection cost a system call
//! of its own — and over TLS a record of its own. [`Coalesced`] takes what h2 writes into one
//! buffer and puts a flush off until the connection's task has run once more, after the tasks
//! that were ready: the frames those queued in the meantime go out in the same write. An idle
//! runtime runs the task again at once, so a lone request waits for nothing. Used on every
//! HTTP/2 connection the proxy serves or opens (`conn_guard::serve_http`,
//! `multiplex::Conn::handshake`); HTTP/1.1 passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most gathered before a write: about four TLS records.
const GATHER: usize = 64 * 1024;
/// What an empty buffer is allocated with: one TLS record's worth.
const FIRST_GATHER: usize = 16 * 1024;
/// Flushes put off in a row at most: should the task run again without reading (h2 always
/// reads first), the gathered bytes still go out, this many flushes late.
const PUT_OFF_AT_MOST: u32 = 64;

/// A connection's stream whose writes are gathered (when `on`) and flushed one task poll late
/// (see the module's notes). Reads pass straight through.
#[derive(Debug)]
pub struct Coalesced<IO> {
    io: IO,
    on: bool,
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    written: usize,
    /// Flushes put off since the last write; each woke the task, to run again after the others.
    put_off: u32,
    /// The task ran again (it read) since a flush was put off: the next flush writes.
    due: bool,
}

impl<IO> Coalesced<IO> {
    /// `io`, its writes gathered if `on` (HTTP/2), passed straight through if not.
    pub fn new(io: IO, on: bool) -> Self {
        Coalesced {
            io,
            on,
            buf: Vec::new(),
            written: 0,
            put_off: 0,
            due: false,
        }
    }

    fn gathered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<IO: AsyncWrite + Unpin> Coalesced<IO> {
    /// Writes what is gathered, all of it or until the stream would block. With `release` (a
    /// flush or shutdown: the batch is over) the buffer is freed once written, so a connection
    /// holds one only while it has bytes to send and thousands of quiet HTTP/2 connections hold
    /// none; without (making room in the middle of a batch) it is kept for the rest of the batch.
    fn write_out(&mut self, cx: &mut Context<'_>, release: bool) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if release {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Allocates for `len` more bytes, [`GATHER`] at most in all (`room_for` saw to that): an
    /// empty buffer gets [`FIRST_GATHER`] (or `len`, if more), room for a batch of small
    /// answers; one that outgrows that gets the whole bound. So a batch allocates at most twice,
    /// and the buffer is kept until the batch is flushed.
    fn reserve(&mut self, len: usize) {
        let needed = self.buf.len() + len;
        if needed > self.buf.capacity() {
            let cap = if self.buf.capacity() == 0 {
                FIRST_GATHER.max(needed)
            } else {
                GATHER
            };
            self.buf.reserve_exact(cap - self.buf.len());
        }
    }

    /// Makes room for `len` more bytes: writes out first if they would not fit. The bytes of a
    /// partial write still in the buffer count too, so it never holds more than [`GATHER`].
    fn room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && self.buf.len() + len > GATHER {
            std::task::ready!(self.write_out(cx, false))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // h2 reads first whenever its task runs: a flush put off before is now due.
        if self.put_off > 0 {
            self.due = true;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.on {
            return Pin::new(&mut self.io).poll_write(cx, data);
        }
        std::task::ready!(self.room_for(cx, data.len()))?;
        if self.gathered() == 0 && data.len() >= GATHER {
            return Pin::new(&mut self.io).poll_write(cx, data);
        }
        self.reserve(data.len());
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.on {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        std::task::ready!(self.room_for(cx, len))?;
        if self.gathered() == 0 && len >= GATHER {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        self.reserve(len);
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.on || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.on && self.gathered() > 0 {
            if !self.due && self.put_off < PUT_OFF_AT_MOST {
                // Put off: woken, the task runs again once the others that are ready have run
                // (tokio queues a task that woke itself behind them), and writes then.
                self.put_off += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(self.write_out(cx, true))?;
        } else if self.buf.capacity() > 0 {
            // Kept while the batch made room, then a large write went straight through: the
            // batch is over all the same.
            self.buf = Vec::new();
        }
        self.put_off = 0;
        self.due = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.write_out(cx, true))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stream that records the size of each write it takes and has nothing to read. With
    /// `room` set, it takes that many more bytes and then blocks.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        shut: bool,
        room: Option<usize>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.room.unwrap_or(usize::MAX));
            if n == 0 {
                return Poll::Pending;
            }
            if let Some(room) = &mut self.room {
                *room -= n;
            }
            self.writes.push(n);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Counts its wake-ups.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(s: &mut Coalesced<Recorder>, cx: &mut Context<'_>, n: usize) {
        let data = vec![7u8; n];
        assert!(matches!(
            Pin::new(s).poll_write(cx, &data),
            Poll::Ready(Ok(m)) if m == n
        ));
    }

    fn flush(s: &mut Coalesced<Recorder>, cx: &mut Context<'_>) {
        assert!(matches!(Pin::new(s).poll_flush(cx), Poll::Ready(Ok(()))));
    }

    fn read(s: &mut Coalesced<Recorder>, cx: &mut Context<'_>) {
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        assert!(Pin::new(s).poll_read(cx, &mut buf).is_pending());
    }

    #[test]
    fn writes_gather_until_the_task_has_run_again() {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut s = Coalesced::new(Recorder::default(), true);
        // One task poll: three frames, each flushed as h2 does before the next.
        for _ in 0..3 {
            write(&mut s, &mut cx, 1000);
            flush(&mut s, &mut cx);
        }
        assert!(s.io.writes.is_empty(), "{:?}", s.io.writes);
        assert!(
            wakes.0.load(Ordering::Relaxed) >= 1,
            "the task was not woken"
        );
        // The next poll reads first, then queues one more frame and flushes: all in one write.
        read(&mut s, &mut cx);
        write(&mut s, &mut cx, 500);
        flush(&mut s, &mut cx);
        assert_eq!(s.io.writes, vec![3500]);
        // Written out, the connection holds no buffer until it has something to send again.
        assert_eq!(s.buf.capacity(), 0);
        // Nothing gathered: a flush wakes nobody and writes nothing.
        let woken = wakes.0.load(Ordering::Relaxed);
        flush(&mut s, &mut cx);
        assert_eq!(wakes.0.load(Ordering::Relaxed), woken);
        assert_eq!(s.io.writes, vec![3500]);
    }

    #[test]
    fn the_buffer_stays_within_its_bound_through_partial_writes() {
        const FRAME: usize = 16 * 1024 + 9;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut s = Coalesced::new(Recorder::default(), true);
        // A large answer in full frames: one allocation for the first, one of the whole bound
        // for the second, and the buffer is kept while the batch makes room.
        write(&mut s, &mut cx, FRAME);
        assert_eq!(s.buf.capacity(), FRAME);
        write(&mut s, &mut cx, FRAME);
        write(&mut s, &mut cx, FRAME);
        assert_eq!(s.buf.capacity(), GATHER);
        write(&mut s, &mut cx, FRAME);
        assert_eq!(s.io.writes, vec![3 * FRAME]);
        assert_eq!((s.buf.len(), s.buf.capacity()), (FRAME, GATHER));
        // The stream takes 10,000 bytes of the next write and blocks.
        s.io.room = Some(10_000);
        flush(&mut s, &mut cx);
        read(&mut s, &mut cx);
        assert!(Pin::new(&mut s).poll_flush(&mut cx).is_pending());
        assert_eq!((s.buf.len(), s.written), (FRAME, 10_000));
        // A write that would take the buffer past its bound waits, rather than piling up
        // behind the part already written.
        let big = vec![7u8; 50_000];
        assert!(Pin::new(&mut s).poll_write(&mut cx, &big).is_pending());
        assert_eq!(s.buf.len(), FRAME);
        // Unblocked: the rest goes out, then the write is gathered.
        s.io.room = None;
        assert!(matches!(
            Pin::new(&mut s).poll_write(&mut cx, &big),
            Poll::Ready(Ok(50_000))
        ));
        assert_eq!((s.buf.len(), s.buf.capacity()), (50_000, GATHER));
        // The flush that was due writes it and frees the buffer.
        flush(&mut s, &mut cx);
        assert_eq!(s.io.writes, vec![3 * FRAME, 10_000, FRAME - 10_000, 50_000]);
        assert_eq!(s.buf.capacity(), 0);
    }

    #[test]
    fn a_flush_put_off_too_often_writes_anyway() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut s = Coalesced::new(Recorder::default(), true);
        write(&mut s, &mut cx, 100);
        for _ in 0..PUT_OFF_AT_MOST {
            flush(&mut s, &mut cx);
        }
        assert!(s.io.writes.is_empty());
        flush(&mut s, &mut cx);
        assert_eq!(s.io.writes, vec![100]);
    }

    #[test]
    fn large_writes_and_shutdown_go_out_at_once_and_off_passes_through() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut s = Coalesced::new(Recorder::default(), true);
        // Whatever would overflow the gathered bytes sends them first.
        write(&mut s, &mut cx, 1000);
        write(&mut s, &mut cx, GATHER);
        assert_eq!(s.io.writes, vec![1000, GATHER]);
        write(&mut s, &mut cx, 10);
        assert!(Pin::new(&mut s).poll_shutdown(&mut cx).is_ready());
        assert_eq!(s.io.writes, vec![1000, GATHER, 10]);
        assert!(s.io.shut);

        let mut off = Coalesced::new(Recorder::default(), false);
        write(&mut off, &mut cx, 10);
        write(&mut off, &mut cx, 20);
        assert_eq!(off.io.writes, vec![10, 20]);
    }

    /// The stream under a real HTTP/2 server: counts the writes that reach the socket.
    struct Counted<S>(S, Arc<AtomicUsize>);

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.0).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// 200 requests at once to a hyper HTTP/2 server over loopback: every 1 KiB answer arrives
    /// whole, in fewer writes than there are answers.
    #[tokio::test]
    async fn answers_ready_together_share_writes() {
        use http_body_util::{BodyExt as _, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = writes.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let io = Coalesced::new(Counted(tcp, counted), true);
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    bytes::Bytes::from(vec![b'x'; 1024]),
                )))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<bytes::Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let before = writes.load(Ordering::Relaxed);
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let mut send = send.clone();
            requests.spawn(async move {
                let req = http::Request::get("http://test/")
                    .body(Full::default())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes().len()
            });
        }
        let lengths = requests.join_all().await;
        assert!(lengths.iter().all(|&n| n == 1024), "{lengths:?}");
        let used = writes.load(Ordering::Relaxed) - before;
        assert!(used < 200, "{used} writes for 200 answers");
    }
}
