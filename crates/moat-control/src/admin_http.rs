//! The control plane's plain-HTTP admin port: `/live`, `/ready` (the store answers) and
//! `/metrics` (Prometheus text). Nothing here changes state or reveals key material.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::ControlPlane;

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

async fn route(req: Request<Incoming>, cp: Arc<ControlPlane>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n", "text/plain"),
        "/ready" => match cp.ca.state().await {
            Ok(_) => text(StatusCode::OK, "ready\n", "text/plain"),
            Err(e) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {e}\n"),
                "text/plain",
            ),
        },
        "/metrics" => {
            let format = moat_metrics::Format::requested(req.headers());
            text(
                StatusCode::OK,
                cp.metrics.render(&cp, format).await,
                format.content_type(),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready or /metrics\n",
            "text/plain",
        ),
    }
}

/// Serves the admin port forever.
pub async fn serve(listener: TcpListener, cp: Arc<ControlPlane>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "admin port accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let cp = cp.clone();
                async move { Ok::<_, Infallible>(route(req, cp).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// Warns in the log, once a day, while the root or the intermediate expires within `horizon`.
pub async fn warn_expiry(cp: Arc<ControlPlane>, horizon: Duration) {
    loop {
        let ca = cp.ca.current();
        let now = moat_identity::clock::unix_now();
        let limit = now + horizon.as_secs() as i64;
        let certs = ca
            .roots_info()
            .into_iter()
            .map(|c| ("root", c))
            .chain(ca.intermediate_info().map(|c| ("intermediate", c)));
        for (kind, c) in certs {
            if c.not_after < limit {
                let days = (c.not_after - now) / 86400;
                tracing::warn!(kind, subject = %c.subject, not_after = c.not_after, days_left = days,
                    "the CA {kind} expires soon: run `moat ca rotate-{}`", if kind == "root" { "root" } else { "intermediate" });
            }
        }
        tokio::time::sleep(Duration::from_secs(86400)).await;
    }
}
