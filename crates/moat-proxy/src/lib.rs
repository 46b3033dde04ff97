//! The moat sidecar. `run` brings it up in this order: admin port (`admin`), first certificate
//! and renewal (`identity`), the mesh stream to the control plane (`mesh_client`, snapshots in
//! `snapshot`), then the inbound listener (`inbound`: mTLS → authorize → app) and one outbound
//! listener per upstream (`outbound`: app → mTLS to a verified endpoint, via `pool`). Protocols are
//! told apart in `detect`; HTTP plumbing is in `http`, and what one peer may do to a served HTTP
//! connection (limits, timeouts, reset and stall watchdog) in `conn_guard`, what one caller
//! identity may hold across its connections in `callers`; retries toward the control plane wait
//! per `backoff`; metrics in `metrics`. SIGTERM stops accepting, drains in-flight work up to the
//! grace period, then exits.

pub mod admin;
pub mod backoff;
pub mod callers;
pub mod config;
pub mod conn_guard;
pub mod detect;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod logging;
pub mod mesh_client;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod snapshot;
pub mod transparent;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::identity::{TlsGen, TlsWatch};
use crate::snapshot::Snapshot;

/// Connects every app-bound request to the app's address.
#[derive(Clone, Debug)]
pub struct AppConnector(SocketAddr);

impl tower::Service<::http::Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ::http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Accepts connections on `listener` until shutdown; each (with no-delay set) is handled by
/// `handle` on the drain tracker. `what` names the listener in logs.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    what: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        ctx.tracker.spawn(handle(tcp, remote, ctx.clone()));
    }
}

/// An HTTP client to the app: HTTP/1.1 with pooled keep-alive connections.
pub type AppClient = Client<AppConnector, crate::http::Body>;

/// HTTP clients to the app at `addr` (HTTP/1.1, and h2c for gRPC/HTTP/2) for **one inbound
/// connection**: a caller's requests travel on app connections of their own, which close with
/// its connection, so what it does to them — resetting streams until the app tears a connection
/// down, leaving flow-control windows at zero, holding every stream slot — stays with it
/// (decision 30).
pub fn app_clients(addr: SocketAddr) -> (AppClient, AppClient) {
    let build = |h2: bool| {
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(h2)
            .http2_initial_stream_window_size(pool::STREAM_WINDOW)
            .http2_initial_connection_window_size(pool::CONNECTION_WINDOW)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(AppConnector(addr))
    };
    (build(false), build(true))
}

/// What every connection handler shares.
#[derive(Debug)]
pub struct Ctx {
    pub cfg: Arc<ProxyConfig>,
    pub tls: TlsWatch,
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    pub metrics: Arc<metrics::Metrics>,
    pub pool: pool::Pool,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Token buckets of the rules' rate limits.
    pub limiter: ratelimit::Limiter,
    /// Requests in flight per caller identity on the inbound.
    pub callers: Arc<callers::CallerRequests>,
}

/// Bytes read at a time in each direction of a forwarded TCP connection: one full TLS record
/// (tokio's default, 8 KiB, halves the records and system calls per byte on the mTLS side).
const COPY_BUFFER: usize = 16 * 1024;

/// Copies both ways between `a` and `b` until both directions are done; returns the bytes
/// copied a→b and b→a.
pub async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// Runs the proxy until `shutdown` resolves, then drains.
pub async fn run(cfg: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::new());
    let (tls_tx, tls_rx) = watch::channel(None::<Arc<TlsGen>>);
    let (snap_tx, snap_rx) = watch::channel(None::<Arc<Snapshot>>);
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        tls: tls_rx,
        snapshot: snap_rx,
        metrics: metrics.clone(),
        pool: pool::Pool::default(),
        shutdown: CancellationToken::new(),
        limiter: ratelimit::Limiter::default(),
        callers: callers::CallerRequests::new(cfg.requests_per_caller),
        tracker: TaskTracker::new(),
    });

    // Bind everything first, so a port clash fails the start at once.
    let admin = TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", cfg.admin))?;
    let inbound = TcpListener::bind(cfg.inbound)
        .await
        .with_context(|| format!("cannot listen on the inbound address {}", cfg.inbound))?;
    let mut upstreams = Vec::new();
    for up in &cfg.upstreams {
        let id = up.identity(&cfg.trust_domain).map_err(anyhow::Error::msg)?;
        let l = TcpListener::bind(up.listen).await.with_context(|| {
            format!("cannot listen on {} for upstream {}", up.listen, up.service)
        })?;
        upstreams.push((l, id));
    }
    tracing::info!(admin = %admin.local_addr()?, inbound = %inbound.local_addr()?, identity = %cfg.identity, "proxy starting");
    tokio::spawn(admin::serve(admin, ctx.clone()));
    // Listeners serve from the start: until there is a certificate and a snapshot they close
    // inbound connections and answer outbound ones with "unavailable", so callers fail fast.
    ctx.tracker.spawn(inbound::serve(inbound, ctx.clone()));
    for (l, id) in upstreams {
        ctx.tracker.spawn(outbound::serve(l, id, ctx.clone()));
    }
    if let Some(addr) = cfg.transparent {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on the transparent outbound address {addr}"))?;
        ctx.tracker.spawn(transparent::serve(l, ctx.clone()));
    }

    let mut backoff = backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let first = loop {
        match identity::bootstrap(&cfg).await {
            Ok(g) => break g,
            Err(e) if identity::bootstrap_retryable(&e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), ?retry_in, "cannot reach the control plane for our first certificate");
                tokio::time::sleep(retry_in).await;
            }
            Err(e) => return Err(e),
        }
    };
    metrics.cert_expiry.set(first.credential.leaf().not_after);
    tls_tx.send_replace(Some(Arc::new(first)));
    // The control plane can ask for an immediate re-key (`moat cert rotate`).
    let rotate_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(identity::renew_loop(
        cfg.clone(),
        tls_tx.clone(),
        metrics.clone(),
        rotate_now.clone(),
    ));
    let mesh_stream = tokio::spawn(mesh_client::run(
        cfg.clone(),
        tls_tx,
        snap_tx,
        metrics,
        rotate_now,
        ctx.shutdown.clone(),
    ));

    println!("proxy running");

    shutdown.await;
    tracing::info!(grace = ?cfg.drain_timeout, "draining: no new connections; finishing in-flight work");
    ctx.shutdown.cancel();
    // Let the mesh stream say goodbye before anything else winds down (bounded: the control
    // plane may be away).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), mesh_stream).await;
    ctx.tracker.close();
    if tokio::time::timeout(cfg.drain_timeout, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing what is left");
    }
    Ok(())
}
