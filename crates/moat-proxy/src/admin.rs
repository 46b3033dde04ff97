//! The admin port: `/live`, `/ready` (only with a valid certificate and a snapshot),
//! `/metrics` (Prometheus text), `/config` (identity, certificate, bundle, snapshot as JSON),
//! and the app's own probes at `/app-health/…` when injection moved them here (`app_probe`).
//!
//! The port has no TLS and listens on every interface of the pod (the kubelet's probes and the
//! scraper come from elsewhere), so anyone in the cluster can reach it. What it gives them is
//! bounded: [`CONNECTIONS_PER_SOURCE`] connections from one address and [`CONNECTIONS`] in all,
//! each closed when idle for [`HEADER_READ_TIMEOUT`] and after [`CONNECTION_LIFETIME`] whatever
//! it is doing, and `/config` (the service table, the policies) only to a client on the pod's
//! own loopback (`kubectl port-forward`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::callers::{PerCaller, Slot};
use crate::ctx::Ctx;
use crate::http::{Body, full};

fn text(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Why the proxy is not ready, if it is not.
pub fn not_ready(ctx: &Ctx) -> Option<&'static str> {
    let Some(current) = ctx.tls.borrow().clone() else {
        return Some("no certificate yet");
    };
    if current.credential.leaf().not_after <= moat_identity::clock::unix_now() {
        return Some("certificate expired");
    }
    if ctx.snapshot.borrow().is_none() {
        return Some("no snapshot from the control plane yet");
    }
    if ctx.shutdown.is_cancelled() {
        return Some("draining");
    }
    None
}

fn config(ctx: &Ctx) -> serde_json::Value {
    let current = ctx.tls.borrow().clone();
    let snap = ctx.snapshot.borrow().clone();
    serde_json::json!({
        "identity": ctx.cfg.identity.to_string(),
        "certificate": current.as_ref().map(|g| serde_json::json!({
            "serial": g.credential.leaf().serial,
            "not_after_unix": g.credential.leaf().not_after,
            "refresh_after_unix": g.refresh_after,
            "issuer_sha256": g.issuer_sha256(),
            "chain_pem": g.credential.chain().iter().map(|c| moat_identity::bundle::der_to_pem("CERTIFICATE", c)).collect::<String>(),
        })),
        "bundle_sha256": current.as_ref().map(|g| g.bundle.fingerprints()).unwrap_or_default(),
        "snapshot_version": snap.as_ref().map(|s| s.version),
        "policies": snap.as_ref().map(|s| s.policies.iter().map(|p| format!("{}@{}", p.key(), p.version)).collect::<Vec<_>>()).unwrap_or_default(),
        "default_posture": snap.as_ref().map(|s| s.mesh.default_posture.as_str()),
        "services": snap.as_ref().map(|s| s.services.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<std::collections::BTreeMap<_, _>>()),
        "inbound": ctx.cfg.inbound.to_string(),
        "advertise": ctx.cfg.advertise,
        "app": ctx.cfg.app.map(|a| a.to_string()),
        "transparent": ctx.cfg.transparent.map(|a| a.to_string()),
        "taps_open": ctx.metrics.tap.open(),
    })
}

/// Admin connections open at once from one source address. The kubelet sends every probe of
/// the pod from the node's address, the sidecar's own and the app's (`/app-health`, which may
/// wait up to `app_probe::PROBE_TIMEOUT` on a hung app) alike, so this leaves it ample room.
pub const CONNECTIONS_PER_SOURCE: usize = 64;
/// Admin connections open at once, in all: far below the open-file limit, and far above what
/// a few addresses can fill.
pub const CONNECTIONS: usize = 4096;
/// How long one admin connection serves at most: then it finishes the exchange under way and
/// closes. A probe or a scrape takes milliseconds; a scraper that keeps its connection alive
/// opens another.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long a connection may wait for a request head, from when it opens or its last answer
/// went out (hyper's header-read timeout): an idle connection is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an exchange under way at [`CONNECTION_LIFETIME`] may take to finish.
const LAST_EXCHANGE: Duration = Duration::from_secs(10);

/// The admin connections open now: per source address (an IPv4-mapped address counts as IPv4),
/// and in all (one key).
#[derive(Debug)]
struct Open {
    per_source: Arc<PerCaller<IpAddr>>,
    total: Arc<PerCaller<()>>,
}

/// One admitted admin connection's place in both counts, given back when dropped.
type Place = (Slot<IpAddr>, Slot<()>);

impl Open {
    fn new() -> Self {
        Open {
            per_source: PerCaller::new(CONNECTIONS_PER_SOURCE),
            total: PerCaller::new(CONNECTIONS),
        }
    }

    /// A place for a connection from `source`, unless its address or the port is full.
    fn take(&self, source: IpAddr) -> Option<Place> {
        let total = self.total.try_acquire(&())?;
        let from_source = self.per_source.try_acquire(&source.to_canonical())?;
        Some((from_source, total))
    }
}

fn route(req: &Request<Incoming>, ctx: &Ctx, local: bool) -> Response<Body> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n", "text/plain"),
        "/ready" => match not_ready(ctx) {
            None => text(StatusCode::OK, "ready\n", "text/plain"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        "/metrics" => {
            let format = moat_metrics::Format::requested(req.headers());
            text(
                StatusCode::OK,
                ctx.metrics.encode(format),
                format.content_type(),
            )
        }
        "/config" if local => text(StatusCode::OK, config(ctx).to_string(), "application/json"),
        "/config" => text(
            StatusCode::FORBIDDEN,
            "/config answers only on the pod's own loopback: use kubectl port-forward to the admin port\n",
            "text/plain",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /ready, /live, /metrics or /config\n",
            "text/plain",
        ),
    }
}

/// Serves the admin port until shutdown (it stays up while draining so probes see it).
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let open = Open::new();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically out of files: back off instead of spinning.
                tracing::warn!(listener = "admin", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(place) = open.take(remote.ip()) else {
            tracing::debug!(%remote, "closed an admin connection: too many open from its address or in all");
            continue;
        };
        let local = remote.ip().to_canonical().is_loopback();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _place = place;
            let svc = service_fn(move |req: Request<Incoming>| {
                let ctx = ctx.clone();
                async move {
                    // The app's own probes, performed in the kubelet's place (`app_probe`).
                    let resp = match ctx.cfg.app_probes.get(req.uri().path()) {
                        Some(probe) => {
                            let status = probe.check().await;
                            text(status, format!("{}\n", status.as_u16()), "text/plain")
                        }
                        None => route(&req, &ctx, local),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    // An answer being written (a large scrape) is finished, not cut.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(LAST_EXCHANGE, conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_address_and_in_all_and_come_back() {
        let open = Open::new();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let mut held: Vec<Place> = (0..CONNECTIONS_PER_SOURCE)
            .map(|_| open.take(a).unwrap())
            .collect();
        // The same address spelled as IPv4-mapped IPv6 is the same source.
        assert!(open.take(a).is_none());
        assert!(open.take(mapped).is_none());
        held.pop();
        held.push(open.take(mapped).unwrap());
        // Other addresses fill the rest, up to the bound in all.
        let mut n = 0u32;
        while let Some(p) = open.take(IpAddr::from(u32::to_be_bytes(n + 0x0b00_0000))) {
            held.push(p);
            n += 1;
        }
        assert_eq!(held.len(), CONNECTIONS);
        drop(held);
        assert_eq!((open.total.holders(), open.per_source.holders()), (0, 0));
    }
}
