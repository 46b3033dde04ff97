//! Dialling other sidecars: pick an endpoint of the service (round robin, skipping endpoints
//! that failed recently), originate mTLS that accepts only the service's expected identity, and,
//! for HTTP, multiplex every local client's requests over shared HTTP/2 connections per endpoint
//! ([`Upstreams`]), bounded so that what one local client does to its streams — resets, a
//! window left at zero, stream slots held — can never make the far side close a connection
//! other clients' requests travel on (decision 30).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat_identity::SpiffeId;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ctx::Ctx;
use crate::http::Body;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed endpoint is tried only after the healthy ones.
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// Why no connection to the service could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no endpoints are known for {0}")]
    NoEndpoints(SpiffeId),
    #[error("the proxy has no certificate yet")]
    NotReady,
    #[error("every endpoint of {service} failed; last: {last}")]
    AllFailed { service: SpiffeId, last: String },
}

/// Where a mesh connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The identity the far side must prove.
    pub service: SpiffeId,
    /// Only this endpoint (transparent mode: the pod the app dialled); else any of the service's.
    pub endpoint: Option<String>,
    /// The app port on the far side (transparent mode), carried as the TLS server name
    /// `port-<n>.moat.invalid`; else the far side's `--app`.
    pub port: Option<u16>,
}

impl Target {
    /// Any endpoint of `service`, to its configured app.
    pub fn service(service: SpiffeId) -> Self {
        Target {
            service,
            endpoint: None,
            port: None,
        }
    }

    fn server_name(&self) -> String {
        match self.port {
            Some(p) => format!("port-{p}.moat.invalid"),
            None => "moat.invalid".to_owned(),
        }
    }
}

/// The app port a mesh connection asks for, from its TLS server name (`port-<n>.moat.invalid`).
pub fn port_from_server_name(name: Option<&str>) -> Option<u16> {
    name?
        .strip_prefix("port-")?
        .strip_suffix(".moat.invalid")?
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

/// Endpoint health and round robin, shared by every outbound listener.
#[derive(Debug, Default)]
pub struct Pool {
    failed: Mutex<HashMap<String, Instant>>,
    next: AtomicUsize,
    upstreams: Upstreams,
}

/// The HTTP/2 connections to other sidecars, shared by every local client (decision 30), per
/// endpoint and app port. A local client can never make the far side close one of them, because
/// the proxy bounds what the clients' streams do to each: at most [`STREAMS_PER_SHARED`] streams
/// (below the far side's pending-reset bound), a connection window that covers every stream's
/// window (a client that stops reading stalls only its own stream), at most [`RESET_BUDGET`]
/// streams reset by the proxy (a client that cancels) before the connection takes no new
/// streams and closes once its last one ends, and local clients' stalls cut off at half the
/// far side's timeouts (`ConnLimits::for_local_clients`).
#[derive(Debug, Default)]
pub struct Upstreams(Mutex<HashMap<String, Slot>>);

/// The shared connections to one endpoint and app port; locked while one is chosen or dialled.
type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Shared>>>>;

impl Upstreams {
    fn slot(&self, key: &str) -> Slot {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_owned()).or_default().clone()
    }
}

/// Streams the proxy opens at once on one shared connection: below the far side's bound on
/// streams reset before it accepted them (`conn_guard::PENDING_ACCEPT_RESETS`), so no burst of
/// local cancellations can trip it.
pub const STREAMS_PER_SHARED: usize = 16;
/// Streams the proxy may reset on one shared connection (local clients that gave up) before
/// it takes no new ones: far below the far side's cancel bound
/// (`conn_guard::CANCELS_PER_WINDOW`) and h2's lifetime bound on locally reset streams (1024).
pub const RESET_BUDGET: usize = 64;
/// Flow-control windows of a shared connection: every stream's window fits in the
/// connection's, so data one stream leaves unread never holds up another.
pub const STREAM_WINDOW: u32 = 512 * 1024;
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * STREAMS_PER_SHARED as u32;

/// One shared HTTP/2 connection to another sidecar.
#[derive(Debug)]
pub struct Shared {
    sender: SendRequest<Body>,
    /// The certificate generation it was made with.
    generation: Arc<crate::identity::TlsGen>,
    /// Who the far side proved to be.
    peer: moat_identity::VerifiedPeer,
    /// Streams in flight.
    streams: AtomicUsize,
    /// Streams the proxy reset (a local client gave up on them).
    resets: AtomicUsize,
    /// Takes no new streams.
    retired: AtomicBool,
}

impl Shared {
    /// Whether new streams may use it: open, not retired, made with the current certificate,
    /// to a far side whose certificate is neither expired nor revoked.
    fn usable(
        &self,
        tls: Option<&Arc<crate::identity::TlsGen>>,
        snap: Option<&crate::snapshot::Snapshot>,
        now: i64,
    ) -> bool {
        !self.retired.load(Ordering::Relaxed)
            && !self.sender.is_closed()
            && tls.is_some_and(|t| Arc::ptr_eq(t, &self.generation))
            && self.peer.not_after > now
            && !snap.is_some_and(|s| s.is_revoked(&self.peer.id, &self.peer.serial))
    }
}

/// One stream's hold on a shared connection, from sending the request until the response body
/// ends. Dropped before that, the proxy reset the stream: counted against [`RESET_BUDGET`].
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Shared>,
    metrics: Arc<crate::metrics::Metrics>,
    clean: bool,
}

impl Lease {
    fn new(conn: Arc<Shared>, ctx: &Ctx) -> Self {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Lease {
            conn,
            metrics: ctx.metrics.clone(),
            clean: false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        if !self.clean && self.conn.resets.fetch_add(1, Ordering::Relaxed) + 1 == RESET_BUDGET {
            self.conn.retired.store(true, Ordering::Relaxed);
            self.metrics.connection_closed("upstream", "reset-budget");
            tracing::debug!(
                "a shared mesh connection reached its reset budget; new requests go to a fresh one"
            );
        }
    }
}

/// A response body from a shared connection; ending (or failing) releases its stream cleanly.
#[derive(Debug)]
pub struct Leased {
    inner: Incoming,
    lease: Lease,
}

impl hyper::body::Body for Leased {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once `is_end_stream` says so: the last frame ends it too.
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_))))
            || self.inner.is_end_stream()
        {
            self.lease.clean = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Pool {
    /// The target's endpoints in the order to try them.
    fn order(&self, ctx: &Ctx, target: &Target) -> Result<Vec<String>, DialError> {
        let service = &target.service;
        let snap = ctx.snapshot.borrow().clone();
        let eps = snap
            .as_ref()
            .and_then(|s| s.services.get(service).cloned())
            .filter(|e| !e.is_empty())
            .ok_or_else(|| DialError::NoEndpoints(service.clone()))?;
        if let Some(only) = &target.endpoint {
            return if eps.contains(only) {
                Ok(vec![only.clone()])
            } else {
                Err(DialError::NoEndpoints(service.clone()))
            };
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % eps.len();
        let mut rotated: Vec<String> = eps[start..].iter().chain(&eps[..start]).cloned().collect();
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let recently = |ep: &String| failed.get(ep).is_some_and(|t| t.elapsed() < FAILURE_HOLD);
        rotated.sort_by_key(recently);
        Ok(rotated)
    }

    fn mark_failed(&self, ep: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep.to_owned(), Instant::now());
    }

    fn mark_ok(&self, ep: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ep);
    }

    async fn dial_one(
        &self,
        ctx: &Ctx,
        ep: &str,
        target: &Target,
        alpn: &'static [u8],
    ) -> Result<TlsStream<TcpStream>, String> {
        let service = &target.service;
        let current = ctx.tls.borrow().clone().ok_or("no certificate")?;
        let config = current
            .client_for(service, alpn)
            .map_err(|e| e.to_string())?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(target.server_name()).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Err(_) => {
                ctx.metrics.handshake_failed("outbound", "timeout".into());
                Err("TLS handshake timed out".into())
            }
            Ok(Err(e)) => {
                let reason = moat_tls::HandshakeFailure::of(&e).code();
                ctx.metrics.handshake_failed("outbound", reason.into());
                tracing::warn!(%service, endpoint = ep, reason, error = %e, "refused to talk to an endpoint that did not prove the expected identity");
                Err(format!("{reason}: {e}"))
            }
            Ok(Ok(tls)) => {
                let peer = moat_tls::peer_identity(tls.get_ref().1.peer_certificates());
                // A resumed session skips chain verification: the certificate it carries was
                // checked when the session began and may have expired since.
                if let Some(p) = &peer
                    && p.not_after <= moat_identity::clock::unix_now()
                {
                    ctx.metrics
                        .handshake_failed("outbound", "certificate-expired".into());
                    tracing::warn!(%service, endpoint = ep, serial = %p.serial, "refused a resumed session whose server certificate has expired");
                    return Err(
                        "certificate-expired: the endpoint's certificate has expired".into(),
                    );
                }
                let snap = ctx.snapshot.borrow().clone();
                if let (Some(p), Some(s)) = (peer, snap)
                    && s.is_revoked(&p.id, &p.serial)
                {
                    ctx.metrics.handshake_failed("outbound", "revoked".into());
                    tracing::warn!(%service, endpoint = ep, serial = %p.serial, "refused an endpoint whose certificate is revoked");
                    return Err("revoked: the endpoint's certificate or identity is revoked".into());
                }
                Ok(tls)
            }
        }
    }

    /// An mTLS connection to one endpoint of `target`, offering `alpn`.
    pub async fn dial(
        &self,
        ctx: &Ctx,
        target: &Target,
        alpn: &'static [u8],
    ) -> Result<(String, TlsStream<TcpStream>), DialError> {
        let service = &target.service;
        if ctx.tls.borrow().is_none() {
            return Err(DialError::NotReady);
        }
        let mut last = String::new();
        for ep in self.order(ctx, target)? {
            match self.dial_one(ctx, &ep, target, alpn).await {
                Ok(tls) => {
                    self.mark_ok(&ep);
                    return Ok((ep, tls));
                }
                Err(e) => {
                    self.mark_failed(&ep);
                    last = format!("{ep}: {e}");
                }
            }
        }
        Err(DialError::AllFailed {
            service: service.clone(),
            last,
        })
    }

    /// The shared connection to use for the next request to `ep` under `key`: one with a free
    /// stream slot, still usable (see [`Shared::usable`]); dialled when there is none.
    async fn checkout(
        &self,
        ctx: &Ctx,
        ep: &str,
        key: &str,
        target: &Target,
    ) -> Result<Lease, String> {
        let slot = self.upstreams.slot(key);
        let mut conns = slot.lock().await;
        let tls = ctx.tls.borrow().clone();
        let snap = ctx.snapshot.borrow().clone();
        let now = moat_identity::clock::unix_now();
        conns.retain(|c| c.usable(tls.as_ref(), snap.as_deref(), now));
        if let Some(c) = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < STREAMS_PER_SHARED)
        {
            return Ok(Lease::new(c.clone(), ctx));
        }
        let generation = tls.ok_or("no certificate")?;
        // Dialling is the rare path and its future (TCP, TLS and HTTP/2 handshakes) is large:
        // boxed, it stays out of every request's future, which hyper copies when it spawns it.
        let shared = Box::pin(self.connect(ctx, ep, target, generation)).await?;
        conns.push(shared.clone());
        Ok(Lease::new(shared, ctx))
    }

    /// A new shared connection to `ep`, made with the certificate generation `generation`.
    async fn connect(
        &self,
        ctx: &Ctx,
        ep: &str,
        target: &Target,
        generation: Arc<crate::identity::TlsGen>,
    ) -> Result<Arc<Shared>, String> {
        let tls_stream = self.dial_one(ctx, ep, target, moat_tls::ALPN_H2).await?;
        let peer = moat_tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
            .ok_or("the endpoint presented no identity")?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Body>(TokioIo::new(tls_stream))
            .await
            .map_err(|e| format!("http/2 handshake: {e}"))?;
        let endpoint = ep.to_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint, error = %e, "mesh connection closed");
            }
        });
        Ok(Arc::new(Shared {
            sender,
            generation,
            peer,
            streams: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        }))
    }

    /// Sends an HTTP/2 request to an endpoint of `target` over a shared connection (see
    /// [`Upstreams`]). Endpoints are tried in turn until one accepts the request, a connection
    /// found closed is replaced once; a request is sent at most once.
    pub async fn send(
        &self,
        ctx: &Ctx,
        target: &Target,
        req: Request<Body>,
    ) -> Result<(String, http::Response<Leased>), DialError> {
        let service = &target.service;
        let mut last = String::new();
        'endpoints: for ep in self.order(ctx, target)? {
            let key = format!("{ep}|{}", target.server_name());
            for _attempt in 0..2 {
                let mut lease = match self.checkout(ctx, &ep, &key, target).await {
                    Ok(l) => l,
                    Err(e) => {
                        self.mark_failed(&ep);
                        last = format!("{ep}: {e}");
                        continue 'endpoints;
                    }
                };
                let mut sender = lease.conn.sender.clone();
                if sender.ready().await.is_err() {
                    // Closed under us (the far side went away or said GOAWAY): not our reset.
                    lease.conn.retired.store(true, Ordering::Relaxed);
                    lease.clean = true;
                    last = format!("{ep}: connection closed");
                    continue;
                }
                self.mark_ok(&ep);
                return match sender.send_request(req).await {
                    Ok(resp) => {
                        // A response without a body is never polled.
                        lease.clean = resp.body().is_end_stream();
                        Ok((ep, resp.map(|inner| Leased { inner, lease })))
                    }
                    Err(e) => {
                        lease.clean = true;
                        Err(DialError::AllFailed {
                            service: service.clone(),
                            last: format!("{ep}: {e}"),
                        })
                    }
                };
            }
        }
        Err(DialError::AllFailed {
            service: service.clone(),
            last,
        })
    }
}
