//! Shared HTTP/2 client connections whose streams the proxy bounds, so that nothing one user of
//! a connection does to its own streams gives the far side cause to close it under the others'
//! (decision 30). The outbound shares them between local clients toward each peer endpoint
//! (`pool`); the inbound between the requests of one caller connection toward the app (`app`).
//!
//! What a far side closes a connection for, and the bound that keeps the proxy short of it:
//! - **Streams reset before it accepted them** (hyper and every h2-based server count them and
//!   close the connection past 20, the rapid-reset defence). A stream whose response head has
//!   come was accepted; so was every stream opened before it, because a server accepts streams in
//!   the order they were opened. The proxy therefore knows which of its resets may still be
//!   waiting at the far side — those of streams opened after the last answered one — and keeps
//!   at most [`UNANSWERED_RESETS`] of them. A cancellation over that bound does not reset the
//!   stream: it lingers until it is known accepted (its own response head or a later stream's
//!   came) and is reset then, or, if the far side answers nothing at all, when the far side's
//!   request-idle timeout draws near. A request body that fails before the response head came
//!   is ended through the same gate, never by a reset of its own.
//! - **Streams cancelled after acceptance** (the far side's cancel rate, `conn_guard`): after
//!   [`RESET_BUDGET`] resets a connection takes no new streams and closes once its last ends.
//! - **Flow control**: the connection window covers every stream's window, so data one stream
//!   leaves unread never holds up another.
//! - **Stream slots**: at most [`STREAMS_PER_SHARED`] streams, not more than any server that
//!   follows RFC 9113's advice (at least 100 concurrent streams) allows, so a stream never waits
//!   for a slot that another user's stalled streams hold; a full connection means a new one.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};

use crate::http::{Body, BoxError};
use crate::metrics::Metrics;

/// Streams the proxy opens at once on one shared connection.
pub const STREAMS_PER_SHARED: usize = 100;
/// Streams reset on one connection that the far side may not have accepted yet, at most: below
/// the bound of 20 hyper (and so every hyper- or tonic-based far side) closes a connection at.
pub const UNANSWERED_RESETS: usize = 16;
/// Streams the proxy may reset on one connection before it takes no new ones: far below the far
/// side's cancel bound (`conn_guard::CANCELS_PER_WINDOW`) and h2's lifetime bound on locally
/// reset streams (1024).
pub const RESET_BUDGET: usize = 64;
/// How long a cancelled stream waits at most to be known accepted, as a share of the far side's
/// request-idle timeout (`ConnLimits::request_idle`): local clients are cut off at half of it,
/// so a quarter more still ends the stream before the far side would close the connection.
pub const LINGER_SHARE_OF_REQUEST_IDLE: u32 = 4;
/// Flow-control windows: every stream's window fits in the connection's, for as many streams
/// as the proxy's own server allows a connection (`conn_guard::STREAMS_PER_CONNECTION`).
pub const STREAM_WINDOW: u32 = 512 * 1024;
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * crate::conn_guard::STREAMS_PER_CONNECTION;
/// The largest response head (or trailers) a shared connection takes, as HTTP/2 counts it
/// ([`header_list_size`]): as large as the request heads the proxy's own server takes
/// (`conn_guard`), a little over Envoy's default of 60 KiB. The inbound answers 502 rather than relay a larger
/// head from its app (`inbound::to_app`): the far side would refuse it, and h2 ends the whole
/// connection, under every stream on it, for a head past four times its bound or in more than
/// five CONTINUATION frames.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;

/// The largest frame a shared connection takes (`SETTINGS_MAX_FRAME_SIZE`, as the proxy's own
/// server advertises too). h2 Huffman-codes every string it sends, which makes bytes outside
/// ASCII up to 3.75 times longer, and it ends a connection whose header block takes more than
/// five CONTINUATION frames after the first. Six frames of 64 KiB carry any block within
/// [`MAX_HEADER_LIST`]; six of the default 16 KiB would not carry one of 30 KiB of such bytes.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// A header block's size as HTTP/2 counts it against `SETTINGS_MAX_HEADER_LIST_SIZE` (RFC 9113
/// section 6.5.2): each field's name and value, and 32 bytes.
pub fn header_list_size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// [`header_list_size`] of a request head as it goes out on HTTP/2, with its pseudo-header
/// fields (`:method`, `:scheme`, `:authority`, `:path`), but not the `content-length` a
/// [`Lease::send`] may add ([`ADDED_BY_SEND`]).
pub fn request_head_size(method: &Method, uri: &http::Uri, headers: &http::HeaderMap) -> usize {
    let pseudo = [
        (":method".len(), method.as_str().len()),
        (":scheme".len(), uri.scheme_str().map_or(0, str::len)),
        (
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path".len(),
            uri.path_and_query().map_or(1, |pq| pq.as_str().len()),
        ),
    ];
    pseudo.iter().map(|(n, v)| n + v + 32).sum::<usize>() + header_list_size(headers)
}

/// What [`Lease::send`] may add to a request head, as HTTP/2 counts it: a `content-length`.
pub const ADDED_BY_SEND: usize = "content-length".len() + 20 + 32;

/// The largest head (as HTTP/2 counts it) sent before the far side's SETTINGS have come. Until
/// then h2 writes a head in frames of HTTP/2's default 16 KiB, not [`MAX_FRAME_SIZE`], and the
/// far side takes six of them (ending the connection at a seventh): up to 96 KiB coded, which
/// Huffman coding (up to 3.75 times longer) fills from 25.6 KiB. A larger head (or trailers)
/// waits for the answer to the connection's first PING, which comes after those SETTINGS.
const EARLY_HEAD: usize = 24 * 1024;
/// How long heads over [`EARLY_HEAD`] wait for the answer to a new connection's first PING when
/// the connection has no keep-alive (with one, the keep-alive's wait, after which it ends).
const FIRST_PONG: Duration = Duration::from_secs(20);
/// Request body bytes buffered per stream while the far side's window is shut.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Something a stream keeps until it ends (a place in a caller's count of requests in flight):
/// a lingering stream still holds it.
pub type Keep = Box<dyn Any + Send + Sync>;

/// Why a request sent on a shared connection got no response.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Http(#[from] h2::Error),
    #[error("the request body failed before the response came")]
    RequestBody,
}

/// How a shared connection watches its far side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Sends a PING once the far side has sent nothing for this long, and closes the connection
    /// when the PING goes unanswered for as long again: a far side gone without a word (its
    /// host down, a NAT entry dropped) is found before a request waits on it, and a connection
    /// that is carrying traffic is not pinged (as hyper's keep-alive did) beyond the one PING
    /// every connection sends as it starts (see [`EARLY_HEAD`]), which, unanswered for this
    /// long, closes it too.
    pub keep_alive: Option<Duration>,
}

/// One shared HTTP/2 client connection, driven with the `h2` crate directly: a request goes
/// out from the task that sends it, and its response comes back to that task, with no
/// dispatch task in between (hyper's client adds a channel and a task per request).
#[derive(Debug)]
pub struct Conn {
    sender: SendRequest<Bytes>,
    /// The connection's task has ended.
    closed: Arc<AtomicBool>,
    /// Where it goes, for metrics (`upstream` or `app`).
    side: &'static str,
    /// Streams in flight (including lingering ones).
    streams: AtomicUsize,
    /// Streams the proxy reset.
    resets: AtomicUsize,
    /// Takes no new streams.
    retired: AtomicBool,
    /// The order of the next stream opened; taken in the order requests enter the connection.
    next: Mutex<u64>,
    /// The latest stream (in opening order) whose response head came.
    answered: AtomicU64,
    /// Resets of streams opened after the latest answered one: the far side may not have
    /// accepted them yet.
    unanswered_resets: Mutex<Vec<u64>>,
    /// Cancelled streams waiting to be known accepted, and their wake-up on each new answer.
    lingering: AtomicUsize,
    answers: tokio::sync::Notify,
    /// How long one of them waits at most.
    linger: Duration,
    /// The far side's SETTINGS are in force (see [`EARLY_HEAD`]); closed when the connection
    /// ends.
    settled: tokio::sync::watch::Receiver<bool>,
}

impl Conn {
    /// Makes an HTTP/2 connection over `io` and runs it in its own task.
    pub async fn handshake<I>(
        settings: Settings,
        io: I,
        side: &'static str,
        linger: Duration,
        label: String,
    ) -> Result<Arc<Conn>, h2::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let heard = Arc::new(AtomicU64::new(0));
        let io = Heard {
            io: crate::coalesce::Coalesced::new(io, true),
            reads: heard.clone(),
        };
        let (sender, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .initial_max_send_streams(STREAMS_PER_SHARED)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let pings = conn.ping_pong();
        let keep_alive = settings.keep_alive.map(|quiet| KeepAlive { quiet, heard });
        let (settle, settled) = tokio::sync::watch::channel(false);
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = drive(conn, pings, keep_alive, settle).await {
                tracing::debug!(to = label, error = %e, "shared connection closed");
            }
            ended.store(true, Ordering::Relaxed);
        });
        Ok(Arc::new(Conn {
            sender,
            closed,
            side,
            streams: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            next: Mutex::new(0),
            answered: AtomicU64::new(0),
            unanswered_resets: Mutex::default(),
            lingering: AtomicUsize::new(0),
            answers: tokio::sync::Notify::new(),
            linger,
            settled,
        }))
    }

    /// Whether new streams may use it.
    pub fn usable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed) && !self.closed.load(Ordering::Relaxed)
    }

    /// Whether it has a free stream slot.
    pub fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < STREAMS_PER_SHARED
    }

    /// How many streams were opened on it so far.
    pub fn opened(&self) -> u64 {
        *self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether no stream is in flight.
    pub fn is_idle(&self) -> bool {
        self.streams.load(Ordering::Relaxed) == 0
    }

    /// Takes no new streams from now on; open ones finish.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// A stream with the opening order `seq` was answered: it, and every stream opened before it,
    /// was accepted by the far side.
    fn answered(&self, seq: u64) {
        let before = self.answered.fetch_max(seq, Ordering::Relaxed);
        if seq > before && self.lingering.load(Ordering::Relaxed) > 0 {
            self.answers.notify_waiters();
        }
    }

    /// Whether the stream `seq` was accepted by the far side: a stream opened after it was
    /// answered.
    fn accepted(&self, seq: u64) -> bool {
        seq < self.answered.load(Ordering::Relaxed)
    }

    /// Whether the stream `seq`, not answered itself, may be reset now: it was accepted, or
    /// fewer than [`UNANSWERED_RESETS`] resets may still wait at the far side (then it counts as
    /// one of them until a stream opened after it is answered).
    fn may_reset(&self, seq: u64) -> bool {
        if self.accepted(seq) {
            return true;
        }
        let answered = self.answered.load(Ordering::Relaxed);
        let mut pending = self
            .unanswered_resets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending.retain(|s| *s >= answered);
        if pending.len() < UNANSWERED_RESETS {
            pending.push(seq);
            true
        } else {
            false
        }
    }

    /// Gives up on a stream whose response head has not come: reset now if [`Conn::may_reset`]
    /// allows, else lingering until it is known accepted.
    fn cancel(self: &Arc<Self>, stream: InFlight) {
        // Dropped, its response future and its body's pipe let go of the stream, and h2 resets
        // a stream nothing holds that has not ended.
        if self.may_reset(stream.seq) {
            drop(stream);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let conn = self.clone();
            rt.spawn(async move { conn.linger(stream).await });
        } else {
            drop(stream); // no runtime: the process is exiting
        }
    }

    /// Keeps a cancelled stream open until the far side is known to have accepted it — its own
    /// response head came, or that of a stream opened after it — and then resets it. A far side
    /// that answers nothing for [`Conn::linger`] gets the reset regardless, before its own
    /// request-idle timeout would close the connection over the stream's unfinished body, and
    /// the connection takes no new streams.
    async fn linger(self: Arc<Self>, mut stream: InFlight) {
        self.lingering.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.linger;
        loop {
            let answer = self.answers.notified();
            tokio::pin!(answer);
            answer.as_mut().enable();
            if self.accepted(stream.seq) {
                break;
            }
            tokio::select! {
                r = &mut stream.response => {
                    match r {
                        // Dropped now, it is reset as a stream the far side accepted.
                        Ok(_answered) => self.answered(stream.seq),
                        // The far side ended it: nothing of ours to reset.
                        Err(_) => stream.lease.clean = true,
                    }
                    break;
                }
                () = &mut answer => {}
                () = tokio::time::sleep_until(deadline) => {
                    self.retire();
                    tracing::debug!(
                        side = self.side,
                        "a cancelled stream got no answer in time; its connection takes no new streams"
                    );
                    break;
                }
            }
        }
        self.lingering.fetch_sub(1, Ordering::Relaxed);
        stream.state.abort();
    }
}

/// One stream's hold on a shared connection, from choosing the connection until the response
/// body ends. Dropped before that, the proxy reset the stream: counted against [`RESET_BUDGET`].
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Conn>,
    metrics: Arc<Metrics>,
    clean: bool,
    keep: Option<Keep>,
}

impl Lease {
    /// A stream slot on `conn` (see [`Conn::has_room`]).
    pub fn new(conn: &Arc<Conn>, metrics: &Arc<Metrics>) -> Self {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Lease {
            conn: conn.clone(),
            metrics: metrics.clone(),
            clean: false,
            keep: None,
        }
    }

    /// The connection it holds a slot on.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Keeps `keep` until the stream ends, lingering included.
    pub fn keeping(mut self, keep: Keep) -> Self {
        self.keep = Some(keep);
        self
    }

    /// Sends `req` on the connection. `Err` gives the request back unsent: the connection had
    /// closed (the far side went away or said GOAWAY), and it is retired.
    pub async fn send(mut self, req: Request<Body>) -> Result<Sent, Request<Body>> {
        let conn = self.conn.clone();
        if !*conn.settled.borrow()
            && request_head_size(req.method(), req.uri(), req.headers()) + ADDED_BY_SEND
                > EARLY_HEAD
        {
            // Should the connection end first, `ready` below says so. A client that gives up
            // meanwhile opened no stream: nothing to count against the reset budget.
            self.clean = true;
            let _ = conn.settled.clone().wait_for(|s| *s).await;
            self.clean = false;
        }
        let Ok(mut sender) = conn.sender.clone().ready().await else {
            conn.retire();
            self.clean = true;
            return Err(req);
        };
        let (mut head, body) = req.into_parts();
        // Hop-by-hop headers are not stripped again here: both callers strip them as a request
        // arrives (`strip_hop_by_hop`) and add none, and h2 refuses to send a head that still
        // has one (the request fails; nothing malformed reaches the far side).
        if let Some(len) = body.size_hint().exact()
            && (len != 0
                || !matches!(
                    head.method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
                ))
            && !head.headers.contains_key(http::header::CONTENT_LENGTH)
        {
            head.headers
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        }
        let end_of_stream = body.is_end_stream();
        let (seq, opened) = {
            // The order taken is the order the connection opens streams in: h2 gives a stream its
            // identifier when it is sent, and streams are sent here, under the lock.
            let mut next = conn.next.lock().unwrap_or_else(|e| e.into_inner());
            let seq = *next;
            let opened = sender.send_request(Request::from_parts(head, ()), end_of_stream);
            if opened.is_ok() {
                *next += 1;
            }
            (seq, opened)
        };
        let (response, body_tx) = match opened {
            Ok(x) => x,
            Err(e) => {
                // Refused before it was a stream: nothing of ours to reset.
                self.clean = true;
                return Ok(Sent {
                    stream: None,
                    refused: Some(e),
                });
            }
        };
        let state = Arc::new(StreamState::default());
        let pipe = if end_of_stream {
            Pipe(None)
        } else {
            let body = GatedBody {
                inner: body,
                state: state.clone(),
                failed: None,
            };
            let settled = conn.settled.clone();
            Pipe(Some(
                tokio::spawn(pipe(body, body_tx, settled)).abort_handle(),
            ))
        };
        Ok(Sent {
            stream: Some(InFlight {
                seq,
                response,
                lease: self,
                state,
                pipe,
            }),
            refused: None,
        })
    }
}

/// A connection's keep-alive: [`Settings::keep_alive`].
struct KeepAlive {
    quiet: Duration,
    /// Reads that brought bytes, counted by [`Heard`].
    heard: Arc<AtomicU64>,
}

/// Drives a shared connection until it ends: says when the far side's SETTINGS are in force
/// (`settle`, once its first PING is answered), then pings the far side when it has been quiet
/// (see [`Settings::keep_alive`]).
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    mut pings: Option<h2::PingPong>,
    keep_alive: Option<KeepAlive>,
    settle: tokio::sync::watch::Sender<bool>,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::pin!(conn);
    // The far side's connection preface is its SETTINGS, so they are read, and in force, by
    // the time its answer to a PING comes. Unanswered for as long as the keep-alive gives a
    // PING, the connection ends, as it would then; without a keep-alive, it is taken as it is.
    if let Some(p) = pings.as_mut() {
        let wait = keep_alive.as_ref().map_or(FIRST_PONG, |k| k.quiet);
        let pong = tokio::time::timeout(wait, p.ping(h2::Ping::opaque()));
        tokio::select! {
            ended = &mut conn => return ended.map_err(|e| e.to_string()),
            answered = pong => match answered {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) if keep_alive.is_some() => {
                    return Err(format!("no answer to the first PING in {wait:?}"));
                }
                Err(_) => {}
            },
        }
    }
    settle.send_replace(true);
    let (Some(mut pings), Some(k)) = (pings, keep_alive) else {
        return conn.await.map_err(|e| e.to_string());
    };
    let mut seen = k.heard.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            ended = &mut conn => return ended.map_err(|e| e.to_string()),
            () = tokio::time::sleep(k.quiet) => {}
        }
        let now = k.heard.load(Ordering::Relaxed);
        if std::mem::replace(&mut seen, now) != now {
            continue;
        }
        let pong = tokio::time::timeout(k.quiet, pings.ping(h2::Ping::opaque()));
        tokio::select! {
            ended = &mut conn => return ended.map_err(|e| e.to_string()),
            answered = pong => match answered {
                Ok(Ok(_)) => seen = k.heard.load(Ordering::Relaxed),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => {
                    return Err(format!(
                        "keep-alive timed out: no answer to a PING in {:?}",
                        k.quiet
                    ));
                }
            },
        }
    }
}

/// A shared connection's transport, counting the reads that brought bytes, so the keep-alive
/// pings only a far side that has gone quiet. Writes pass through as they are.
struct Heard<IO> {
    io: IO,
    reads: Arc<AtomicU64>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Heard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Heard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sends a request body on its stream as the far side's window allows: a frame at a time, read
/// from the body only once the one before went out, so no more than one frame waits here. Ends
/// the stream when the body ends, sends its trailers, or resets the stream when the body fails
/// (`GatedBody` holds a failure until a reset is safe). A far side that resets the stream stops
/// it.
async fn pipe(
    body: GatedBody,
    mut tx: SendStream<Bytes>,
    mut settled: tokio::sync::watch::Receiver<bool>,
) {
    let mut body = body;
    loop {
        let next = tokio::select! {
            biased;
            _reset = std::future::poll_fn(|cx| tx.poll_reset(cx)) => return,
            frame = body.frame() => frame,
        };
        let frame = match next {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tx.send_reset(reset_reason(&*e));
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(mut trailers) = frame.into_trailers() {
                    // A chunked HTTP/1.1 body's trailers may name connection-specific fields,
                    // which HTTP/2 forbids (RFC 9113 section 8.2.2) and h2 refuses to send: they
                    // go. A refusal all the same resets the stream rather than leaving it open
                    // until the far side's request timeout closes the whole connection.
                    crate::http::strip_hop_by_hop(&mut trailers);
                    trailers.remove(http::header::TE);
                    if !*settled.borrow() && header_list_size(&trailers) > EARLY_HEAD {
                        let _ = settled.wait_for(|s| *s).await;
                    }
                    if tx.send_trailers(trailers).is_err() {
                        tx.send_reset(h2::Reason::INTERNAL_ERROR);
                    }
                    return;
                }
                continue;
            }
        };
        let end = body.is_end_stream();
        if data.is_empty() {
            if tx.send_data(data, end).is_err() || end {
                return;
            }
            continue;
        }
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            let granted = match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                // The stream was reset or the connection ended.
                Some(Err(_)) | None => return,
            };
            let chunk = data.split_to(granted.min(data.len()));
            if tx.send_data(chunk, end && data.is_empty()).is_err() {
                return;
            }
        }
        if end {
            return;
        }
    }
}

/// The reset for a request body that failed: the HTTP/2 reason that ended it, if one did (a
/// local client's CANCEL goes on as CANCEL, so the app sees a cancelled call, not a fault of its
/// own), else `INTERNAL_ERROR`.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> h2::Reason {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        cause = e.source();
    }
    h2::Reason::INTERNAL_ERROR
}

/// The task that sends a request body (see [`pipe`]), aborted when dropped: a stream given up
/// before its response came takes its body with it.
struct Pipe(Option<tokio::task::AbortHandle>);

impl Pipe {
    /// The stream was answered: the body goes on for as long as it lasts.
    fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        if !self.clean && self.conn.resets.fetch_add(1, Ordering::Relaxed) + 1 == RESET_BUDGET {
            self.conn.retire();
            self.metrics
                .connection_closed(self.conn.side, "reset-budget");
            tracing::debug!(
                side = self.conn.side,
                "a shared connection reached its reset budget; new requests go to a fresh one"
            );
        }
    }
}

/// A stream whose response head has not come yet.
struct InFlight {
    seq: u64,
    response: ResponseFuture,
    lease: Lease,
    state: Arc<StreamState>,
    pipe: Pipe,
}

/// The response to a request sent on a shared connection. Dropped before it resolves, the
/// stream is cancelled through the connection's reset gate ([`Conn::cancel`]).
pub struct Sent {
    stream: Option<InFlight>,
    /// Why h2 refused to open the stream (the connection is closing, or the request head is
    /// one HTTP/2 cannot carry).
    refused: Option<h2::Error>,
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sent")
            .field("seq", &self.stream.as_ref().map(|s| s.seq))
            .finish_non_exhaustive()
    }
}

impl Future for Sent {
    type Output = Result<Response<Leased>, StreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(e) = self.refused.take() {
            return Poll::Ready(Err(e.into()));
        }
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Err(StreamError::RequestBody));
        };
        if stream.state.request_failed(cx.waker()) {
            if let Some(stream) = self.stream.take() {
                stream.lease.conn.clone().cancel(stream);
            }
            return Poll::Ready(Err(StreamError::RequestBody));
        }
        let Poll::Ready(result) = Pin::new(&mut stream.response).poll(cx) else {
            return Poll::Pending;
        };
        let Some(InFlight {
            seq,
            mut lease,
            state,
            pipe,
            ..
        }) = self.stream.take()
        else {
            return Poll::Ready(Err(StreamError::RequestBody));
        };
        pipe.detach();
        state.answer();
        Poll::Ready(match result {
            Ok(resp) => {
                lease.conn.answered(seq);
                // A response without a body is never polled.
                lease.clean = resp.body().is_end_stream();
                let remaining = content_length(resp.headers());
                Ok(resp.map(|inner| Leased {
                    inner,
                    lease,
                    remaining,
                    data_done: false,
                }))
            }
            Err(e) => {
                // The far side (or the connection) ended it: not our reset.
                lease.clean = true;
                Err(e.into())
            }
        })
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.lease.conn.clone().cancel(stream);
        }
    }
}

/// What a request body and its response future know of each other.
#[derive(Debug, Default)]
struct StreamState(Mutex<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// The response head came (or the stream ended): the far side has the stream, so a reset
    /// is safe.
    answered: bool,
    /// The stream was given up: the body ends it now.
    aborted: bool,
    /// The request body failed before the response head came.
    failed: bool,
    response_waker: Option<Waker>,
    body_waker: Option<Waker>,
}

impl StreamState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the request body failed; if not, `waker` is woken when it does.
    fn request_failed(&self, waker: &Waker) -> bool {
        let mut s = self.lock();
        if !s.failed {
            s.response_waker = Some(waker.clone());
        }
        s.failed
    }

    fn answer(&self) {
        let waker = {
            let mut s = self.lock();
            s.answered = true;
            s.body_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn abort(&self) {
        let waker = {
            let mut s = self.lock();
            s.answered = true;
            s.aborted = true;
            s.body_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A request body on a shared connection. [`pipe`] resets a stream the moment its request body
/// fails; before the response head has come, that reset must pass the connection's gate
/// instead, so the failure is held (the stream stays open) and handed to the response future,
/// which cancels through the gate. Once the stream is answered, the failure goes on as it came.
struct GatedBody {
    inner: Body,
    state: Arc<StreamState>,
    failed: Option<BoxError>,
}

/// The stream was given up by the proxy.
#[derive(Debug, thiserror::Error)]
#[error("the request was cancelled")]
struct Cancelled;

impl hyper::body::Body for GatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.failed.is_none() {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            let Poll::Ready(Some(Err(e))) = polled else {
                return polled;
            };
            self.failed = Some(e);
        }
        let held = {
            let mut s = self.state.lock();
            if s.aborted || s.answered {
                None
            } else {
                s.failed = true;
                s.body_waker = Some(cx.waker().clone());
                Some(s.response_waker.take())
            }
        };
        match held {
            Some(response_waker) => {
                if let Some(w) = response_waker {
                    w.wake();
                }
                Poll::Pending
            }
            None => {
                let e = self.failed.take().unwrap_or_else(|| Box::new(Cancelled));
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The length a response head declares in its one `content-length`, if it declares one (h2
/// holds the stream's DATA to it).
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.parse().ok()
}

/// A response body from a shared connection; ending (or failing) releases its stream cleanly.
/// The connection's window opens again by what is taken from it.
#[derive(Debug)]
pub struct Leased {
    inner: RecvStream,
    lease: Lease,
    /// What is left of a declared `content-length`.
    remaining: Option<u64>,
    /// The DATA has ended; trailers (or the end) come next.
    data_done: bool,
}

impl Leased {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, h2::Error>>> {
        match self.inner.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.inner.flow_control().release_capacity(data.len());
                if let Some(left) = &mut self.remaining {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(data)))
            }
            Poll::Ready(Some(Err(e))) if ends_quietly(&e) => Poll::Ready(None),
            other => other,
        }
    }

    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.inner.poll_trailers(cx) {
            Poll::Ready(Ok(trailers)) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Poll::Ready(Err(e)) if ends_quietly(&e) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A reset with `NO_ERROR`: a far side that answered early stops the request this way (RFC
/// 9113, section 8.1); the response body ends there, it does not fail.
fn ends_quietly(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::NO_ERROR)
}

impl hyper::body::Body for Leased {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = if this.data_done {
            this.poll_trailers(cx)
        } else {
            match this.poll_data(cx) {
                Poll::Ready(None) => {
                    this.data_done = true;
                    this.poll_trailers(cx)
                }
                polled => polled.map(|d| d.map(|d| d.map(Frame::data))),
            }
        };
        // hyper stops polling once `is_end_stream` says so: the last frame ends it too.
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.inner.is_end_stream() {
            this.lease.clean = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            _ if self.inner.is_end_stream() => SizeHint::with_exact(0),
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn() -> Arc<Conn> {
        conn_to(Settings::default(), None).await
    }

    /// A real HTTP/2 connection to nothing but an h2 server on the other end of a pipe, which
    /// goes on answering (PINGs included) when `answering`, else falls silent after its
    /// handshake with the connection still open.
    /// A connection to an h2 server that answers (PINGs included) for `answers_for`, or for
    /// ever, then falls silent.
    async fn conn_to(settings: Settings, answers_for: Option<Duration>) -> Arc<Conn> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let Ok(mut h2) = h2::server::handshake(server).await else {
                return;
            };
            let serve = async { while let Some(Ok(_)) = h2.accept().await {} };
            match answers_for {
                None => serve.await,
                Some(d) => {
                    let _ = tokio::time::timeout(d, serve).await;
                    std::future::pending::<()>().await;
                }
            }
        });
        Conn::handshake(
            settings,
            client,
            "upstream",
            Duration::from_secs(1),
            "test".into(),
        )
        .await
        .expect("handshake")
    }

    #[tokio::test]
    async fn a_head_with_a_hop_by_hop_header_is_refused_not_sent() {
        let c = conn().await;
        let metrics = Arc::new(Metrics::new());
        let req = Request::builder()
            .uri("http://app/x")
            .header(http::header::TRANSFER_ENCODING, "chunked")
            .body(crate::http::boxed(http_body_util::Empty::<Bytes>::new()))
            .unwrap();
        let sent = Lease::new(&c, &metrics)
            .send(req)
            .await
            .expect("connection open");
        assert!(matches!(sent.await, Err(StreamError::Http(_))));
        assert_eq!(c.opened(), 0, "no stream was opened for it");
        assert!(c.usable(), "the connection stays usable");
    }

    #[test]
    fn a_failed_body_is_reset_with_the_reason_that_ended_it() {
        /// An error that wraps another, as hyper's wrap h2's.
        #[derive(Debug, thiserror::Error)]
        #[error("body read failed")]
        struct Wrapped(#[source] h2::Error);

        let cancelled = h2::Error::from(h2::Reason::CANCEL);
        assert_eq!(reset_reason(&cancelled), h2::Reason::CANCEL);
        let wrapped = Wrapped(h2::Error::from(h2::Reason::CANCEL));
        assert_eq!(reset_reason(&wrapped), h2::Reason::CANCEL);
        let other = std::io::Error::other("connection reset");
        assert_eq!(reset_reason(&other), h2::Reason::INTERNAL_ERROR);
    }

    #[tokio::test]
    async fn a_far_side_that_stops_answering_pings_loses_its_connection() {
        let every = Duration::from_millis(50);
        let pinging = Settings {
            keep_alive: Some(every),
        };
        let silent = conn_to(pinging, Some(Duration::ZERO)).await;
        let answering = conn_to(pinging, None).await;
        let unwatched = conn_to(Settings::default(), Some(Duration::ZERO)).await;
        // Answers the PING every connection starts with, then falls silent: found by the
        // keep-alive's own PINGs.
        let falls_silent = conn_to(pinging, Some(every * 2)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while silent.usable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a far side that answers no PING keeps its connection"
            );
            tokio::time::sleep(every / 5).await;
        }
        assert!(answering.usable(), "a far side that answers keeps it");
        assert!(unwatched.usable(), "without PINGs, silence is not noticed");
        assert!(*falls_silent.settled.borrow(), "it answered the first PING");
        while falls_silent.usable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a far side that falls silent keeps its connection"
            );
            tokio::time::sleep(every / 5).await;
        }
        tokio::time::sleep(every * 4).await;
        assert!(answering.usable(), "still, after several PINGs");
    }

    #[tokio::test]
    async fn at_most_the_bound_of_resets_wait_unanswered() {
        let c = conn().await;
        for seq in 0..UNANSWERED_RESETS as u64 {
            assert!(c.may_reset(seq), "reset {seq} is within the bound");
        }
        assert!(
            !c.may_reset(UNANSWERED_RESETS as u64),
            "one more must linger"
        );
        // A stream opened after the first five is answered: the far side has taken them.
        c.answered(5);
        for seq in 0..5 {
            assert!(c.may_reset(100 + seq), "room made by the answer: {seq}");
        }
        assert!(!c.may_reset(200), "and no more than that");
    }

    #[tokio::test]
    async fn an_answer_for_an_earlier_stream_frees_nothing_after_it() {
        let c = conn().await;
        for seq in 10..10 + UNANSWERED_RESETS as u64 {
            assert!(c.may_reset(seq));
        }
        c.answered(3);
        assert!(
            !c.may_reset(40),
            "streams 10.. may still wait at the far side"
        );
        c.answered(10 + UNANSWERED_RESETS as u64);
        assert!(c.may_reset(41));
    }
}
