//! What every connection handler shares: the configuration, the live certificate and snapshot,
//! metrics, the connection pool toward other sidecars, rate-limit buckets, each caller's share
//! of the app and of the inbound's connections, the inbound's pending handshakes, and the
//! shutdown signal with the tracker that drains in-flight work.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::snapshot::Snapshot;
use crate::{callers, metrics, pool, ratelimit};
use moat_tls::TlsWatch;
use moat_tls::pending::Handshakes;

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
    pub callers: Arc<callers::PerCaller>,
    /// Open inbound connections per caller identity.
    pub caller_connections: Arc<callers::PerCaller>,
    /// Inbound TLS handshakes not finished yet, bounded per source address and overall.
    pub handshakes: Arc<Handshakes>,
    /// Span export, with `--otlp-endpoint`.
    pub tracing: Option<crate::trace::Tracing>,
}

impl Ctx {
    /// A fresh context: no connections, nothing in flight, not shutting down.
    pub fn new(
        cfg: Arc<ProxyConfig>,
        tls: TlsWatch,
        snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
        metrics: Arc<metrics::Metrics>,
        tracing: Option<crate::trace::Tracing>,
    ) -> Self {
        Ctx {
            callers: callers::PerCaller::new(cfg.requests_per_caller),
            caller_connections: callers::PerCaller::new(cfg.connections_per_caller),
            handshakes: Handshakes::new(crate::inbound::pending_handshakes(
                cfg.requests_per_caller,
                cfg.open_files,
            )),
            cfg,
            tls,
            snapshot,
            pool: pool::Pool::default(),
            metrics,
            shutdown: CancellationToken::new(),
            limiter: ratelimit::Limiter::default(),
            tracker: TaskTracker::new(),
            tracing,
        }
    }
}
