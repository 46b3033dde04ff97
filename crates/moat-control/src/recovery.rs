//! Recovery mode: the CA cannot issue (an expired root, or an expired intermediate this CA
//! cannot replace by itself) and only an offline `moat-control ca …` command can fix it. The
//! control plane then serves nothing that needs a certificate: it keeps its plain-HTTP admin
//! port up (`/live` 200, `/ready` 503 with the reason and the command, `/metrics`), releases the
//! store so the offline command can open it, and checks every few seconds whether the CA can
//! issue again; then it starts normally.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn reply(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// What `/metrics` says in recovery mode: that it is, and the build.
fn recovery_metrics(format: moat_metrics::Format) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("moat");
    moat_metrics::build_info(&mut registry, "control-plane", env!("CARGO_PKG_VERSION"));
    let recovery = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    recovery.set(1);
    registry.register(
        "control_recovery_mode",
        "Whether the control plane waits for an offline CA repair (1) instead of serving",
        recovery,
    );
    moat_metrics::encode(&registry, format)
}

fn route(req: &Request<Incoming>, why: &str) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/live" => reply(
            StatusCode::OK,
            "live (recovery mode)\n".into(),
            "text/plain",
        ),
        "/ready" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: recovery mode: {why}\n"),
            "text/plain",
        ),
        "/metrics" => {
            let format = moat_metrics::Format::requested(req.headers());
            reply(
                StatusCode::OK,
                recovery_metrics(format),
                format.content_type(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready or /metrics\n".into(),
            "text/plain",
        ),
    }
}

/// Serves the admin port in recovery mode until `repaired` resolves (checked by the caller)
/// or `shutdown` does. Returns `true` when repaired.
pub async fn wait(
    admin: tokio::net::TcpListener,
    why: String,
    mut repaired: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> bool {
    tracing::error!(reason = %why, "RECOVERY MODE: the CA cannot issue certificates; nothing is served but the admin port until it is repaired");
    let why: Arc<str> = why.into();
    let server = {
        let why = why.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = admin.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let why = why.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let r = route(&req, &why);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tcp), svc);
                    let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
                });
            }
        })
    };
    let mut reminded = tokio::time::Instant::now();
    let done = loop {
        tokio::select! {
            () = &mut *shutdown => break false,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if repaired().await {
            tracing::info!("the CA can issue again: leaving recovery mode");
            break true;
        }
        if reminded.elapsed() > Duration::from_secs(60) {
            tracing::error!(reason = %why, "still in recovery mode");
            reminded = tokio::time::Instant::now();
        }
    };
    server.abort();
    let _ = server.await;
    done
}
