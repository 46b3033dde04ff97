//! HTTP/1.1 between sidecars (decision 37): a request whose local client spoke HTTP/1.1 travels
//! to the far sidecar as HTTP/1.1, on an mTLS connection (ALPN `http/1.1`) that carries one
//! request at a time and is kept for the next one once its response has ended. Nothing on such a
//! connection is shared while a request uses it — no flow-control window, no stream slots — so
//! what one local client does to its request cannot touch another's (decision 30).
//!
//! [`Kept`] holds the idle connections per endpoint, app port and service, newest last. One is taken
//! only if its connection is still open, it has been idle less than the keep time (shorter than
//! the far side's wait for a next request head, which closes idle keep-alive connections), it
//! was made with the current certificate, and the far side's certificate has neither expired
//! nor been revoked since (see [`crate::pool::Made`]). A connection idle for the keep time is
//! closed by the task driving it ([`IdleSince`]), and the far side closes idle ones after its
//! `--idle-timeout`; either way a connection that ends leaves the idle ones at once: a
//! closed connection kept there would hold hyper's request channel (about 8 KiB) until the next
//! request to its endpoint, which may never come — after a burst, megabytes that never went back.
//!
//! The inbound keeps its HTTP/1.1 connections to the local app with the same parts ([`Conn`],
//! [`drive`], [`returning`]), per inbound connection: see [`crate::app::Http1`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use prometheus_client::metrics::gauge::Gauge;

use crate::http::Body;
use crate::pool::Made;

/// Idle connections kept per endpoint, app port and service (and per inbound connection, to
/// the app); more are closed when their response ends.
pub const IDLE_PER_ENDPOINT: usize = 256;

/// How long a connection is kept idle: half the header-read timeout (5 s by default), short so
/// a burst's connections go soon, and at most half the idle timeout (alike across the mesh),
/// after which the far side would close it.
pub fn keep_time(limits: &crate::conn_guard::ConnLimits) -> Duration {
    limits.header_read.min(limits.idle) / 2
}

/// When a kept connection went idle (`None` while a request has it), shared by its [`Conn`] and
/// the task driving it, which closes it once it has been idle for the keep time: the far side
/// would close it soon after, and one that does not must not keep it open. The task looks when
/// the keep time could have run out, never per request: a request costs it no wake-up.
#[derive(Debug, Default)]
pub struct IdleSince(Mutex<Option<Instant>>);

impl IdleSince {
    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, since: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = since;
    }

    /// Resolves once the connection has been idle for `keep`.
    pub async fn expired(&self, keep: Duration) {
        loop {
            let wait = match self.get() {
                Some(at) => (at + keep).saturating_duration_since(Instant::now()),
                // In use: it cannot run out sooner than `keep` after it is given back.
                None => keep,
            };
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// A kept HTTP/1.1 connection: to another sidecar (`M` is [`Made`], what it was made with) or
/// to the local app (`M` is `()`, see [`crate::app::Http1`]).
#[derive(Debug)]
pub struct Conn<M = Made> {
    pub sender: SendRequest<Body>,
    pub made: M,
    idle: Arc<IdleSince>,
}

impl<M> Conn<M> {
    /// A connection just made, carrying its first request; `sender` must be the handshake's and
    /// `idle` shared with the task driving it ([`drive`]).
    pub fn new(sender: SendRequest<Body>, made: M, idle: Arc<IdleSince>) -> Self {
        Conn { sender, made, idle }
    }
}

/// Drives a kept connection until it ends, or until it has been idle for `keep`, when it is
/// closed.
pub async fn drive<T>(
    conn: hyper::client::conn::http1::Connection<T, Body>,
    idle: &IdleSince,
    keep: Duration,
) -> Result<(), hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::select! {
        r = conn => r,
        // Dropping the connection closes it.
        () = idle.expired(keep) => Ok(()),
    }
}

/// Of `idle` (newest last), the newest connection that can carry a request now: open, idle less
/// than `keep`, and `usable`. Those found on the way are dropped, which closes them.
pub fn take_newest<M>(
    idle: &mut Vec<Conn<M>>,
    keep: Duration,
    usable: impl Fn(&M) -> bool,
) -> Option<Conn<M>> {
    while let Some(c) = idle.pop() {
        let fresh = c.idle.get().is_some_and(|at| at.elapsed() < keep);
        if c.sender.is_ready() && fresh && usable(&c.made) {
            c.idle.set(None);
            return Some(c);
        }
    }
    None
}

/// Puts `conn`, which can take a request now, last among `idle`, after dropping the closed ones;
/// past [`IDLE_PER_ENDPOINT`] it is closed instead.
pub fn keep<M>(idle: &mut Vec<Conn<M>>, conn: Conn<M>) {
    conn.idle.set(Some(Instant::now()));
    idle.retain(|c| !c.sender.is_closed());
    if idle.len() < IDLE_PER_ENDPOINT {
        idle.push(conn);
    }
}

/// The connections to one endpoint and app port.
#[derive(Debug, Default)]
struct Endpoint {
    /// Idle, newest last.
    idle: Vec<Conn>,
    /// Open, in use or idle.
    open: Arc<AtomicUsize>,
}

/// The endpoints, by `endpoint|server name`, and the gauge of idle connections among them.
#[derive(Debug, Default)]
struct Endpoints {
    by_key: Mutex<HashMap<String, Endpoint>>,
    /// `moat_upstream_idle_connections`: the idle connections held, summed over endpoints.
    idle: Gauge,
}

impl Endpoints {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Endpoint>> {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the gauge by how an endpoint's idle list changed: O(1) per request, however many
    /// endpoints there are.
    fn changed(&self, before: usize, after: usize) {
        // Both at most IDLE_PER_ENDPOINT: the casts cannot wrap.
        self.idle.inc_by(after as i64 - before as i64);
    }
}

/// The connections, by `endpoint|server name`.
#[derive(Debug, Default)]
pub struct Kept(Arc<Endpoints>);

/// A place among an endpoint's open connections, held by its connection until it closes.
#[derive(Debug)]
pub struct Opened {
    open: Arc<AtomicUsize>,
    key: String,
    kept: Weak<Endpoints>,
}

impl Drop for Opened {
    /// The connection has ended: its place goes, and so does every closed connection among the
    /// endpoint's idle ones (its own, if it was idle); an endpoint with nothing open or idle is
    /// forgotten.
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let Some(kept) = self.kept.upgrade() else {
            return;
        };
        let mut map = kept.lock();
        if let Some(ep) = map.get_mut(&self.key) {
            let before = ep.idle.len();
            ep.idle.retain(|c| !c.sender.is_closed());
            kept.changed(before, ep.idle.len());
            // Places are only taken under the lock (`reserve`): none open now stays so.
            if ep.idle.is_empty() && ep.open.load(Ordering::Relaxed) == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Kept {
    /// A pool whose idle connections `idle` counts.
    pub fn new(idle: Gauge) -> Self {
        Kept(Arc::new(Endpoints {
            by_key: Mutex::default(),
            idle,
        }))
    }

    /// A place for one more connection under `key`; `None` when `limit` are open, in use or
    /// idle.
    pub fn reserve(&self, key: &str, limit: usize) -> Option<Opened> {
        let mut map = self.0.lock();
        let open = map.entry(key.to_owned()).or_default().open.clone();
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Opened {
            open,
            key: key.to_owned(),
            kept: Arc::downgrade(&self.0),
        })
    }

    /// The newest idle connection under `key` that can carry a request now (open, idle less than
    /// `keep`, and `usable`); the others found on the way are closed.
    pub fn take(&self, key: &str, keep: Duration, usable: impl Fn(&Made) -> bool) -> Option<Conn> {
        let mut map = self.0.lock();
        let idle = &mut map.get_mut(key)?.idle;
        let before = idle.len();
        let found = take_newest(idle, keep, usable);
        self.0.changed(before, idle.len());
        found
    }

    /// `body` as a [`Body`] that gives `conn` back under `key` once it has ended cleanly.
    pub fn returning(&self, key: String, conn: Conn, body: Incoming) -> Body {
        returning(
            ToEndpoint {
                key,
                conn,
                kept: Arc::downgrade(&self.0),
            },
            body,
        )
    }
}

/// Where a kept connection goes once the exchange on it is over.
pub trait GiveBack: Send + Sync + Unpin + 'static {
    /// The connection's request sender.
    fn sender(&mut self) -> &mut SendRequest<Body>;
    /// Keeps the connection, which can take a request now, for the next one.
    fn put_back(self);
}

/// A mesh connection going back among its endpoint's idle ones.
struct ToEndpoint {
    key: String,
    conn: Conn,
    kept: Weak<Endpoints>,
}

impl GiveBack for ToEndpoint {
    fn sender(&mut self) -> &mut SendRequest<Body> {
        &mut self.conn.sender
    }

    fn put_back(self) {
        let Some(kept) = self.kept.upgrade() else {
            return;
        };
        let mut map = kept.lock();
        let idle = &mut map.entry(self.key).or_default().idle;
        let before = idle.len();
        keep(idle, self.conn);
        kept.changed(before, idle.len());
    }
}

/// `body` as a [`Body`] that hands its connection to `back` once it has ended cleanly.
pub fn returning<G: GiveBack>(back: G, body: Incoming) -> Body {
    let mut body = Returning {
        inner: body,
        back: Some(back),
    };
    // hyper never polls a body that is over before it began (no content).
    if body.inner.is_end_stream() {
        body.give_back();
    }
    crate::http::boxed(body)
}

/// A response body that, once it has ended cleanly, puts its connection back among the idle
/// ones as soon as hyper has finished with the exchange (its request body may still be going
/// out, or be stalled by its local client: until it is done, nobody else gets the connection).
/// A body dropped or failed before its end takes its connection with it: hyper closes a
/// connection whose response was not read to the end.
struct Returning<G> {
    inner: Incoming,
    back: Option<G>,
}

impl<G: GiveBack> Returning<G> {
    fn give_back(&mut self) {
        let Some(mut back) = self.back.take() else {
            return;
        };
        if back.sender().is_ready() {
            back.put_back();
            return;
        }
        tokio::spawn(async move {
            if back.sender().ready().await.is_ok() {
                back.put_back();
            }
        });
    }
}

impl<G: GiveBack> hyper::body::Body for Returning<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(None) => self.give_back(),
            // hyper stops polling once `is_end_stream` says so: the last frame ends it too.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            _ => {}
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
