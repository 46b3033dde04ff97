//! What one peer may do to an HTTP connection the proxy serves (inbound from other sidecars,
//! outbound from local clients), and serving it under those limits: HTTP/2 stream and reset
//! bounds, and a per-connection watchdog that closes the connection when the peer takes too long
//! over an HTTP/1 request head it started, cancels accepted requests abusively (a "delayed rapid
//! reset"), stops reading what it asked for (a zero flow-control window), stops sending a request
//! body it started, or leaves the connection idle. Each closure has its own reason, logged and
//! counted by the caller (`moat_connections_closed_total`).
//!
//! The head deadline runs from a head's first byte, not from the end of the previous response
//! (as hyper's own `header_read_timeout` does): a local client's keep-alive connection idle
//! between requests is governed by the idle limit, so a client whose pool keeps connections
//! longer than the head deadline (hyper's and Go's: 90 s) never sends a request onto a
//! connection the proxy is closing under it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio_util::sync::CancellationToken;

use crate::detect::HttpVersion;
use crate::http::{Body, boxed};

/// The timeouts a served connection lives under (flags in docs/proxy.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// An HTTP/1 request head must arrive in full within this of its first byte
    /// (`header-read-timeout`).
    pub header_read: Duration,
    /// A request body the peer has started must keep arriving (or the response keep flowing):
    /// no progress for this long closes the connection (`request-stalled`).
    pub request_idle: Duration,
    /// The peer must keep taking the response it asked for: data it leaves unread (a window
    /// held at zero) for this long closes the connection (`response-stalled`).
    pub response_idle: Duration,
    /// A connection with nothing in flight for this long is closed gracefully (`idle`).
    pub idle: Duration,
}

impl ConnLimits {
    /// The limits for the outbound's local clients: stalls cut off at half the time the far
    /// side allows, so a local client's stall ends (its streams reset, within
    /// `multiplex::RESET_BUDGET`) before the far side would close the shared connection it travels on.
    pub fn for_local_clients(self) -> Self {
        ConnLimits {
            request_idle: self.request_idle / 2,
            response_idle: self.response_idle / 2,
            ..self
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read: Duration::from_secs(10),
            request_idle: Duration::from_secs(300),
            response_idle: Duration::from_secs(60),
            idle: Duration::from_secs(600),
        }
    }
}

/// Concurrent HTTP/2 streams one connection may hold open.
pub const STREAMS_PER_CONNECTION: u32 = 128;
/// Streams a peer may reset before the proxy accepted them, at once (hyper's own count).
pub const PENDING_ACCEPT_RESETS: usize = 20;
/// Requests a peer may cancel after the proxy accepted them, within [`CANCEL_WINDOW`].
pub const CANCELS_PER_WINDOW: u32 = 200;
pub const CANCEL_WINDOW: Duration = Duration::from_secs(10);
/// HTTP/2 pings, and how long the peer has to answer one.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection closed for policy may take to finish its open requests.
pub const DRAIN: Duration = Duration::from_secs(5);

/// How a served HTTP connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The peer closed it.
    Finished,
    /// It failed (a protocol error, a reset).
    Failed(String),
    /// The process is draining; the connection was closed gracefully.
    Drained,
    /// `close` resolved with this reason; the connection was closed gracefully.
    Closed(&'static str),
    /// The watchdog closed it: `too-many-resets`, `response-stalled`, `request-stalled` (cut
    /// off), or `idle` (gracefully); or the HTTP/2 layer did, with GOAWAY ENHANCE_YOUR_CALM
    /// (`too-many-resets`).
    Guard(&'static str),
}

const NOT_WAITING: u64 = u64::MAX;

/// One request's wait on the peer: since when (ms on the connection's clock), for how long
/// that may last, and on which side (`RESPONSE_SIDE`: the peer is not taking the response).
#[derive(Debug)]
struct Wait {
    since_ms: AtomicU64,
    limit_ms: AtomicU64,
    response_side: std::sync::atomic::AtomicBool,
}

impl Wait {
    fn start(&self, now_ms: u64, limit: Duration, response_side: bool) {
        self.limit_ms
            .store(limit.as_millis() as u64, Ordering::Relaxed);
        self.response_side.store(response_side, Ordering::Relaxed);
        self.since_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// The per-connection state the watchdog reads.
#[derive(Debug)]
struct Watch {
    start: Instant,
    limits: ConnLimits,
    cancels: Mutex<(Instant, u32)>,
    /// Requests whose response has not finished.
    in_flight: AtomicUsize,
    last_activity_ms: AtomicU64,
    /// Since when an HTTP/1 request head has been arriving: from the first byte read with no
    /// request in flight until hyper hands the head over (`NOT_WAITING` otherwise, and always
    /// on HTTP/2, whose reads are not timed).
    head_since_ms: AtomicU64,
    /// Whether request heads are timed (HTTP/1).
    timed_heads: bool,
    waits: Mutex<Vec<Weak<Wait>>>,
    tripped: CancellationToken,
}

impl Watch {
    fn new(limits: ConnLimits, timed_heads: bool) -> Self {
        Watch {
            start: Instant::now(),
            limits,
            cancels: Mutex::new((Instant::now(), 0)),
            in_flight: AtomicUsize::new(0),
            last_activity_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NOT_WAITING),
            timed_heads,
            waits: Mutex::new(Vec::new()),
            tripped: CancellationToken::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn active(&self) {
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes came in on an HTTP/1 connection: with no request in flight, they start the next
    /// request head, whose clock starts now unless it already runs. (Bytes read while a request
    /// is in flight are its body, or a pipelined head; one still unfinished when the response
    /// ends is timed from the next byte, and until then the connection is idle.)
    fn bytes_read(&self) {
        if self.timed_heads
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NOT_WAITING
        {
            self.head_since_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// hyper handed a request head over.
    fn head_read(&self) {
        if self.timed_heads {
            self.head_since_ms.store(NOT_WAITING, Ordering::Relaxed);
        }
    }

    fn cancelled(&self) {
        let mut c = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        if c.0.elapsed() > CANCEL_WINDOW {
            *c = (Instant::now(), 0);
        }
        c.1 += 1;
        if c.1 > CANCELS_PER_WINDOW {
            self.tripped.cancel();
        }
    }

    fn new_wait(&self) -> Arc<Wait> {
        let w = Arc::new(Wait {
            since_ms: AtomicU64::new(NOT_WAITING),
            limit_ms: AtomicU64::new(0),
            response_side: std::sync::atomic::AtomicBool::new(false),
        });
        let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        // The watchdog prunes finished requests only every few seconds, and a weak reference
        // keeps its request's allocation: at 20,000 requests a second that was megabytes per
        // connection. Pruning whenever the list would grow keeps it within twice the requests
        // in flight, at a cost spread over the pushes.
        if waits.len() == waits.capacity() {
            waits.retain(|w| w.strong_count() > 0);
        }
        waits.push(Arc::downgrade(&w));
        w
    }

    /// How often the watchdog looks: a quarter of the shortest limit that applies, between
    /// 250 ms and 5 s.
    fn period(&self) -> Duration {
        let l = &self.limits;
        let mut shortest = l.request_idle.min(l.response_idle).min(l.idle);
        if self.timed_heads {
            shortest = shortest.min(l.header_read);
        }
        (shortest / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
    }

    /// Resolves with the reason once the connection must be closed.
    async fn watchdog(self: Arc<Self>) -> &'static str {
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.tripped.cancelled() => return "too-many-resets",
                _ = tick.tick() => {}
            }
            let now = self.now_ms();
            {
                let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
                let mut stalled = None;
                waits.retain(|w| {
                    let Some(w) = w.upgrade() else { return false };
                    let since = w.since_ms.load(Ordering::Relaxed);
                    let limit = w.limit_ms.load(Ordering::Relaxed);
                    if since != NOT_WAITING && now.saturating_sub(since) > limit {
                        stalled = Some(if w.response_side.load(Ordering::Relaxed) {
                            "response-stalled"
                        } else {
                            "request-stalled"
                        });
                    }
                    true
                });
                if let Some(reason) = stalled {
                    return reason;
                }
            }
            let head = self.head_since_ms.load(Ordering::Relaxed);
            if head != NOT_WAITING
                && now.saturating_sub(head) > self.limits.header_read.as_millis() as u64
            {
                return "header-read-timeout";
            }
            let quiet = now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Relaxed) == 0
                && quiet > self.limits.idle.as_millis() as u64
            {
                return "idle";
            }
        }
    }
}

/// Counts a request as cancelled if it is dropped before its handler answered.
struct Accepted(Option<Arc<Watch>>);

impl Accepted {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.cancelled();
        }
    }
}

/// Holds one request in flight until its response body is done (or dropped).
#[derive(Debug)]
struct InFlight(Arc<Watch>);

impl InFlight {
    fn new(w: &Arc<Watch>) -> Self {
        w.in_flight.fetch_add(1, Ordering::Relaxed);
        w.active();
        InFlight(w.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.active();
    }
}

/// A request body from the peer, watched for stalls: polled and still waiting on the peer for
/// longer than `request_idle` (while the response makes no progress either) is a stall.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    wait: Arc<Wait>,
    watch: Arc<Watch>,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {
                if self.wait.since_ms.load(Ordering::Relaxed) == NOT_WAITING {
                    self.wait
                        .start(self.watch.now_ms(), self.watch.limits.request_idle, false);
                }
            }
            Poll::Ready(_) => {
                self.wait.since_ms.store(NOT_WAITING, Ordering::Relaxed);
                self.watch.active();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body to the peer, watched for stalls: data handed over and not taken (the body
/// not polled again) for longer than `response_idle` is a stall.
struct ResponseBody {
    inner: Body,
    wait: Arc<Wait>,
    watch: Arc<Watch>,
    _in_flight: InFlight,
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Polled again: the peer took what we gave it (or has room for more).
        self.wait.since_ms.store(NOT_WAITING, Ordering::Relaxed);
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.watch.active();
            self.wait
                .start(self.watch.now_ms(), self.watch.limits.response_idle, true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1 connection's stream, telling its [`Watch`] when bytes come in (which may start the
/// clock on a request head). Writes pass straight through.
struct HeadClock<IO> {
    io: IO,
    watch: Arc<Watch>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeadClock<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.bytes_read();
        }
        polled
    }
}

crate::forward::forward_writes!(HeadClock, io);

/// Whether the HTTP/2 layer itself closed the connection for abuse: it sent GOAWAY
/// ENHANCE_YOUR_CALM (more than [`PENDING_ACCEPT_RESETS`] streams reset before acceptance).
fn calmed_down(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return !h2.is_remote() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        cause = c.source();
    }
    false
}

/// Serves one HTTP/1.1 or HTTP/2 connection (`version`, and that one alone), each request
/// answered by `handler`, until it ends, the process drains, `close` resolves (closed gracefully
/// within [`DRAIN`]), or the watchdog closes it (see [`Ended::Guard`]). Header blocks are
/// limited to 64 KiB.
pub async fn serve_http<IO, F, Fut>(
    io: IO,
    version: HttpVersion,
    handler: F,
    limits: ConnLimits,
    shutdown: &CancellationToken,
    close: impl std::future::Future<Output = &'static str>,
) -> Ended
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let watch = Arc::new(Watch::new(limits, version == HttpVersion::Http1));
    let svc = {
        let watch = watch.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            watch.head_read();
            let accepted = Accepted(Some(watch.clone()));
            let in_flight = InFlight::new(&watch);
            let wait = watch.new_wait();
            // A body still to come is awaited from the peer from the start, as for a stream
            // idle timeout: progress on either side clears the wait.
            if !req.body().is_end_stream() {
                wait.start(watch.now_ms(), watch.limits.request_idle, false);
            }
            let req = req.map(|inner| RequestBody {
                inner,
                wait: wait.clone(),
                watch: watch.clone(),
            });
            let watch = watch.clone();
            // Boxed: hyper spawns a task per HTTP/2 stream and copies the future into it.
            let handling = Box::pin(handler(req));
            async move {
                let resp = handling.await;
                accepted.answered();
                // Waiting for the peer to take the first frame: with its window at zero, hyper
                // never polls the body at all.
                if !resp.body().is_end_stream() {
                    wait.start(watch.now_ms(), watch.limits.response_idle, true);
                }
                Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                    boxed(ResponseBody {
                        inner,
                        wait,
                        watch,
                        _in_flight: in_flight,
                    })
                }))
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // A response's head and body go out flattened into one buffer, as before the served
        // streams passed vectored writes on (for HTTP/2's sake): over TLS, rustls seals each
        // slice of a vectored write as a record of its own.
        .writev(false)
        .timer(TokioTimer::new())
        // The watchdog times request heads from their first byte (see the module's notes).
        .header_read_timeout(None)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(crate::multiplex::MAX_HEADER_LIST)
        .max_frame_size(crate::multiplex::MAX_FRAME_SIZE)
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .initial_stream_window_size(crate::multiplex::STREAM_WINDOW)
        .initial_connection_window_size(crate::multiplex::CONNECTION_WINDOW)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT);
    // The protocol is known (detected, or the mesh connection's ALPN): served as that alone.
    let builder = match version {
        HttpVersion::Http1 => builder.http1_only(),
        HttpVersion::Http2 => builder.http2_only(),
    };
    let io = HeadClock {
        io: crate::coalesce::Coalesced::new(io, version == HttpVersion::Http2),
        watch: watch.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::pin!(close);
    let watchdog = watch.watchdog();
    tokio::pin!(watchdog);
    // The guards are polled only when one of them was woken, not on every read and write of
    // the connection (see `on_wake`).
    let guards = crate::on_wake::OnWake::new(async {
        tokio::select! {
            () = shutdown.cancelled() => Stop::Shutdown,
            reason = &mut close => Stop::Closed(reason),
            reason = &mut watchdog => Stop::Guard(reason),
        }
    });
    let stop = tokio::select! {
        r = conn.as_mut() => return match r {
            Ok(()) => Ended::Finished,
            Err(e) if calmed_down(&*e) => Ended::Guard("too-many-resets"),
            Err(e) => Ended::Failed(e.to_string()),
        },
        stop = guards => stop,
    };
    match stop {
        Stop::Shutdown => {
            // The process's --drain-timeout bounds this wait.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
            Ended::Drained
        }
        Stop::Closed(reason) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
            Ended::Closed(reason)
        }
        Stop::Guard(reason) => {
            if reason == "idle" {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
            }
            // Otherwise the peer is misbehaving: its open requests go with the connection.
            Ended::Guard(reason)
        }
    }
}

/// Which guard of a served connection spoke first.
enum Stop {
    Shutdown,
    Closed(&'static str),
    Guard(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_requests_leave_the_watch_list_without_the_watchdog() {
        let watch = Watch::new(ConnLimits::default(), true);
        let live: Vec<Arc<Wait>> = (0..10).map(|_| watch.new_wait()).collect();
        for _ in 0..100_000 {
            drop(watch.new_wait());
        }
        let waits = watch.waits.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            waits.capacity() <= 64,
            "{} entries kept for {} requests in flight",
            waits.capacity(),
            live.len()
        );
        assert_eq!(waits.iter().filter(|w| w.strong_count() > 0).count(), 10);
    }
}
