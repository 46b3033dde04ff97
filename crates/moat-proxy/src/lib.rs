//! The moat sidecar. This file is only the wiring; what the parts share is in `ctx` (the
//! handlers' context), `net` (accept loop, TCP copy) and `app` (clients to the local app).
//! `run` brings it up in this order: admin port (`admin`), first certificate
//! and renewal (`identity`), the mesh stream to the control plane (`mesh_client`, snapshots in
//! `snapshot`), then the inbound listener (`inbound`: mTLS → authorize → app) and one outbound
//! listener per upstream (`outbound`: app → mTLS to a verified endpoint, via `pool`). Protocols are
//! told apart in `detect`; HTTP plumbing is in `http`, and what one peer may do to a served HTTP
//! connection (limits, timeouts, reset and stall watchdog) in `conn_guard`, what one caller
//! identity may hold across its connections in `callers`; retries toward the control plane wait
//! per `backoff`; metrics in `metrics`. SIGTERM stops accepting, drains in-flight work up to the
//! grace period, then exits.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod callers;
pub mod config;
pub mod conn_guard;
pub mod ctx;
pub mod detect;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod logging;
pub mod mesh_client;
pub mod metrics;
pub mod multiplex;
pub mod net;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod snapshot;
pub mod transparent;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::ctx::Ctx;
use crate::snapshot::Snapshot;

/// Runs the proxy until `shutdown` resolves, then drains.
pub async fn run(cfg: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::new());
    let tls = Arc::new(moat_tls::LiveTls::empty(identity::SERVING));
    let (snap_tx, snap_rx) = watch::channel(None::<Arc<Snapshot>>);
    let ctx = Arc::new(Ctx::new(
        cfg.clone(),
        tls.subscribe(),
        snap_rx,
        metrics.clone(),
    ));

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
    metrics.cert_expiry.set(first.credential.leaf().not_after);
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
