//! The moat sidecar. This file is only the wiring; what the parts share is in `ctx` (the handlers'
//! context), `net` (accept loop, plain TCP copy), `relay` (opaque TCP between a mesh TLS connection
//! and a socket) and `app` (clients to the local app). `run` brings it up in this order: admin port
//! (`admin`), first certificate and renewal (`identity`), the mesh stream to the control plane
//! (`mesh_client`, snapshots in `snapshot`), then the inbound listener (`inbound`: mTLS → authorize
//! → app) and one outbound listener per upstream (`outbound`: app → mTLS to a verified endpoint,
//! via `pool`, every HTTP version on shared HTTP/2 connections; HTTP/2 writes gathered in
//! `coalesce`), and `app` keeps HTTP/1.1 connections to the app with `keepalive`. Protocols are told apart in `detect` (read-side stream wrappers forward writes with
//! `forward`); HTTP plumbing is in `http`, and what one peer may do to a served HTTP connection
//! (limits, timeouts, reset and stall watchdog) in `conn_guard` (its guards polled only when woken,
//! `on_wake`), what one caller identity may hold across its connections in `callers`; retries
//! toward the control plane wait per `backoff`; metrics in `metrics`, and what callers do while the
//! allow-list only watches (for `moat policy suggest`) in `observe`, per-caller golden signals
//! (`moat edges`) in `edges`. SIGTERM stops accepting, drains in-flight work up to the grace
//! period, then exits.

pub mod admin;
pub mod app;
pub mod app_probe;
pub mod backoff;
pub mod callers;
pub mod coalesce;
pub mod config;
pub mod conn_guard;
pub mod cpu;
pub mod ctx;
pub mod detect;
pub mod edges;
mod forward;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod keepalive;
pub mod logging;
pub mod mesh_client;
pub mod metrics;
pub mod multiplex;
pub mod net;
pub mod observe;
pub mod on_wake;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod relay;
pub mod snapshot;
pub mod tap;
pub mod trace;
pub mod transparent;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use moat_identity::SpiffeId;

use crate::config::ProxyConfig;
use crate::ctx::Ctx;
use crate::snapshot::Snapshot;

/// Every listener, bound before anything else starts, so a port clash fails the start at once.
struct Listeners {
    admin: TcpListener,
    inbound: TcpListener,
    upstreams: Vec<(TcpListener, SpiffeId)>,
    transparent: Option<TcpListener>,
}

impl Listeners {
    async fn bind(cfg: &ProxyConfig) -> anyhow::Result<Self> {
        let admin = TcpListener::bind(cfg.admin)
            .await
            .with_context(|| format!("cannot listen on the admin address {}", cfg.admin))?;
        let inbound = TcpListener::bind(cfg.inbound)
            .await
            .with_context(|| format!("cannot listen on the inbound address {}", cfg.inbound))?;
        let mut upstreams = Vec::new();
        for up in &cfg.upstreams {
            let id = up.identity(&cfg.trust_domain)?;
            let l = TcpListener::bind(up.listen).await.with_context(|| {
                format!("cannot listen on {} for upstream {}", up.listen, up.service)
            })?;
            upstreams.push((l, id));
        }
        let transparent = match cfg.transparent {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on the transparent outbound address {addr}")
            })?),
            None => None,
        };
        Ok(Listeners {
            admin,
            inbound,
            upstreams,
            transparent,
        })
    }

    /// The address each listener is bound to (a port given as 0 is the one the system chose),
    /// as `--addresses-file` reports them.
    fn addresses(&self, cfg: &ProxyConfig) -> std::io::Result<serde_json::Value> {
        // In the order of the --upstream flags: one service may have several listeners.
        let mut upstreams = Vec::new();
        for ((l, _), up) in self.upstreams.iter().zip(&cfg.upstreams) {
            upstreams.push(serde_json::json!({
                "service": up.service,
                "address": l.local_addr()?.to_string(),
            }));
        }
        Ok(serde_json::json!({
            "admin": self.admin.local_addr()?.to_string(),
            "inbound": self.inbound.local_addr()?.to_string(),
            "upstreams": upstreams,
            "transparent": self.transparent.as_ref().map(TcpListener::local_addr).transpose()?.map(|a| a.to_string()),
        }))
    }
}

/// Writes `value` to `path` whole or not at all (a reader never sees half a file).
fn write_atomically(path: &std::path::Path, value: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, value.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Runs the proxy until `shutdown` resolves, then drains.
pub async fn run(mut cfg: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&cfg).await?;
    let inbound_addr = listeners.inbound.local_addr()?;
    // From here on the configuration says where each listener is (`/config` shows it).
    cfg.inbound = inbound_addr;
    cfg.admin = listeners.admin.local_addr()?;
    for (up, (l, _)) in cfg.upstreams.iter_mut().zip(&listeners.upstreams) {
        up.listen = l.local_addr()?;
    }
    if let Some(l) = &listeners.transparent {
        cfg.transparent = Some(l.local_addr()?);
    }
    // An advertised port 0 (from `--inbound HOST:0`) is the port the system chose.
    if let Ok(mut advertised) = cfg.advertise.parse::<std::net::SocketAddr>()
        && advertised.port() == 0
    {
        advertised.set_port(inbound_addr.port());
        cfg.advertise = advertised.to_string();
    }
    if let Some(path) = &cfg.addresses_file {
        write_atomically(path, &listeners.addresses(&cfg)?)
            .with_context(|| format!("cannot write --addresses-file {}", path.display()))?;
    }
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::new());
    let tls = Arc::new(moat_tls::LiveTls::empty(identity::SERVING));
    let (snap_tx, snap_rx) = watch::channel(None::<Arc<Snapshot>>);
    let tracing = match &cfg.tracing {
        Some(t) => Some(trace::Tracing::start(
            &t.endpoint,
            &cfg.identity,
            t.sample_ratio,
        )?),
        None => None,
    };
    let ctx = Arc::new(Ctx::new(
        cfg.clone(),
        tls.subscribe(),
        snap_rx,
        metrics.clone(),
        tracing,
    ));
    ctx.handshakes.limits().log(cfg.open_files);

    let Listeners {
        admin,
        inbound,
        upstreams,
        transparent,
    } = listeners;
    tracing::info!(admin = %admin.local_addr()?, inbound = %inbound_addr, advertise = %cfg.advertise, identity = %cfg.identity, "proxy starting");
    tokio::spawn(admin::serve(admin, ctx.clone()));
    // Listeners serve from the start: until there is a certificate and a snapshot they close
    // inbound connections and answer outbound ones with "unavailable", so callers fail fast.
    ctx.tracker.spawn(inbound::serve(inbound, ctx.clone()));
    for (l, id) in upstreams {
        ctx.tracker.spawn(outbound::serve(l, id, ctx.clone()));
    }
    if let Some(l) = transparent {
        ctx.tracker.spawn(transparent::serve(l, ctx.clone()));
    }

    let mut backoff = backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let first = loop {
        match identity::bootstrap(&cfg).await {
            Ok(g) => break g,
            Err(e) if e.retryable() => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "cannot reach the control plane for our first certificate");
                tokio::time::sleep(retry_in).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let first = first
        .publish(&tls)
        .context("the control plane's first certificate is unusable")?;
    metrics.certificate(&first);
    // The control plane can ask for an immediate re-key (`moat cert rotate`).
    let rotate_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(identity::renew_loop(
        cfg.clone(),
        tls.clone(),
        metrics.clone(),
        rotate_now.clone(),
    ));
    let mesh_stream = tokio::spawn(mesh_client::run(
        cfg.clone(),
        tls,
        snap_tx,
        metrics,
        rotate_now,
        ctx.shutdown.clone(),
    ));

    moat_log::startup(format_args!("proxy running"));

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
    if let Some(t) = &ctx.tracing {
        t.flush().await;
    }
    Ok(())
}
