//! The admin port: `/live`, `/ready` (only with a valid certificate and a snapshot),
//! `/metrics` (Prometheus text), `/config` (identity, certificate, bundle, snapshot as JSON),
//! and the app's own probes at `/app-health/…` when injection moved them here (`app_probe`).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

fn route(req: &Request<Incoming>, ctx: &Ctx) -> Response<Body> {
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
        "/config" => text(StatusCode::OK, config(ctx).to_string(), "application/json"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /ready, /live, /metrics or /config\n",
            "text/plain",
        ),
    }
}

/// Serves the admin port until shutdown (it stays up while draining so probes see it).
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let ctx = ctx.clone();
                async move {
                    // The app's own probes, performed in the kubelet's place (`app_probe`).
                    let resp = match ctx.cfg.app_probes.get(req.uri().path()) {
                        Some(probe) => {
                            let status = probe.check().await;
                            text(status, format!("{}\n", status.as_u16()), "text/plain")
                        }
                        None => route(&req, &ctx),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
