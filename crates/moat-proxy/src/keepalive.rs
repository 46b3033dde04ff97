//! Kept-alive HTTP/1.1 connections that carry one request at a time: the inbound's connections
//! to the local app, kept per inbound connection ([`crate::app::Http1`]). A request takes the
//! newest idle connection that is still open and has been idle less than the keep time
//! ([`take_newest`]); its connection goes back once its response has ended and hyper is done
//! with the exchange ([`returning`]), so a stalled upload never lends its connection out. A
//! connection idle for the keep time is closed by the task driving it ([`IdleSince`],
//! [`drive`]).
//!
//! Mesh connections carried HTTP/1.1 this way from decision 37 until decision 52, which put
//! every HTTP request on the shared HTTP/2 connections.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::http::Body;

/// Idle connections to the app kept per inbound connection; more are closed when their
/// response ends.
const IDLE_KEPT: usize = 256;

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

/// A kept HTTP/1.1 connection.
#[derive(Debug)]
pub struct Conn {
    pub sender: SendRequest<Body>,
    idle: Arc<IdleSince>,
}

impl Conn {
    /// A connection just made, carrying its first request; `sender` must be the handshake's and
    /// `idle` shared with the task driving it ([`drive`]).
    pub fn new(sender: SendRequest<Body>, idle: Arc<IdleSince>) -> Self {
        Conn { sender, idle }
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

/// Of `idle` (newest last), the newest connection that can carry a request now: open and idle
/// less than `keep`. Those found on the way are dropped, which closes them.
pub fn take_newest(idle: &mut Vec<Conn>, keep: Duration) -> Option<Conn> {
    while let Some(c) = idle.pop() {
        let fresh = c.idle.get().is_some_and(|at| at.elapsed() < keep);
        if c.sender.is_ready() && fresh {
            c.idle.set(None);
            return Some(c);
        }
    }
    None
}

/// Puts `conn`, which can take a request now, last among `idle`, after dropping the closed ones;
/// past [`IDLE_KEPT`] it is closed instead.
fn keep(idle: &mut Vec<Conn>, conn: Conn) {
    conn.idle.set(Some(Instant::now()));
    idle.retain(|c| !c.sender.is_closed());
    if idle.len() < IDLE_KEPT {
        idle.push(conn);
    }
}

/// A connection's idle fellows, newest last.
pub type Idle = Mutex<Vec<Conn>>;

/// A connection on its way back among `idle` once the exchange on it is over; gone with them
/// (their inbound connection closed), it closes too.
struct GiveBack {
    conn: Conn,
    idle: Weak<Idle>,
}

impl GiveBack {
    /// Keeps the connection, which can take a request now, for the next request.
    fn put_back(self) {
        let Some(idle) = self.idle.upgrade() else {
            return;
        };
        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
        keep(&mut idle, self.conn);
    }
}

/// `body`, the response `conn` carried, as a [`Body`] that puts `conn` back among `idle` once
/// it has ended cleanly.
pub fn returning(conn: Conn, idle: &Arc<Idle>, body: Incoming) -> Body {
    let mut body = Returning {
        inner: body,
        back: Some(GiveBack {
            conn,
            idle: Arc::downgrade(idle),
        }),
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
struct Returning {
    inner: Incoming,
    back: Option<GiveBack>,
}

impl Returning {
    fn give_back(&mut self) {
        let Some(mut back) = self.back.take() else {
            return;
        };
        if back.conn.sender.is_ready() {
            back.put_back();
            return;
        }
        tokio::spawn(async move {
            if back.conn.sender.ready().await.is_ok() {
                back.put_back();
            }
        });
    }
}

impl hyper::body::Body for Returning {
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
