//! Dialling other sidecars: pick an endpoint of the service (round robin, skipping endpoints
//! that failed recently), originate mTLS that accepts only the service's expected identity, and
//! carry HTTP of every version (HTTP/1.x marked `x-moat-orig-proto`, decision 52) multiplexed
//! over shared HTTP/2 connections per endpoint and service ([`Upstreams`]), bounded so that what one local
//! client does to its streams — resets, a window left at zero, stream slots held — can never
//! make the far side close a connection other clients' requests travel on (decision 30).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use moat_identity::SpiffeId;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ctx::Ctx;
use crate::http::Body;
use crate::metrics::Metrics;
use crate::multiplex::{self, Lease, Leased};

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
        let mut name = String::with_capacity(SERVER_NAME_MAX);
        self.push_server_name(&mut name);
        name
    }

    /// The key of the connections to `ep` that carry this target,
    /// `<ep>|<server name>|<trust domain>/<namespace>/<service account>`: built per request, so in
    /// one allocation and without the formatting machinery. The service is part of it because a
    /// connection's far side proved that identity only: an address that two services' tables
    /// list (one of them announcing another's) must not carry one's requests to the other.
    fn pool_key(&self, ep: &str) -> String {
        let (td, ns, sa) = (
            self.service.trust_domain().as_str(),
            self.service.namespace().as_str(),
            self.service.service_account().as_str(),
        );
        let mut key =
            String::with_capacity(ep.len() + SERVER_NAME_MAX + td.len() + ns.len() + sa.len() + 4);
        key.push_str(ep);
        key.push('|');
        self.push_server_name(&mut key);
        key.push('|');
        key.push_str(td);
        key.push('/');
        key.push_str(ns);
        key.push('/');
        key.push_str(sa);
        key
    }

    fn push_server_name(&self, out: &mut String) {
        if let Some(p) = self.port {
            out.push_str("port-");
            out.push_str(itoa::Buffer::new().format(p));
            out.push('.');
        }
        out.push_str("moat.invalid");
    }
}

/// The longest server name a target has: `port-65535.moat.invalid`.
const SERVER_NAME_MAX: usize = 23;

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
/// endpoint, app port and service (decision 45), each bounded by [`multiplex`] so that no local client can make the far
/// side close one; and local clients' stalls are cut off at half the far side's timeouts
/// (`ConnLimits::for_local_clients`). A burst that needs more streams than one connection
/// carries opens more; once it is over, the spare ones are closed ([`close_spare`]).
#[derive(Debug, Default)]
pub struct Upstreams(Mutex<HashMap<String, Arc<Slot>>>);

/// The shared connections to one endpoint, app port and service, oldest first; locked while one
/// is chosen or dialled.
#[derive(Debug, Default)]
struct Slot {
    conns: tokio::sync::Mutex<Vec<Shared>>,
    /// Whether a [`close_spare`] task watches these connections.
    watched: AtomicBool,
}

impl Upstreams {
    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_owned()).or_default().clone()
    }
}

/// One shared HTTP/2 connection to another sidecar.
#[derive(Debug)]
struct Shared {
    conn: Arc<multiplex::Conn>,
    made: Made,
    /// How many streams had been opened on it when [`close_spare`] last found it idle.
    idle_at: Option<u64>,
}

/// How often [`close_spare`] looks at a slot's connections: half the header-read timeout (5 s by
/// default), short so a burst's connections go soon, and at most half the idle timeout (alike
/// across the mesh), after which the far side would close an idle one itself.
fn spare_look(limits: &crate::conn_guard::ConnLimits) -> Duration {
    limits.header_read.min(limits.idle) / 2
}

/// Closes the spare shared connections of `slot` — every one but the oldest still in use —
/// that stayed idle, with no stream opened, from one look to the next, looking every `every`,
/// until only one is left. A burst over [`multiplex::STREAMS_PER_SHARED`] streams opens more
/// connections than the traffic after it needs, and each holds its TLS and HTTP/2 buffers (and
/// a file on both sides) until the far side's idle timeout, minutes later; the oldest one stays
/// for the next request. Connections no longer in use (closed, retired, or made with an older
/// certificate or to a far side whose certificate is expired or revoked: see [`Made::current`])
/// are dropped as [`Pool::checkout`] drops them. Runs only while a slot has more than one.
async fn close_spare(slot: std::sync::Weak<Slot>, every: Duration, ctx: Watched) {
    loop {
        tokio::time::sleep(every).await;
        let Some(slot) = slot.upgrade() else {
            return;
        };
        let mut conns = slot.conns.lock().await;
        let tls = ctx.tls.borrow().clone();
        let snap = ctx.snapshot.borrow().clone();
        let now = moat_identity::clock::unix_now();
        let (mut oldest, mut spares) = (true, 0);
        conns.retain_mut(|c| {
            if !(c.conn.usable() && c.made.current(tls.as_ref(), snap.as_deref(), now)) {
                return false;
            }
            if std::mem::take(&mut oldest) {
                return true;
            }
            let (idle, opened) = (c.conn.is_idle(), c.conn.opened());
            let spare = idle && c.idle_at == Some(opened);
            c.idle_at = idle.then_some(opened);
            spares += usize::from(spare);
            !spare
        });
        for _ in 0..spares {
            ctx.metrics.connection_closed("upstream", "spare");
        }
        if conns.len() <= 1 {
            slot.watched.store(false, Ordering::Relaxed);
            return;
        }
    }
}

/// What [`close_spare`] watches: the sidecar's certificate, its snapshot, its metrics.
struct Watched {
    tls: moat_tls::TlsWatch,
    snapshot: tokio::sync::watch::Receiver<Option<Arc<crate::snapshot::Snapshot>>>,
    metrics: Arc<Metrics>,
}

/// What a connection to another sidecar was made with: the certificate generation it was made
/// with, and who the far side proved to be.
#[derive(Debug)]
pub struct Made {
    generation: Arc<moat_tls::TlsState>,
    peer: moat_identity::VerifiedPeer,
}

impl Made {
    /// Whether new requests may use the connection: made with the current certificate, to a far
    /// side whose certificate is neither expired nor revoked.
    pub fn current(
        &self,
        tls: Option<&Arc<moat_tls::TlsState>>,
        snap: Option<&crate::snapshot::Snapshot>,
        now: i64,
    ) -> bool {
        tls.is_some_and(|t| Arc::ptr_eq(t, &self.generation))
            && self.peer.not_after > now
            && !snap.is_some_and(|s| s.is_revoked(&self.peer.id, &self.peer.serial))
    }
}

impl Pool {
    /// The target's endpoints in the order to try them: from the next in turn, those that
    /// failed within [`FAILURE_HOLD`] last. Per request, so it copies the endpoints once and
    /// looks up failures only when there are some.
    fn order(&self, ctx: &Ctx, target: &Target) -> Result<Vec<String>, DialError> {
        let service = &target.service;
        let snap = ctx.snapshot.borrow().clone();
        let eps = snap
            .as_deref()
            .and_then(|s| s.services.get(service))
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
        if !failed.is_empty() {
            let recently = |ep: &String| failed.get(ep).is_some_and(|t| t.elapsed() < FAILURE_HOLD);
            rotated.sort_by_cached_key(recently);
        }
        Ok(rotated)
    }

    fn mark_failed(&self, ep: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep.to_owned(), Instant::now());
    }

    fn mark_ok(&self, ep: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        // Nearly always empty: no hashing then.
        if !failed.is_empty() {
            failed.remove(ep);
        }
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
            .client_for(service, alpn, ep)
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
                ctx.metrics
                    .handshake_done("outbound", tls.get_ref().1.handshake_kind());
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
                let protocol = if alpn == moat_tls::ALPN_H2 {
                    "h2"
                } else {
                    "tcp"
                };
                ctx.metrics
                    .upstream_connections
                    .get_or_create(&crate::metrics::UpstreamLabels { protocol })
                    .inc();
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
        let mut conns = slot.conns.lock().await;
        let tls = ctx.tls.borrow().clone();
        let snap = ctx.snapshot.borrow().clone();
        let now = moat_identity::clock::unix_now();
        conns.retain(|c| c.conn.usable() && c.made.current(tls.as_ref(), snap.as_deref(), now));
        if let Some(c) = conns.iter().find(|c| c.conn.has_room()) {
            return Ok(Lease::new(&c.conn, &ctx.metrics));
        }
        let generation = tls.ok_or("no certificate")?;
        // Dialling is the rare path and its future (TCP, TLS and HTTP/2 handshakes) is large:
        // boxed, it stays out of every request's future, which hyper copies when it spawns it.
        let shared = Box::pin(self.connect(ctx, ep, target, generation)).await?;
        let lease = Lease::new(&shared.conn, &ctx.metrics);
        if !conns.is_empty() && !slot.watched.swap(true, Ordering::Relaxed) {
            let every = spare_look(&ctx.cfg.limits);
            let watched = Watched {
                tls: ctx.tls.clone(),
                snapshot: ctx.snapshot.clone(),
                metrics: ctx.metrics.clone(),
            };
            tokio::spawn(close_spare(Arc::downgrade(&slot), every, watched));
        }
        conns.push(shared);
        Ok(lease)
    }

    /// A new shared connection to `ep`, made with the certificate generation `generation`.
    async fn connect(
        &self,
        ctx: &Ctx,
        ep: &str,
        target: &Target,
        generation: Arc<moat_tls::TlsState>,
    ) -> Result<Shared, String> {
        let tls_stream = self.dial_one(ctx, ep, target, moat_tls::ALPN_H2).await?;
        let peer = moat_tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
            .ok_or("the endpoint presented no identity")?;
        let made = Made { generation, peer };
        let settings = multiplex::Settings {
            keep_alive: Some(Duration::from_secs(20)),
        };
        let conn = multiplex::Conn::handshake(
            settings,
            tls_stream,
            "upstream",
            ctx.cfg.limits.request_idle / multiplex::LINGER_SHARE_OF_REQUEST_IDLE,
            ep.to_owned(),
        )
        .await
        .map_err(|e| format!("http/2 handshake: {e}"))?;
        Ok(Shared {
            conn,
            made,
            idle_at: None,
        })
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
        let mut req = req;
        'endpoints: for ep in self.order(ctx, target)? {
            let key = target.pool_key(&ep);
            for _attempt in 0..2 {
                let lease = match self.checkout(ctx, &ep, &key, target).await {
                    Ok(l) => l,
                    Err(e) => {
                        self.mark_failed(&ep);
                        last = format!("{ep}: {e}");
                        continue 'endpoints;
                    }
                };
                let sent = match lease.send(req).await {
                    Ok(sent) => sent,
                    Err(unsent) => {
                        // Closed under us (the far side went away or said GOAWAY).
                        last = format!("{ep}: connection closed");
                        req = unsent;
                        continue;
                    }
                };
                self.mark_ok(&ep);
                return match sent.await {
                    Ok(resp) => Ok((ep, resp)),
                    Err(e) => Err(DialError::AllFailed {
                        service: service.clone(),
                        last: format!("{ep}: {e}"),
                    }),
                };
            }
        }
        Err(DialError::AllFailed {
            service: service.clone(),
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server name a target dials with is the one the far side reads its port from, and
    /// the pool key carries it after the endpoint, then the service.
    #[test]
    fn server_names_carry_the_port_and_key_the_pool() {
        let service: SpiffeId = "spiffe://mesh.test/ns/shop/sa/api".parse().unwrap();
        for port in [None, Some(1), Some(8080), Some(u16::MAX)] {
            let target = Target {
                port,
                ..Target::service(service.clone())
            };
            let name = target.server_name();
            assert!(name.len() <= SERVER_NAME_MAX, "{name}");
            assert_eq!(port_from_server_name(Some(&name)), port, "{name}");
            assert_eq!(
                target.pool_key("10.0.0.1:4143"),
                format!("10.0.0.1:4143|{name}|mesh.test/shop/api")
            );
            // Another service at the same address and port keys connections of its own.
            let other = Target {
                port,
                ..Target::service("spiffe://mesh.test/ns/shop/sa/admin".parse().unwrap())
            };
            assert_ne!(
                other.pool_key("10.0.0.1:4143"),
                target.pool_key("10.0.0.1:4143")
            );
        }
        let target = Target {
            port: Some(8080),
            ..Target::service(service)
        };
        assert_eq!(target.server_name(), "port-8080.moat.invalid");
    }
}
