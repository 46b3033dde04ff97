//! Per-edge golden signals of the inbound side, for `moat edges` / `moat top` without a
//! Prometheus server: for each calling identity, the requests it made to this sidecar's service,
//! how many failed (a 5xx answer) or were denied (by reason), and their latency in fixed
//! buckets. Cumulative; reported to the control plane with the rule counters, which sums the
//! service's sidecars, and the CLI turns two readings into rates and percentiles. Each served
//! connection holds its caller's edge, so a request costs a few relaxed atomic additions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in milliseconds; a last bucket holds the rest.
pub use moat_metrics::EDGE_LATENCY_BOUNDS_MS as BUCKET_BOUNDS_MS;

/// The most calling identities kept (past it, new callers' requests are not broken down).
pub const MAX_EDGES: usize = 1024;

/// One caller's requests to this service.
#[derive(Debug, Default)]
pub struct Edge {
    requests: AtomicU64,
    failures: AtomicU64,
    buckets: [AtomicU64; BUCKET_BOUNDS_MS.len() + 1],
    denied: Mutex<Vec<(&'static str, u64)>>,
}

impl Edge {
    /// Counts one answered request.
    pub fn record(&self, denied: Option<&'static str>, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKET_BOUNDS_MS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = denied {
            let mut d = self.denied.lock().unwrap_or_else(|e| e.into_inner());
            match d.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => d.push((reason, 1)),
            }
        }
    }
}

/// What one edge counted so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeReading {
    pub peer: String,
    pub requests: u64,
    pub failures: u64,
    pub denied: Vec<(&'static str, u64)>,
    pub buckets: Vec<u64>,
}

/// Every caller's edge.
#[derive(Debug, Default)]
pub struct Edges {
    by_peer: Mutex<HashMap<String, Arc<Edge>>>,
}

impl Edges {
    /// The edge of `peer`, made on first use; `None` once [`MAX_EDGES`] callers are kept.
    pub fn of(&self, peer: &str) -> Option<Arc<Edge>> {
        let mut m = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get(peer) {
            return Some(e.clone());
        }
        if m.len() >= MAX_EDGES {
            return None;
        }
        let e = Arc::new(Edge::default());
        m.insert(peer.to_owned(), e.clone());
        Some(e)
    }

    /// Every edge's counts.
    pub fn readings(&self) -> Vec<EdgeReading> {
        self.by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(peer, e)| EdgeReading {
                peer: peer.clone(),
                requests: e.requests.load(Ordering::Relaxed),
                failures: e.failures.load(Ordering::Relaxed),
                denied: e.denied.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                buckets: e
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn requests_failures_denials_and_latency_are_counted_per_caller() {
        let edges = Edges::default();
        let a = edges.of("a").unwrap();
        a.record(None, 200, Duration::from_micros(300));
        a.record(None, 503, Duration::from_millis(30));
        a.record(Some("no-rule-matched"), 403, Duration::from_micros(100));
        a.record(Some("no-rule-matched"), 403, Duration::from_secs(60));
        let r = edges.readings();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].requests, r[0].failures), (4, 1));
        assert_eq!(r[0].denied, vec![("no-rule-matched", 2)]);
        assert_eq!(r[0].buckets[0], 2);
        assert_eq!(r[0].buckets[6], 1);
        assert_eq!(r[0].buckets[BUCKET_BOUNDS_MS.len()], 1);
        for i in 0..MAX_EDGES {
            edges.of(&i.to_string());
        }
        assert!(edges.of("one-too-many").is_none());
    }
}
